/**
 * WgClient: the fabric's WireGuard device, kernel or userspace behind one facade.
 *
 * Restart safety is the point of the design. The device (kernel link or wireguard-go process)
 * outlives capsuled: wireguard-go runs detached in its own session, and a starting capsuled
 * adopts a working device instead of recreating it, so a SIGKILLed capsuled never drops the
 * tunnel and a re-apply never resets a session. Only a device that no longer answers (a stale
 * wireguard-go socket, a tun whose process died) is replaced.
 *
 * Every effect goes through the CommandRunner (`ip`, `wg`, `rm`) and the ProcessSpawner, never
 * through this process's own view of /run or the network: wrapped in an NsRunner/NsSpawner the
 * same client drives a capsule's namespaces from outside (root tests). Files under the state dir
 * (the private key, the log, the transient syncconf file) are the exception: both views share it.
 */
import { mkdtemp, readdir, readFile, rm, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { CapsuleError, CommandError, ErrorCode } from "../errors.js";
import type { Clock } from "../node/host/clock.js";
import { logTail } from "../node/host/daemon.js";
import type { CommandRunner, RunResult } from "../node/host/runner.js";
import type { ProcessSpawner } from "../node/host/spawner.js";
import { isWgKey, wgPublicKey } from "./keys.js";
import { parseWgDump, renderWgConfig, type WgDump, type WgInterfaceConfig } from "./wgconf.js";

/** WgMode is how the device is implemented: the kernel module or wireguard-go. */
export type WgMode = "kernel" | "userspace";

/** WgBackendChoice: "auto" tries the kernel and falls back to wireguard-go; the others force one. */
export type WgBackendChoice = "auto" | WgMode;

/** WgClientOptions: `iface`, `stateDir`, `runner`, `spawner` and `clock` are required; the rest are optional. */
export interface WgClientOptions {
  /** iface is the device this client manages (e.g. "capsule0"). */
  iface: string;
  /**
   * stateDir is capsuled's state dir: the file `wg syncconf` reads (it holds the private key) is
   * written in a fresh mode-0700 directory under it and deleted right after.
   */
  stateDir: string;
  runner: CommandRunner;
  spawner: ProcessSpawner;
  /** clock paces the bounded waits (device start, device removal). */
  clock: Clock;
  /** backend: unset = "auto". */
  backend?: WgBackendChoice;
  /** wireguardGo is the wireguard-go binary; unset = "wireguard-go" from PATH. */
  wireguardGo?: string;
  /** socketDir is where wireguard-go puts its UAPI socket; unset = /var/run/wireguard (where `wg` looks). */
  socketDir?: string;
  /** timeoutMs bounds waiting for wireguard-go to answer or a device to go away; unset = 5000. */
  timeoutMs?: number;
}

/** EnsureInterfaceOptions: every field but `iface` is required. */
export interface EnsureInterfaceOptions {
  /** iface, when set, must be the client's own (the device is fixed at construction); a mismatch is CAPSULE_INVALID_ARGUMENT. */
  iface?: string;
  /** listenPort is the UDP port WireGuard listens on. */
  listenPort: number;
  /** privateKeyFile holds the base64 private key (mode 0600, under the state dir). */
  privateKeyFile: string;
  /** logFile receives wireguard-go's output (userspace mode only). */
  logFile: string;
}

/** EnsureResult says how the device is implemented and whether an existing one was adopted. */
export interface EnsureResult {
  mode: WgMode;
  /** adopted is true when a working device was already there and was kept as is. */
  adopted: boolean;
}

/** SyncResult lists what a sync changed; all empty and `changed` false means nothing was run. */
export interface SyncResult {
  changed: boolean;
  /** added, removed and updated are peer public keys. */
  added: string[];
  removed: string[];
  updated: string[];
}

/** Backend is what differs between the two implementations: how a device comes to be and what it leaves behind. */
interface Backend {
  readonly mode: WgMode;
  /** create makes the device and returns once `wg` can configure it; "unsupported" when this host cannot. */
  create(opts: EnsureInterfaceOptions): Promise<"created" | "unsupported">;
  /** cleanup removes what a dead device left (run after its link is gone). Idempotent. */
  cleanup(): Promise<void>;
}

interface Ctx {
  iface: string;
  runner: CommandRunner;
  spawner: ProcessSpawner;
  clock: Clock;
  wireguardGo: string;
  socketPath: string;
  timeoutMs: number;
}

const POLL_MS = 50;
const SYNC_DIR_PREFIX = ".wg-sync-";

/** KernelBackend: `ip link add IFACE type wireguard`. */
class KernelBackend implements Backend {
  readonly mode = "kernel" as const;
  constructor(private readonly c: Ctx) {}

  async create(): Promise<"created" | "unsupported"> {
    const argv = ["ip", "link", "add", "dev", this.c.iface, "type", "wireguard"];
    const r = await this.c.runner.run(argv, { allowFailure: true });
    if (r.exitCode === 0) return "created";
    // No module: iproute2 says "Unknown device type" (or the kernel EOPNOTSUPP).
    if (/Unknown device type|not supported/i.test(r.stderr)) return "unsupported";
    throw new CommandError(argv, r.exitCode, r.stdout, r.stderr);
  }

  async cleanup(): Promise<void> {}
}

/** UserspaceBackend: wireguard-go in the foreground, detached from capsuled. */
class UserspaceBackend implements Backend {
  readonly mode = "userspace" as const;
  /** pid of the wireguard-go this client started, if any (an adopted one is not ours to know). */
  pid: number | undefined;
  constructor(private readonly c: Ctx) {}

  async create(opts: EnsureInterfaceOptions): Promise<"created"> {
    // A killed wireguard-go leaves its socket behind. wireguard-go 0.0.20220316 replaces a dead
    // socket itself, but removing it here keeps the guarantee ours rather than one version's.
    await this.cleanup();
    // -f: without it wireguard-go re-executes itself to daemonize and leaves a zombie behind;
    // we detach it ourselves (own session, output to the log, not waited for).
    const pid = await this.c.spawner.spawnDetached([this.c.wireguardGo, "-f", this.c.iface], {
      logFile: opts.logFile,
      // WG_PROCESS_FOREGROUND=1 although -f already keeps it in the foreground: wireguard-go
      // prints its "you do not need wireguard-go, this kernel supports WireGuard" banner unless
      // it is set, judging by the OS alone (wrong here: no module), which only misleads a reader.
      env: { LOG_LEVEL: "error", WG_PROCESS_FOREGROUND: "1" },
    });
    this.pid = pid;
    const deadline = this.c.clock.now() + this.c.timeoutMs;
    for (;;) {
      // Each probe is bounded by what is left of the wait: a `wg` stuck on a socket that
      // accepts but never answers must not stretch the wait to the runner's default timeout.
      const r = await this.c.runner.run(["wg", "show", this.c.iface, "dump"], {
        allowFailure: true,
        timeoutMs: Math.max(POLL_MS * 4, deadline - this.c.clock.now()),
      });
      if (r.exitCode === 0) return "created";
      if (!(await this.c.spawner.isAlive(pid))) {
        throw new CapsuleError(ErrorCode.CommandFailed, `wireguard-go for ${this.c.iface} exited at start`, {
          hint: `see ${opts.logFile}${await logTail(opts.logFile)}`,
          details: { pid },
        });
      }
      if (this.c.clock.now() >= deadline) {
        throw new CapsuleError(
          ErrorCode.Timeout,
          `wireguard-go for ${this.c.iface} (pid ${pid}) did not answer on ${this.c.socketPath} within ${this.c.timeoutMs} ms`,
          { hint: `see ${opts.logFile}`, details: { pid } },
        );
      }
      await this.c.clock.sleep(POLL_MS);
    }
  }

  async cleanup(): Promise<void> {
    await this.c.runner.run(["rm", "-f", this.c.socketPath]);
  }
}

interface LinkInfo {
  kind: string | undefined;
  up: boolean;
}

/** The first line of `wg show IFACE dump`: the interface's own private key and port. */
function dumpHead(text: string): { privateKey: string; listenPort: number } {
  const head = (text.split("\n")[0] ?? "").split("\t");
  return { privateKey: head[0] ?? "", listenPort: Number(head[2] ?? 0) };
}

// AllowedIPs as the kernel keeps them: host bits masked, bare addresses as /32 (or /128).
function normPrefix(p: string): string {
  const [ip = "", len] = p.trim().split("/");
  if (!ip.includes(".")) return `${ip.toLowerCase()}/${len ?? 128}`;
  const bits = Number(len ?? 32);
  const n = ip.split(".").reduce((a, o) => ((a << 8) | Number(o)) >>> 0, 0);
  const m = bits === 0 ? 0 : (n & ((0xffffffff << (32 - bits)) >>> 0)) >>> 0;
  return `${[m >>> 24, (m >>> 16) & 255, (m >>> 8) & 255, m & 255].join(".")}/${bits}`;
}

const sameSet = (a: readonly string[], b: readonly string[]) => {
  const x = new Set(a.map(normPrefix));
  const y = new Set(b.map(normPrefix));
  return x.size === y.size && [...x].every((v) => y.has(v));
};

/**
 * diffConfig compares the running device (`wg show IFACE dump`) with a desired configuration
 * (pure). An unset endpoint in the configuration matches whatever the device learned (roaming,
 * a peer behind NAT); a set one must match exactly, so a hostname endpoint always counts as a
 * change (wg resolves it on every sync, as wg-quick does). Preshared keys and fwmark are not
 * managed and not compared.
 */
export function diffConfig(dumpText: string, c: WgInterfaceConfig): SyncResult {
  const cur = parseWgDump(dumpText);
  const head = dumpHead(dumpText);
  const running = new Map(cur.peers.map((p) => [p.publicKey, p]));
  const want = new Set(c.peers.map((p) => p.publicKey));
  const added: string[] = [];
  const updated: string[] = [];
  for (const p of c.peers) {
    const r = running.get(p.publicKey);
    if (!r) {
      added.push(p.publicKey);
      continue;
    }
    const same =
      sameSet(p.allowedIps, r.allowedIps) &&
      (p.persistentKeepalive || undefined) === r.persistentKeepalive &&
      (p.endpoint === undefined || p.endpoint === r.endpoint);
    if (!same) updated.push(p.publicKey);
  }
  const removed = cur.peers.map((p) => p.publicKey).filter((k) => !want.has(k));
  const ifaceChanged = head.privateKey !== c.privateKey || head.listenPort !== c.listenPort;
  return {
    changed: ifaceChanged || added.length + removed.length + updated.length > 0,
    added,
    removed,
    updated,
  };
}

function validateConfig(c: WgInterfaceConfig): void {
  const bad = (m: string) => new CapsuleError(ErrorCode.InvalidConfig, `WireGuard configuration: ${m}`);
  if (!isWgKey(c.privateKey)) throw bad("the private key is not a WireGuard key");
  if (!Number.isInteger(c.listenPort) || c.listenPort < 1 || c.listenPort > 65535)
    throw bad(`listen port ${c.listenPort} is not a port`);
  // WireGuard silently drops a peer with the device's own key; each sync would then "add" it again.
  const seen = new Set<string>([wgPublicKey(c.privateKey)]);
  for (const p of c.peers) {
    if (!isWgKey(p.publicKey)) throw bad(`peer key "${p.publicKey}" is not a WireGuard key`);
    if (seen.has(p.publicKey)) throw bad(`peer ${p.publicKey} is listed twice or is this device's own key`);
    seen.add(p.publicKey);
    // Anything else would be a line the config parser reads differently than we meant.
    for (const v of [...p.allowedIps, p.endpoint ?? ""])
      if (/[\s,=#[\]]/.test(v.replace(/^\[[0-9a-fA-F:.]+\]/, "")))
        throw bad(`peer ${p.publicKey}: "${v}" is not an address`);
  }
}

/**
 * WgClient manages one WireGuard device: create or adopt it, sync its peers, read its state,
 * remove it. Calls on one client run one at a time. See the module comment for why it adopts
 * rather than recreates.
 */
export class WgClient {
  private readonly c: Ctx;
  private readonly choice: WgBackendChoice;
  private readonly stateDir: string;
  private readonly kernel: KernelBackend;
  private readonly userspace: UserspaceBackend;
  private kernelUnsupported = false;
  private current: WgMode | undefined;
  private queue: Promise<unknown> = Promise.resolve();

  constructor(opts: WgClientOptions) {
    if (!/^[A-Za-z0-9_.=+-]{1,15}$/.test(opts.iface) || opts.iface === "." || opts.iface === "..") {
      throw new CapsuleError(ErrorCode.InvalidArgument, `"${opts.iface}" is not an interface name`, {
        hint: "use at most 15 letters, digits, '-', '_' or '.'",
      });
    }
    this.c = {
      iface: opts.iface,
      runner: opts.runner,
      spawner: opts.spawner,
      clock: opts.clock,
      wireguardGo: opts.wireguardGo ?? "wireguard-go",
      socketPath: `${opts.socketDir ?? "/var/run/wireguard"}/${opts.iface}.sock`,
      timeoutMs: opts.timeoutMs ?? 5_000,
    };
    this.choice = opts.backend ?? "auto";
    this.stateDir = opts.stateDir;
    this.kernel = new KernelBackend(this.c);
    this.userspace = new UserspaceBackend(this.c);
  }

  /** iface is the device this client manages. */
  get iface(): string {
    return this.c.iface;
  }

  /** mode is how the device is implemented, once {@link ensureInterface} has run; unset before. */
  get mode(): WgMode | undefined {
    return this.current;
  }

  private exclusive<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.queue.then(fn, fn);
    this.queue = run.catch(() => undefined);
    return run;
  }

  private async link(): Promise<LinkInfo | undefined> {
    const argv = ["ip", "-d", "-json", "link", "show", "dev", this.c.iface];
    const r = await this.c.runner.run(argv, { allowFailure: true });
    if (r.exitCode !== 0) {
      if (/does not exist|Cannot find device/i.test(r.stderr)) return undefined;
      throw new CommandError(argv, r.exitCode, r.stdout, r.stderr);
    }
    const l = (JSON.parse(r.stdout || "[]") as { flags?: string[]; linkinfo?: { info_kind?: string } }[])[0];
    if (!l) return undefined;
    return { kind: l.linkinfo?.info_kind, up: !!l.flags?.includes("UP") };
  }

  private tryDump(): Promise<RunResult> {
    return this.c.runner.run(["wg", "show", this.c.iface, "dump"], { allowFailure: true });
  }

  private async create(opts: EnsureInterfaceOptions): Promise<WgMode> {
    if (this.choice !== "userspace" && !this.kernelUnsupported) {
      if ((await this.kernel.create()) === "created") return "kernel";
      if (this.choice === "kernel") {
        throw new CapsuleError(ErrorCode.Unsupported, "this kernel has no WireGuard module", {
          hint: "load it (modprobe wireguard) or let capsuled use wireguard-go",
        });
      }
      // Remembered: the module does not appear while we run, and each probe is a failed command.
      this.kernelUnsupported = true;
    }
    await this.userspace.create(opts);
    return "userspace";
  }

  /**
   * ensureInterface makes the device exist, be up, and listen on `listenPort` with the key in
   * `privateKeyFile`. Idempotent, and gentle: a working device (a kernel link, or a tun whose
   * wireguard-go answers `wg show`) is adopted without restarting it; the key and port are set
   * only when they differ, so sessions survive a re-apply; a device that no longer answers is
   * deleted and started anew. Peers are left alone (see {@link sync}). Throws
   * CAPSULE_FAILED_PRECONDITION when `iface` exists but is not a WireGuard device.
   */
  ensureInterface(opts: EnsureInterfaceOptions): Promise<EnsureResult> {
    return this.exclusive(async () => {
      if (opts.iface !== undefined && opts.iface !== this.c.iface) {
        throw new CapsuleError(
          ErrorCode.InvalidArgument,
          `this WireGuard client manages ${this.c.iface}, not ${opts.iface}`,
        );
      }
      if (!Number.isInteger(opts.listenPort) || opts.listenPort < 1 || opts.listenPort > 65535) {
        throw new CapsuleError(ErrorCode.InvalidArgument, `listen port ${opts.listenPort} is not a port`);
      }
      const key = (await readKeyFile(opts.privateKeyFile)).trim();
      if (!isWgKey(key)) {
        throw new CapsuleError(
          ErrorCode.StateCorrupt,
          `${opts.privateKeyFile} does not hold a WireGuard key`,
        );
      }
      await this.removeStaleSyncDirs();
      const set = [
        "wg",
        "set",
        this.c.iface,
        "listen-port",
        String(opts.listenPort),
        "private-key",
        opts.privateKeyFile,
      ];

      const link = await this.link();
      if (link) {
        const d = await this.tryDump();
        if (d.exitCode === 0) {
          const mode: WgMode = link.kind === "wireguard" ? "kernel" : "userspace";
          const head = dumpHead(d.stdout);
          if (head.privateKey !== key || head.listenPort !== opts.listenPort) await this.c.runner.run(set);
          if (!link.up) await this.c.runner.run(["ip", "link", "set", "dev", this.c.iface, "up"]);
          this.current = mode;
          return { mode, adopted: true };
        }
        if (link.kind !== "wireguard" && link.kind !== "tun") {
          throw new CapsuleError(
            ErrorCode.FailedPrecondition,
            `${this.c.iface} exists and is not a WireGuard device (${link.kind ?? "no kind"})`,
            { hint: `pick another --fabric-iface or delete it (ip link del ${this.c.iface})` },
          );
        }
        // A WireGuard-shaped device nobody answers for: its wireguard-go died or hangs. Deleting
        // the tun makes a hung wireguard-go exit too. A killed wireguard-go's tun can vanish on its
        // own between our look and the delete (seen in CI): that is the outcome we wanted.
        await this.deleteLink();
      }
      const mode = await this.create(opts);
      await this.c.runner.run(set);
      await this.c.runner.run(["ip", "link", "set", "dev", this.c.iface, "up"]);
      this.current = mode;
      return { mode, adopted: false };
    });
  }

  /**
   * sync makes the device's key, port and peer set exactly `config` (full sync, replace
   * semantics): peers not in it are removed, listed peers are added or updated in place, and
   * unchanged peers keep their sessions. Idempotent: when the running device already matches
   * (see {@link diffConfig}) nothing is run but one `wg show`. The file `wg syncconf` reads is
   * mode 0600 in a fresh 0700 directory under the state dir, removed right after (stdin is no
   * option: Node hands a child a socket, not a pipe, and `wg` cannot fopen /dev/stdin on it). Throws
   * CAPSULE_INVALID_CONFIG before any effect when `config` is malformed, CAPSULE_NOT_FOUND when
   * the device does not exist (call {@link ensureInterface} first).
   */
  sync(config: WgInterfaceConfig): Promise<SyncResult> {
    return this.exclusive(async () => {
      validateConfig(config);
      const d = await this.dumpText();
      const diff = diffConfig(d, config);
      if (!diff.changed) return diff;
      const dir = await mkdtemp(join(this.stateDir, SYNC_DIR_PREFIX));
      try {
        const file = join(dir, `${this.c.iface}.conf`);
        await writeFile(file, renderWgConfig(config), { mode: 0o600 });
        await this.c.runner.run(["wg", "syncconf", this.c.iface, file]);
      } finally {
        await rm(dir, { recursive: true, force: true });
      }
      return diff;
    });
  }

  // A capsuled killed in the middle of a sync leaves its syncconf dir behind; the next start removes it.
  private async removeStaleSyncDirs(): Promise<void> {
    const names = await readdir(this.stateDir).catch(() => [] as string[]);
    for (const n of names)
      if (n.startsWith(SYNC_DIR_PREFIX)) await rm(join(this.stateDir, n), { recursive: true, force: true });
  }

  private async dumpText(): Promise<string> {
    const r = await this.tryDump();
    if (r.exitCode !== 0) {
      throw new CapsuleError(ErrorCode.NotFound, `WireGuard device ${this.c.iface} is not running`, {
        hint: "the fabric interface is set up at start; see the capsuled log",
        cause: new CommandError(["wg", "show", this.c.iface, "dump"], r.exitCode, "", r.stderr),
      });
    }
    return r.stdout;
  }

  /** dump returns the device's state (`wg show IFACE dump`, parsed). Read-only. Throws CAPSULE_NOT_FOUND when the device is not running. */
  dump(): Promise<WgDump> {
    return this.exclusive(async () => parseWgDump(await this.dumpText()));
  }

  /** publicKey returns the device's public key. Read-only. Throws CAPSULE_NOT_FOUND when the device is not running, CAPSULE_FAILED_PRECONDITION when it has no key yet. */
  publicKey(): Promise<string> {
    return this.exclusive(async () => {
      const k = parseWgDump(await this.dumpText()).publicKey;
      if (!isWgKey(k)) {
        throw new CapsuleError(ErrorCode.FailedPrecondition, `${this.c.iface} has no private key set`);
      }
      return k;
    });
  }

  /** deleteLink deletes the interface; returns false when it was already gone (not an error). */
  private async deleteLink(): Promise<boolean> {
    const argv = ["ip", "link", "del", "dev", this.c.iface];
    const r = await this.c.runner.run(argv, { allowFailure: true });
    if (r.exitCode !== 0 && !/does not exist|Cannot find device/i.test(r.stderr)) {
      throw new CommandError(argv, r.exitCode, r.stdout, r.stderr);
    }
    return r.exitCode === 0;
  }

  /**
   * remove deletes the device: the kernel link, or wireguard-go's tun (which makes wireguard-go
   * exit), then waits (bounded) until nothing answers for it and removes its socket. For
   * teardown and tests; capsuled never calls it on stop, so workloads keep their fabric.
   * Idempotent: returns false when there was no device.
   */
  remove(): Promise<boolean> {
    return this.exclusive(async () => {
      const deleted = await this.deleteLink();
      const deadline = this.c.clock.now() + this.c.timeoutMs;
      const pid = this.userspace.pid;
      while (
        (await this.tryDump()).exitCode === 0 ||
        (pid !== undefined && (await this.c.spawner.isAlive(pid)))
      ) {
        if (this.c.clock.now() >= deadline) {
          throw new CapsuleError(
            ErrorCode.Timeout,
            `${this.c.iface} still answers ${this.c.timeoutMs} ms after deletion`,
            {
              details: { pid },
            },
          );
        }
        await this.c.clock.sleep(POLL_MS);
      }
      await this.userspace.cleanup();
      this.userspace.pid = undefined;
      this.current = undefined;
      return deleted;
    });
  }
}

async function readKeyFile(path: string): Promise<string> {
  try {
    return await readFile(path, "utf8");
  } catch (e) {
    throw new CapsuleError(ErrorCode.StateCorrupt, `cannot read the WireGuard key ${path}`, {
      cause: e,
      hint: "capsuled writes it at first start under the state dir; check --state-dir",
    });
  }
}
