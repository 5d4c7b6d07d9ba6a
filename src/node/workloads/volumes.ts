/**
 * Named block-backed volumes for workloads.
 *
 * A volume is a block device with an ext4 filesystem, so a microVM can take the same volume as
 * a disk later; a container gets the filesystem mounted on the host and bind-mounted in.
 * Two backends:
 * - `lvm-thin`: a thin LV `capsule-<name>` in a configured thin pool, used for new volumes only
 *   when {@link detectBackend} finds that pool (`lvs` reports a thin pool, lv_attr "t...").
 * - `loop-ext4`: otherwise, a sparse file `<stateDir>/volumes/<name>.img` formatted at create
 *   and attached with `losetup --find --show` when a workload attaches the volume.
 * Either way the filesystem is mounted at `<stateDir>/volumes/mnt/<name>` while attached.
 *
 * One workload holds a volume at a time; the holder is `volumes.used_by` in SQLite and is
 * written before the mount and cleared after the unmount, so a crash never leaves a mount
 * without an owner on record. Every OS effect goes through the CommandRunner seam.
 */
import { join } from "node:path";
import { CapsuleError, ErrorCode, invalidArgument } from "../../errors.js";
import type { CommandRunner } from "../host/runner.js";
import { WORKLOAD_NAME } from "../runtime/containers.js";
import type { Store } from "../store/store.js";
import type { VolumeAttacher } from "./ports.js";

/** VolumeBackend is how a volume's block device is made. Stored per volume; never changes after create. */
export type VolumeBackend = "lvm-thin" | "loop-ext4";

/** MIN_VOLUME_BYTES is the smallest volume (16 MiB): below it ext4 has little room left for data. */
export const MIN_VOLUME_BYTES = 16 * 1024 * 1024;

/** MAX_VOLUME_BYTES bounds a size so it stays an exact integer (16 TiB). */
export const MAX_VOLUME_BYTES = 16 * 1024 ** 4;

const UNITS: Record<string, number> = {
  "": 1,
  K: 1e3,
  k: 1e3,
  M: 1e6,
  G: 1e9,
  T: 1e12,
  Ki: 1024,
  Mi: 1024 ** 2,
  Gi: 1024 ** 3,
  Ti: 1024 ** 4,
};

/**
 * parseSize parses a volume size: bytes ("33554432"), decimal ("100M", "1G") or binary
 * ("512Mi", "1Gi") units. Pure. Throws CAPSULE_INVALID_ARGUMENT for anything else, for less than
 * {@link MIN_VOLUME_BYTES} or more than {@link MAX_VOLUME_BYTES}.
 */
export function parseSize(size: string): number {
  const m = /^(\d{1,16})(Ki|Mi|Gi|Ti|[kKMGT])?$/.exec(size.trim());
  if (!m)
    throw invalidArgument(
      "size",
      `"${size}" is not a size`,
      'use bytes or a unit, e.g. "512Mi", "1Gi", "100M"',
    );
  const bytes = Number(m[1]) * (UNITS[m[2] ?? ""] ?? 1);
  if (bytes < MIN_VOLUME_BYTES) throw invalidArgument("size", `${size} is below the minimum of 16Mi`);
  if (bytes > MAX_VOLUME_BYTES) throw invalidArgument("size", `${size} is above the maximum of 16Ti`);
  return bytes;
}

/** validateVolumeName throws CAPSULE_INVALID_ARGUMENT unless `name` is a DNS label, like a workload name. */
export function validateVolumeName(name: string): void {
  if (!WORKLOAD_NAME.test(name))
    throw invalidArgument(
      "name",
      `"${name}" is not a volume name`,
      "use a DNS label: a-z, 0-9, '-', at most 63",
    );
}

/** BackendChoice is what {@link detectBackend} found, with the reason in words for the log. */
export interface BackendChoice {
  backend: VolumeBackend;
  /** thinPool is "VG/POOL" when backend is lvm-thin, else undefined. */
  thinPool: string | undefined;
  reason: string;
}

/**
 * detectBackend decides the backend of new volumes: `lvm-thin` when `thinPool` ("VG/POOL") is
 * set and `lvs` shows it as a thin pool, else `loop-ext4`. Read-only; a missing `lvs` or pool
 * is not an error, it is the reason for the fallback.
 */
export async function detectBackend(
  runner: CommandRunner,
  thinPool: string | undefined,
): Promise<BackendChoice> {
  if (!thinPool) return { backend: "loop-ext4", thinPool: undefined, reason: "no LVM thin pool configured" };
  if (!/^[A-Za-z0-9+_.-]+\/[A-Za-z0-9+_.-]+$/.test(thinPool))
    throw invalidArgument("thinPool", `"${thinPool}" is not VG/POOL`);
  const r = await runner.run(["lvs", "--noheadings", "-o", "lv_attr", thinPool], { allowFailure: true });
  const attr = r.stdout.trim();
  if (r.exitCode !== 0)
    return {
      backend: "loop-ext4",
      thinPool: undefined,
      reason: `lvs ${thinPool} failed (${(r.stderr || "lvs not found").trim().split("\n")[0]})`,
    };
  if (!attr.startsWith("t"))
    return {
      backend: "loop-ext4",
      thinPool: undefined,
      reason: `${thinPool} is not a thin pool (lv_attr ${attr})`,
    };
  return { backend: "lvm-thin", thinPool, reason: `thin pool ${thinPool}` };
}

/** VolumeInfo is one volume as listed. `device` and `usedBy` are undefined when the volume is free. */
export interface VolumeInfo {
  name: string;
  sizeBytes: number;
  backend: VolumeBackend;
  /** path is the image file (loop-ext4) or the LV device path (lvm-thin). */
  path: string;
  /** device is the block device while mounted ("/dev/loop3"); undefined when not attached. */
  device: string | undefined;
  /** usedBy is the workload holding the volume; undefined when free. */
  usedBy: string | undefined;
  createdAt: string;
}

/** LoopVolumesOptions: `store`, `runner`, `stateDir` are required; the rest optional. */
export interface LoopVolumesOptions {
  store: Store;
  /** runner runs losetup, mkfs.ext4, mount and friends in the host's mount namespace. */
  runner: CommandRunner;
  /** stateDir is capsuled's state dir; volumes live in `<stateDir>/volumes`. */
  stateDir: string;
  /** thinPool is an LVM thin pool "VG/POOL" for new volumes; unset = loop files only. */
  thinPool?: string;
  /** now is the clock for created_at; unset = the system clock. */
  now?: () => Date;
}

interface Row {
  name: string;
  size_bytes: number;
  backend: VolumeBackend;
  path: string;
  used_by: string | null;
  created_at: string;
}

/**
 * LoopVolumes is the {@link VolumeAttacher}: create/list/delete for the API, attach/detach/check
 * for the workload manager, adopt at start. Mutations are serialized in one queue. Call
 * {@link LoopVolumes.start} once before anything else.
 */
export class LoopVolumes implements VolumeAttacher {
  private readonly store: Store;
  private readonly runner: CommandRunner;
  private readonly dir: string;
  private readonly thinPool: string | undefined;
  private readonly now: () => Date;
  private choice: BackendChoice = { backend: "loop-ext4", thinPool: undefined, reason: "not started" };
  /** devices maps an attached volume to its block device; rebuilt by adopt. */
  private readonly devices = new Map<string, string>();
  private queue: Promise<unknown> = Promise.resolve();

  constructor(opts: LoopVolumesOptions) {
    this.store = opts.store;
    this.runner = opts.runner;
    this.dir = join(opts.stateDir, "volumes");
    this.thinPool = opts.thinPool;
    this.now = opts.now ?? (() => new Date());
  }

  /** backend is the choice for new volumes made by {@link start}, with its reason. */
  get backend(): BackendChoice {
    return this.choice;
  }

  /** mountPath is where volume `name` is mounted while attached. Pure. */
  mountPath(name: string): string {
    return join(this.dir, "mnt", name);
  }

  /** start detects the backend for new volumes and runs {@link adopt}; returns what adopt changed. */
  async start(): Promise<string[]> {
    this.choice = await detectBackend(this.runner, this.thinPool);
    return this.adopt();
  }

  private serial<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.queue.then(fn);
    this.queue = run.catch(() => undefined);
    return run;
  }

  private row(name: string): Row | undefined {
    return this.store.db
      .prepare("SELECT name, size_bytes, backend, path, used_by, created_at FROM volumes WHERE name = ?")
      .get(name) as Row | undefined;
  }

  private rows(): Row[] {
    return this.store.db
      .prepare("SELECT name, size_bytes, backend, path, used_by, created_at FROM volumes ORDER BY name")
      .all() as Row[];
  }

  private setUsedBy(name: string, workload: string | null): void {
    this.store.db.prepare("UPDATE volumes SET used_by = ? WHERE name = ?").run(workload, name);
  }

  private info(r: Row): VolumeInfo {
    return {
      name: r.name,
      sizeBytes: r.size_bytes,
      backend: r.backend,
      path: r.path,
      device: this.devices.get(r.name),
      usedBy: r.used_by ?? undefined,
      createdAt: r.created_at,
    };
  }

  /**
   * create makes volume `name` of `size` ("1Gi", "512Mi", "100M", bytes) with an ext4
   * filesystem, on the backend {@link start} chose. Not idempotent: an existing name is
   * CAPSULE_ALREADY_EXISTS. On failure nothing is left behind.
   */
  async create(name: string, size: string): Promise<VolumeInfo> {
    validateVolumeName(name);
    const bytes = parseSize(size);
    return this.serial(async () => {
      if (this.row(name))
        throw new CapsuleError(ErrorCode.AlreadyExists, `volume ${name} already exists`, {
          hint: "pick another name, or delete the volume first",
        });
      const { backend, thinPool } = this.choice;
      await this.runner.run(["mkdir", "-p", "-m", "700", this.dir]);
      let path: string;
      let undo: string[];
      if (backend === "lvm-thin" && thinPool) {
        const vg = thinPool.split("/")[0]!;
        path = `/dev/${vg}/capsule-${name}`;
        await this.runner.run(["lvcreate", "-q", "-T", thinPool, "-V", `${bytes}b`, "-n", `capsule-${name}`]);
        undo = ["lvremove", "-q", "-y", `${vg}/capsule-${name}`];
      } else {
        path = join(this.dir, `${name}.img`);
        // A leftover image of an interrupted create has no row, so nothing refers to it.
        await this.runner.run(["rm", "-f", path]);
        await this.runner.run(["truncate", "-s", String(bytes), path]);
        undo = ["rm", "-f", path];
      }
      try {
        await this.runner.run(["mkfs.ext4", "-q", "-F", "-L", name.slice(0, 16), path], {
          timeoutMs: 300_000,
        });
        this.store.db
          .prepare(
            "INSERT INTO volumes(name, size_bytes, backend, path, used_by, created_at) VALUES (?, ?, ?, ?, NULL, ?)",
          )
          .run(name, bytes, backend, path, this.now().toISOString());
      } catch (e) {
        await this.runner.run(undo, { allowFailure: true });
        throw e;
      }
      return this.info(this.row(name)!);
    });
  }

  /** list returns every volume, sorted by name. Read-only. */
  list(): VolumeInfo[] {
    return this.rows().map((r) => this.info(r));
  }

  /** get returns volume `name`, or undefined. Read-only. */
  get(name: string): VolumeInfo | undefined {
    const r = this.row(name);
    return r && this.info(r);
  }

  /**
   * delete removes volume `name` and its data. Idempotent: a missing volume returns false.
   * Refuses with CAPSULE_FAILED_PRECONDITION while a workload holds it.
   */
  delete(name: string): Promise<boolean> {
    return this.serial(async () => {
      const r = this.row(name);
      if (!r) return false;
      if (r.used_by)
        throw new CapsuleError(
          ErrorCode.FailedPrecondition,
          `volume ${name} is in use by workload ${r.used_by}`,
          {
            hint: `stop or delete workload ${r.used_by} first (capsulectl workload stop ${r.used_by})`,
            details: { workload: r.used_by },
          },
        );
      if (await this.mountedDevice(name))
        throw new CapsuleError(ErrorCode.FailedPrecondition, `volume ${name} is still mounted`, {
          hint: `something outside capsule mounted ${this.mountPath(name)}; unmount it first`,
        });
      if (r.backend === "lvm-thin") {
        const vg = r.path.split("/")[2]!;
        await this.runner.run(["lvremove", "-q", "-y", `${vg}/capsule-${name}`]);
      } else {
        for (const dev of await this.loopsOf(r.path)) await this.runner.run(["losetup", "-d", dev]);
        await this.runner.run(["rm", "-f", r.path]);
      }
      await this.runner.run(["rmdir", this.mountPath(name)], { allowFailure: true });
      this.store.db.prepare("DELETE FROM volumes WHERE name = ?").run(name);
      this.devices.delete(name);
      return true;
    });
  }

  /**
   * check is attach's validation without side effects: CAPSULE_NOT_FOUND for a missing volume,
   * CAPSULE_FAILED_PRECONDITION when another workload holds it. Passes for the holder itself.
   */
  check(name: string, workload: string): void {
    const r = this.row(name);
    if (!r)
      throw new CapsuleError(ErrorCode.NotFound, `volume ${name} does not exist`, {
        hint: `create it: capsulectl volume create ${name} --size 1Gi`,
      });
    if (r.used_by && r.used_by !== workload)
      throw new CapsuleError(
        ErrorCode.FailedPrecondition,
        `volume ${name} is in use by workload ${r.used_by}`,
        {
          hint: `a volume is mounted by one workload at a time; stop or delete workload ${r.used_by} first`,
          details: { workload: r.used_by },
        },
      );
  }

  /**
   * attach records `workload` as the holder of volume `name`, mounts it and returns the mount
   * directory to bind-mount. Idempotent for the same workload (an existing mount is reused);
   * errors as {@link check}. On a failed mount the claim and any new loop device are undone.
   */
  attach(name: string, workload: string): Promise<string> {
    return this.serial(async () => {
      this.check(name, workload);
      const r = this.row(name)!;
      const mnt = this.mountPath(name);
      const claimed = r.used_by === null;
      if (claimed) this.setUsedBy(name, workload);
      const mounted = await this.mountedDevice(name);
      if (mounted) {
        this.devices.set(name, mounted);
        return mnt;
      }
      let device = r.path;
      let newLoop = false;
      try {
        await this.runner.run(["mkdir", "-p", mnt]);
        if (r.backend === "loop-ext4") {
          const loops = await this.loopsOf(r.path);
          if (loops[0]) device = loops[0];
          else {
            device = (await this.runner.run(["losetup", "--find", "--show", r.path])).stdout.trim();
            newLoop = true;
          }
        }
        await this.runner.run(["mount", "-t", "ext4", "-o", "nodev,nosuid", device, mnt]);
      } catch (e) {
        if (newLoop) await this.runner.run(["losetup", "-d", device], { allowFailure: true });
        if (claimed) this.setUsedBy(name, null);
        throw e;
      }
      this.devices.set(name, device);
      return mnt;
    });
  }

  /**
   * attachDevice records microVM workload `workload` as the holder of volume `name` and returns
   * what QEMU opens: the image file (loop-ext4) or the LV (lvm-thin). The volume must not be
   * mounted on the capsule while a guest has it (two kernels on one ext4 corrupt it), so a
   * capsule-side mount or loop device left by the same workload (it was a container) is
   * flushed and released first. Errors as {@link check}.
   */
  attachDevice(name: string, workload: string): Promise<string> {
    return this.serial(async () => {
      this.check(name, workload);
      const r = this.row(name)!;
      await this.release(r);
      if (r.used_by === null) this.setUsedBy(name, workload);
      return r.path;
    });
  }

  /**
   * detach flushes and unmounts volume `name` (sync, umount, losetup -d) and clears its holder.
   * Idempotent: a missing volume, a free one, or one held by another workload is left as it is.
   */
  detach(name: string, workload: string): Promise<void> {
    return this.serial(async () => {
      const r = this.row(name);
      if (!r || r.used_by !== workload) return;
      await this.release(r);
      this.setUsedBy(name, null);
    });
  }

  private async release(r: Row): Promise<void> {
    const mnt = this.mountPath(r.name);
    if (await this.mountedDevice(r.name)) {
      await this.runner.run(["sync", "-f", mnt]);
      await this.runner.run(["umount", mnt]);
    }
    if (r.backend === "loop-ext4")
      for (const dev of await this.loopsOf(r.path)) await this.runner.run(["losetup", "-d", dev]);
    this.devices.delete(r.name);
  }

  /**
   * adopt reconciles the records with the host after a (re)start: a held volume that is mounted
   * stays mounted (its device is found with findmnt / `losetup -j`), loop devices of a volume
   * that is not mounted are detached (leaks of an interrupted attach; the next attach makes a
   * new one), and a volume mounted with no holder on record is unmounted. Idempotent. Returns
   * a line per change, for the log.
   */
  adopt(): Promise<string[]> {
    return this.serial(async () => {
      const changes: string[] = [];
      this.devices.clear();
      for (const r of this.rows()) {
        const mounted = await this.mountedDevice(r.name);
        if (mounted && !r.used_by) {
          await this.release(r);
          changes.push(`volume ${r.name}: unmounted (no workload holds it)`);
          continue;
        }
        if (mounted) this.devices.set(r.name, mounted);
        if (r.backend !== "loop-ext4") continue;
        for (const dev of await this.loopsOf(r.path)) {
          if (dev === mounted) continue;
          await this.runner.run(["losetup", "-d", dev]);
          changes.push(`volume ${r.name}: detached stray loop device ${dev}`);
        }
      }
      return changes;
    });
  }

  /** mountedDevice is the source device mounted at the volume's mount path, or undefined. */
  private async mountedDevice(name: string): Promise<string | undefined> {
    const r = await this.runner.run(
      ["findmnt", "-rn", "-o", "SOURCE", "--mountpoint", this.mountPath(name)],
      {
        allowFailure: true,
      },
    );
    if (r.exitCode !== 0) return undefined;
    return r.stdout.trim().split("\n")[0] || undefined;
  }

  /** loopsOf lists the loop devices backed by `file` (`losetup -j`), in device order. */
  private async loopsOf(file: string): Promise<string[]> {
    const r = await this.runner.run(["losetup", "-j", file]);
    return parseLosetupJ(r.stdout);
  }
}

/**
 * parseLosetupJ parses `losetup -j FILE` output ("/dev/loop3: [2049]:1234 (/path)" per line)
 * into device paths, sorted. Pure.
 */
export function parseLosetupJ(out: string): string[] {
  const devs: string[] = [];
  for (const line of out.split("\n")) {
    const m = /^(\/dev\/loop\d+):/.exec(line.trim());
    if (m?.[1]) devs.push(m[1]);
  }
  return devs.sort((a, b) => Number(a.slice(9)) - Number(b.slice(9)));
}
