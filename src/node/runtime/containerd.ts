/**
 * Containerd: capsuled's own containerd, started detached and adopted on restart.
 *
 * Restart safety is the point, as with WireGuard (src/fabric/wg.ts): containerd runs in its own
 * session and outlives capsuled, its shims outlive containerd, and the containers outlive both.
 * A starting capsuled adopts a containerd whose socket answers; it starts one only when none
 * answers, and a containerd that is alive but does not answer within the start timeout is
 * killed and replaced. A restarted containerd reconnects to the running shims by itself, so
 * neither a SIGKILLed capsuled nor a SIGKILLed containerd stops a workload.
 *
 * Everything lives under `<stateDir>/containerd/`: the config (written at each start this
 * module makes), root, state, the log, the pid file, exec FIFOs, and the socket when its path
 * fits a unix socket address (see {@link containerdPaths}). containerd 1.6 still puts shim
 * sockets (`/run/containerd/s/<hash of our address>`) and runc state
 * (`/run/containerd/runc/<namespace>/`) under /run; the hash keeps shim sockets apart, and a
 * capsule with a private /run (the lab's, the root tests') keeps runc state apart too.
 *
 * Every command goes through the CommandRunner and the ProcessSpawner, so an NsRunner/NsSpawner
 * pair runs the same code against a capsule's namespaces from outside (root tests). Files under
 * the state dir (config, pid file) are the exception: both views share it.
 */
import { mkdir, writeFile } from "node:fs/promises";
import { join } from "node:path";
import type { Clock } from "../host/clock.js";
import { DaemonSupervisor, type DaemonSpec } from "../host/daemon.js";
import type { CommandRunner } from "../host/runner.js";
import type { ProcessSpawner } from "../host/spawner.js";
import { type CtrEndpoint, parseTable, type Snapshotter } from "./ctr.js";
import { fallbackSocketDir, socketPathFits } from "../host/socket-path.js";

/** DEFAULT_NAMESPACE is the containerd namespace Capsule's images and containers live in. */
export const DEFAULT_NAMESPACE = "capsule";

/** SOCKET_PATH_MAX (host/socket-path.ts): containerd also listens on `<address>.ttrpc`, so that one must fit. */
export { SOCKET_PATH_MAX } from "../host/socket-path.js";

/** SnapshotterChoice: "auto" takes overlayfs when containerd's overlayfs plugin loaded here, else native. */
export type SnapshotterChoice = "auto" | Snapshotter;

/** ContainerdPaths is where one containerd keeps everything (see {@link containerdPaths}). */
export interface ContainerdPaths {
  /** dir is `<stateDir>/containerd`. */
  dir: string;
  config: string;
  root: string;
  state: string;
  log: string;
  pidFile: string;
  /** fifoDir is where ctr makes exec FIFOs (under the state dir, so ctr and the shim agree whatever /run is). */
  fifoDir: string;
  /** address is the gRPC socket. */
  address: string;
  /** socketDir is set when the socket had to move to /run (the state dir path is too long for one). */
  socketDir: string | undefined;
}

/**
 * containerdPaths lays out one containerd under the state dir (pure). The socket is
 * `<stateDir>/containerd/containerd.sock` unless that path (with containerd's ".ttrpc" sibling)
 * is longer than a unix socket address can be; then it is
 * `/run/capsule-<12 hex of sha256(stateDir)>/containerd.sock`, stable for the state dir and
 * distinct between state dirs, and `socketDir` says so.
 */
export function containerdPaths(stateDir: string): ContainerdPaths {
  const dir = join(stateDir, "containerd");
  let address = join(dir, "containerd.sock");
  let socketDir: string | undefined;
  if (!socketPathFits(`${address}.ttrpc`)) {
    socketDir = fallbackSocketDir(stateDir);
    address = `${socketDir}/containerd.sock`;
  }
  return {
    dir,
    config: join(dir, "config.toml"),
    root: join(dir, "root"),
    state: join(dir, "state"),
    log: join(dir, "containerd.log"),
    pidFile: join(dir, "containerd.pid"),
    fifoDir: join(dir, "fifo"),
    address,
    socketDir,
  };
}

/**
 * DISABLED_PLUGINS are the containerd plugins our config turns off, each for a reason: unused
 * and noisy, writing outside the state dir, or acting behind capsuled's back.
 */
export const DISABLED_PLUGINS: readonly string[] = [
  // Kubernetes' CRI: not used, and it looks for CNI config and binaries on the host.
  "io.containerd.grpc.v1.cri",
  // Would create /opt/containerd on the host.
  "io.containerd.internal.v1.opt",
  // Restarts labelled containers on its own; capsuled is the only supervisor.
  "io.containerd.internal.v1.restart",
  // Snapshotters that cannot work on a plain filesystem (no module, not btrfs/zfs, unconfigured).
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
];

const toml = (s: string) => JSON.stringify(s);

/** renderContainerdConfig is the config.toml of a containerd laid out as `p` (pure, version 2 format). */
export function renderContainerdConfig(p: ContainerdPaths): string {
  return [
    "# Written by capsuled at each containerd start it makes; edits are lost.",
    "version = 2",
    `root = ${toml(p.root)}`,
    `state = ${toml(p.state)}`,
    "disabled_plugins = [",
    ...DISABLED_PLUGINS.map((n) => `  ${toml(n)},`),
    "]",
    "",
    "[grpc]",
    `  address = ${toml(p.address)}`,
    "",
    "[debug]",
    `  level = "info"`,
    "",
  ].join("\n");
}

/** ContainerdOptions: `runner`, `spawner` and `clock` are required; the rest are optional. */
export interface ContainerdOptions {
  runner: CommandRunner;
  spawner: ProcessSpawner;
  /** clock paces the bounded waits (start, stop). */
  clock: Clock;
  /** containerd is the daemon binary; unset = "containerd" from PATH. */
  containerd?: string;
  /** namespace: unset = {@link DEFAULT_NAMESPACE}. */
  namespace?: string;
  /** snapshotter: unset = "auto". */
  snapshotter?: SnapshotterChoice;
  /** timeoutMs bounds waiting for a containerd to answer or to exit; unset = 15000. */
  timeoutMs?: number;
}

/** EnsureContainerdOptions: `stateDir` is required: capsuled's state dir (containerd's goes under it). */
export interface EnsureContainerdOptions {
  stateDir: string;
}

/** ContainerdState is a running containerd as {@link Containerd.ensure} found or made it. */
export interface ContainerdState {
  /** endpoint is what the image store and the container runtime talk to. */
  endpoint: CtrEndpoint;
  paths: ContainerdPaths;
  /** pid is containerd's pid when known (from the pid file, checked to be our containerd). */
  pid: number | undefined;
  /** adopted is true when a containerd already answered and was kept. */
  adopted: boolean;
}

/**
 * Containerd supervises capsuled's containerd: {@link ensure} adopts or starts it,
 * {@link healthy} probes it, {@link stop} ends it. See the module comment for the
 * restart-safety design; the adopt/start/stop lifecycle is {@link DaemonSupervisor}'s.
 */
export class Containerd {
  private readonly runner: CommandRunner;
  private readonly daemon: DaemonSupervisor;
  private readonly bin: string;
  private readonly namespace: string;
  private readonly choice: SnapshotterChoice;

  constructor(opts: ContainerdOptions) {
    this.runner = opts.runner;
    this.daemon = new DaemonSupervisor({
      runner: opts.runner,
      spawner: opts.spawner,
      clock: opts.clock,
      timeoutMs: opts.timeoutMs ?? 15_000,
    });
    this.bin = opts.containerd ?? "containerd";
    this.namespace = opts.namespace ?? DEFAULT_NAMESPACE;
    this.choice = opts.snapshotter ?? "auto";
  }

  /**
   * healthy reports whether a containerd answers on the state dir's socket (`ctr version`).
   * Read-only. A missing socket answers false at once; a present one gets a 1 s connect timeout.
   */
  async healthy(stateDir: string): Promise<boolean> {
    return this.answers(containerdPaths(stateDir).address);
  }

  private async answers(address: string): Promise<boolean> {
    const sock = await this.runner.run(["test", "-S", address], { allowFailure: true });
    if (sock.exitCode !== 0) return false;
    const r = await this.runner.run(["ctr", "-a", address, "--connect-timeout", "1s", "version"], {
      allowFailure: true,
      timeoutMs: 5_000,
    });
    return r.exitCode === 0;
  }

  /** spec is the state dir's containerd for the {@link DaemonSupervisor}: ours when it runs our config. */
  private spec(p: ContainerdPaths): DaemonSpec {
    return {
      name: "containerd",
      address: p.address,
      pidFile: p.pidFile,
      logFile: p.log,
      argv: [this.bin, "--config", p.config],
      answers: () => this.answers(p.address),
      matches: (cmdline) => cmdline.includes(p.config),
      prepare: async () => {
        await mkdir(p.dir, { recursive: true, mode: 0o700 });
        await mkdir(p.fifoDir, { recursive: true, mode: 0o700 });
        if (p.socketDir) await this.runner.run(["mkdir", "-p", "-m", "0700", p.socketDir]);
        await writeFile(p.config, renderContainerdConfig(p), { mode: 0o600 });
      },
    };
  }

  private async snapshotter(address: string): Promise<Snapshotter> {
    if (this.choice !== "auto") return this.choice;
    const r = await this.runner.run(["ctr", "-a", address, "plugins", "ls"]);
    const ok = parseTable(r.stdout).some(
      (p) => p["TYPE"] === "io.containerd.snapshotter.v1" && p["ID"] === "overlayfs" && p["STATUS"] === "ok",
    );
    return ok ? "overlayfs" : "native";
  }

  /**
   * ensure makes a containerd answer for `stateDir` and returns how to reach it. Idempotent and
   * gentle: a containerd that answers is adopted untouched (its config is whatever it started
   * with: a changed config applies at its next start); one that is starting (ours, alive, not
   * yet answering) is waited for; one that stays silent past the timeout is killed and
   * replaced (it holds the metadata database's lock, so a second containerd could not start
   * beside it); with none, one is started detached (own session, output to containerd.log) and
   * waited for. Throws CAPSULE_COMMAND_FAILED when the new containerd exits at start (the hint
   * has its log's tail), CAPSULE_TIMEOUT when it does not answer in time. Calls on one
   * supervisor run one at a time.
   */
  ensure(opts: EnsureContainerdOptions): Promise<ContainerdState> {
    const p = containerdPaths(opts.stateDir);
    return this.daemon.exclusive(async () => {
      const { pid, adopted } = await this.daemon.ensure(this.spec(p));
      return {
        endpoint: {
          address: p.address,
          namespace: this.namespace,
          snapshotter: await this.snapshotter(p.address),
        },
        paths: p,
        pid,
        adopted,
      };
    });
  }

  /**
   * stop ends the state dir's containerd (SIGTERM, then SIGKILL after the timeout) and removes
   * its pid file. Shims and containers keep running (they are not containerd's children); to
   * end them too, remove the containers first. For teardown and tests: capsuled never stops
   * containerd on exit. Idempotent: returns false when no containerd of ours was running.
   */
  stop(opts: EnsureContainerdOptions): Promise<boolean> {
    const spec = this.spec(containerdPaths(opts.stateDir));
    return this.daemon.exclusive(() => this.daemon.stop(spec));
  }
}
