/**
 * `capsulectl image push ARCHIVE.tar | image pull REF | image list`: push streams an image
 * archive into each selected capsule's image store (Images/Push, client-streaming) in
 * {@link CHUNK_SIZE} chunks, with a progress bar on a terminal; pull has each capsule fetch a
 * reference from a registry (Images/Pull, unary); list fans out like every read.
 */
import { open, stat } from "node:fs/promises";
import { basename } from "node:path";
import cliProgress from "cli-progress";
import { invalidArgument } from "../../errors.js";
import type { Image__Output } from "../../gen/capsule/v1/Image.js";
import type { ImageChunk } from "../../gen/capsule/v1/ImageChunk.js";
import type { ListImagesResponse__Output } from "../../gen/capsule/v1/ListImagesResponse.js";
import type { PushImageResponse__Output } from "../../gen/capsule/v1/PushImageResponse.js";
import { humanBytes, type View } from "../output.js";
import type { Session } from "../session.js";

/** CHUNK_SIZE is the data of every ImageChunk but the last: 1 MiB, well under gRPC's 4 MiB message cap. */
export const CHUNK_SIZE = 1024 * 1024;

/** DEFAULT_PUSH_TIMEOUT_MS bounds one push per capsule unless --push-timeout says otherwise. */
export const DEFAULT_PUSH_TIMEOUT_MS = 10 * 60_000;

/** shortDigest shows "sha256:" and the first 12 hex digits, as docker does. Pure. */
export function shortDigest(digest: string): string {
  const m = /^([a-z0-9]+):([0-9a-f]+)$/.exec(digest);
  return m ? `${m[1]}:${m[2]?.slice(0, 12)}` : digest;
}

/**
 * imageChunks reads `path` in chunks of exactly `chunkSize` bytes (the last may be shorter).
 * The first carries `filename` and the total size; the rest only data. `onBytes` is told each
 * chunk's size after it is handed over. The file is opened anew per call (one per capsule).
 */
export async function* imageChunks(
  path: string,
  filename: string,
  totalSize: number,
  onBytes?: (n: number) => void,
  chunkSize = CHUNK_SIZE,
): AsyncGenerator<ImageChunk, void, undefined> {
  const fh = await open(path, "r");
  try {
    let first = true;
    for (;;) {
      const buf = Buffer.allocUnsafe(chunkSize);
      let n = 0;
      while (n < chunkSize) {
        const { bytesRead } = await fh.read(buf, n, chunkSize - n, null);
        if (bytesRead === 0) break;
        n += bytesRead;
      }
      if (n === 0 && !first) return;
      const data = buf.subarray(0, n);
      yield first ? { data, filename, totalSize: String(totalSize) } : { data };
      first = false;
      onBytes?.(n);
      if (n < chunkSize) return;
    }
  } finally {
    await fh.close();
  }
}

/** IMAGE_VIEW is one row per image: reference, short digest, size. Wide shows the whole digest. */
export const IMAGE_VIEW: View<{ images: Image__Output[] }, Image__Output> = {
  rows: (v) => v.images,
  columns: [
    { header: "IMAGE", get: (i) => i.ref },
    { header: "DIGEST", get: (i) => shortDigest(i.digest) },
    { header: "SIZE", get: (i) => humanBytes(i.size) },
    { header: "FULL-DIGEST", get: (i) => i.digest, wide: true },
  ],
};

/** PushOptions: `timeoutMs` bounds each capsule's whole push (default {@link DEFAULT_PUSH_TIMEOUT_MS}). */
export interface PushOptions {
  timeoutMs?: number;
}

/**
 * imagePush streams ARCHIVE into every selected capsule in parallel and prints the images each
 * stored (one table; a CAPSULE column for several). Idempotent on the capsule: the same
 * archive again stores the same digests. A progress bar per capsule goes to stderr when it is
 * a terminal.
 */
export async function imagePush(s: Session, archive: string, opts: PushOptions = {}): Promise<void> {
  let size: number;
  try {
    const st = await stat(archive);
    if (!st.isFile()) throw new Error("is not a file");
    size = st.size;
  } catch (e) {
    const why = (e as NodeJS.ErrnoException).code === "ENOENT" ? "no such file" : (e as Error).message;
    throw invalidArgument("ARCHIVE", `${archive}: ${why}`, "give an OCI-layout or docker-save .tar");
  }
  if (size === 0)
    throw invalidArgument("ARCHIVE", `${archive}: is empty`, "give an OCI-layout or docker-save .tar");
  const targets = await s.targets();
  const filename = basename(archive);
  const timeoutMs = Math.max(opts.timeoutMs ?? DEFAULT_PULL_TIMEOUT_MS, s.globals.timeoutMs);
  const bars = s.io.stderr.isTTY ? progressBars(s) : undefined;
  try {
    const results = await s.withEach(
      targets,
      (client, t, signal) => {
        const bar = bars?.create(size, 0, { capsule: t.name.padEnd(12) });
        return client.callClientStream<PushImageResponse__Output>(
          "Images/Push",
          imageChunks(archive, filename, size, (n) => bar?.increment(n)),
          { deadlineMs: timeoutMs, signal },
        );
      },
      { deadlineMs: timeoutMs },
    );
    bars?.stop();
    s.show(results, IMAGE_VIEW, s.isMulti(targets));
  } finally {
    bars?.stop();
  }
}

function progressBars(s: Session): cliProgress.MultiBar {
  return new cliProgress.MultiBar(
    {
      stream: s.io.stderr as unknown as NodeJS.WritableStream,
      format: "{capsule} [{bar}] {percentage}% | {value} / {total} | {eta_formatted}",
      formatValue: (v, _o, type) => (type === "value" || type === "total" ? humanBytes(v) : String(v)),
      clearOnComplete: false,
      hideCursor: true,
      barsize: 30,
    },
    cliProgress.Presets.shades_classic,
  );
}

/** imageList lists every selected capsule's images. Read-only. */
export async function imageList(s: Session): Promise<void> {
  await s.rpcAndShow<ListImagesResponse__Output, Image__Output>("Images/List", () => ({}), IMAGE_VIEW);
}

/**
 * DEFAULT_PULL_TIMEOUT_MS bounds one pull per capsule unless --pull-timeout says otherwise: the
 * node's own 10 min bound on `ctr images pull` plus a margin, so its clear timeout error arrives
 * before our deadline does.
 */
export const DEFAULT_PULL_TIMEOUT_MS = 10 * 60_000 + 30_000;

/** PullOptions: `plainHttp` allows a registry without TLS; `timeoutMs` bounds each capsule's pull (unset = {@link DEFAULT_PULL_TIMEOUT_MS}; a longer `--timeout` wins). */
export interface PullOptions {
  plainHttp?: boolean;
  timeoutMs?: number;
}

/**
 * imagePull has every selected capsule pull REF from its registry (Images/Pull), in parallel,
 * and prints what each stored. Idempotent on the capsule.
 */
export async function imagePull(s: Session, ref: string, opts: PullOptions = {}): Promise<void> {
  if (!ref)
    throw invalidArgument("REF", "name an image reference", "capsulectl image pull REGISTRY/NAME:TAG");
  const targets = await s.targets();
  const timeoutMs = Math.max(opts.timeoutMs ?? DEFAULT_PULL_TIMEOUT_MS, s.globals.timeoutMs);
  const results = await s.withEach(
    targets,
    (client) =>
      client.call<PushImageResponse__Output>(
        "Images/Pull",
        { ref, plainHttp: opts.plainHttp === true },
        { deadlineMs: timeoutMs },
      ),
    { deadlineMs: timeoutMs },
  );
  s.show(results, IMAGE_VIEW, s.isMulti(targets));
}
