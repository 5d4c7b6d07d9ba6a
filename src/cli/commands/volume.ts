/**
 * `capsulectl volume create NAME --size SIZE | volume list | volume delete NAME`: persistent
 * volumes in each selected capsule (Volumes service). Sizes are checked here before any call.
 */
import { invalidArgument } from "../../errors.js";
import type { DeleteVolumeResponse__Output } from "../../gen/capsule/v1/DeleteVolumeResponse.js";
import type { ListVolumesResponse__Output } from "../../gen/capsule/v1/ListVolumesResponse.js";
import type { Volume__Output } from "../../gen/capsule/v1/Volume.js";
import { humanBytes, type View } from "../output.js";
import type { Session } from "../session.js";
import { showLines } from "./lines.js";

const SIZE_UNITS: Record<string, number> = {
  "": 1,
  K: 1e3,
  k: 1e3,
  M: 1e6,
  G: 1e9,
  T: 1e12,
  Ki: 2 ** 10,
  Mi: 2 ** 20,
  Gi: 2 ** 30,
  Ti: 2 ** 40,
};

/** MIN_VOLUME_BYTES and MAX_VOLUME_BYTES are the capsule's bounds (16 MiB, 16 TiB), checked here first. */
export const MIN_VOLUME_BYTES = 16 * 2 ** 20;
export const MAX_VOLUME_BYTES = 16 * 2 ** 40;

/**
 * parseSize reads a volume size as the capsule accepts it (the same rules; the CLI may not
 * import the node side): bytes ("33554432"), decimal ("100M", "1G") or binary ("512Mi", "1Gi")
 * units, between 16Mi and 16Ti. Returns the byte count; anything else names --size. Pure.
 */
export function parseSize(text: string): number {
  const m = /^(\d{1,16})(Ki|Mi|Gi|Ti|[kKMGT])?$/.exec(text.trim());
  if (!m) {
    throw invalidArgument(
      "--size",
      `"${text}" is not a size`,
      'use bytes or a unit, e.g. "512Mi", "1Gi", "100M"',
    );
  }
  const n = Number(m[1]) * (SIZE_UNITS[m[2] ?? ""] ?? 1);
  if (n < MIN_VOLUME_BYTES) throw invalidArgument("--size", `${text} is below the minimum of 16Mi`);
  if (n > MAX_VOLUME_BYTES) throw invalidArgument("--size", `${text} is above the maximum of 16Ti`);
  return n;
}

/** VOLUME_VIEW is one row per volume; wide adds the block device and creation time. */
export const VOLUME_VIEW: View<Volume__Output, Volume__Output> = {
  rows: (v) => [v],
  columns: [
    { header: "NAME", get: (v) => v.name },
    { header: "SIZE", get: (v) => humanBytes(v.size) },
    { header: "BACKEND", get: (v) => v.backend },
    { header: "USED-BY", get: (v) => v.usedBy },
    { header: "DEVICE", get: (v) => v.device, wide: true },
    { header: "CREATED", get: (v) => v.createdAt, wide: true },
  ],
};

/** LIST_VIEW is `volume list`. */
export const VOLUME_LIST_VIEW: View<ListVolumesResponse__Output, Volume__Output> = {
  rows: (v) => v.volumes,
  columns: VOLUME_VIEW.columns,
};

/** volumeCreate creates NAME of SIZE on every selected capsule and prints `volume/NAME created (SIZE, BACKEND)`. */
export async function volumeCreate(s: Session, name: string, size: string): Promise<void> {
  parseSize(size);
  const { results, multi } = await s.rpc<Volume__Output>("Volumes/Create", () => ({
    name,
    size: size.trim(),
  }));
  showLines(
    s,
    results,
    multi,
    VOLUME_VIEW,
    (v) =>
      `volume/${v.name || name} created (${humanBytes(v.size) || size}${v.backend ? `, ${v.backend}` : ""})\n`,
  );
}

/** volumeList lists every selected capsule's volumes. Read-only. */
export async function volumeList(s: Session): Promise<void> {
  await s.rpcAndShow<ListVolumesResponse__Output, Volume__Output>(
    "Volumes/List",
    () => ({}),
    VOLUME_LIST_VIEW,
  );
}

/** volumeDelete deletes NAME on every selected capsule. Idempotent: a missing volume says "not found" and exits 0. */
export async function volumeDelete(s: Session, name: string): Promise<void> {
  const { results, multi } = await s.rpc<DeleteVolumeResponse__Output>("Volumes/Delete", () => ({ name }));
  const said = (v: DeleteVolumeResponse__Output) => (v.deleted ? "deleted" : "not found");
  showLines(
    s,
    results,
    multi,
    {
      rows: (v) => [v],
      columns: [
        { header: "VOLUME", get: () => name },
        { header: "RESULT", get: said },
      ],
    },
    (v) => `volume/${name} ${said(v)}\n`,
  );
}
