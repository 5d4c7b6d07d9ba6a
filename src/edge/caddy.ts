/**
 * Caddy: an edge capsule's own Caddy, started detached and adopted on restart, and the applier
 * that keeps its config equal to the planned one.
 *
 * Restart safety follows containerd (src/node/runtime/containerd.ts): Caddy runs in its own
 * session and outlives capsuled, so a SIGKILLed capsuled never takes visitors' traffic down. A
 * starting capsuled adopts a Caddy whose admin socket answers; it starts one only when none
 * answers, and a Caddy of ours that is alive but silent past the start timeout is killed and
 * replaced. Caddy starts from a bootstrap config that sets only the admin socket and storage;
 * {@link CaddyEdge.apply} then loads the planned config through the admin API. Because
 * `admin.config.persist` is off, a restarted Caddy comes back with the bootstrap config, and the
 * applier (which compares with `GET /config/`, not with a cache) loads the routes again.
 *
 * Everything lives under `<stateDir>/caddy/`: bootstrap.json, storage/ (certificates, ACME
 * accounts, the internal CA at storage/pki/authorities/local/root.crt), caddy.log, caddy.pid
 * and the admin socket when its path fits (see {@link caddyPaths}).
 */
import { mkdir, rm, writeFile } from "node:fs/promises";
import { join } from "node:path";
import type { Clock } from "../node/host/clock.js";
import { DaemonSupervisor, type DaemonSpec } from "../node/host/daemon.js";
import type { CommandRunner } from "../node/host/runner.js";
import type { ProcessSpawner } from "../node/host/spawner.js";
import { type CaddyAdmin, UnixCaddyAdmin } from "./admin.js";
import { canonicalJson, type PlanOptions, planCaddyConfig } from "./plan.js";
import { fallbackSocketDir, socketPathFits } from "../node/host/socket-path.js";

/** CaddyPaths is where one Caddy keeps everything (see {@link caddyPaths}). */
export interface CaddyPaths {
  /** dir is `<stateDir>/caddy`. */
  dir: string;
  bootstrap: string;
  storage: string;
  log: string;
  pidFile: string;
  adminSocket: string;
  /** socketDir is set when the socket had to move to /run (the state dir path is too long for one). */
  socketDir: string | undefined;
  /** rootCert is the internal CA's root certificate (exists once Caddy issued with the internal issuer). */
  rootCert: string;
}

/**
 * caddyPaths lays out one Caddy under the state dir (pure). The admin socket is
 * `<stateDir>/caddy/admin.sock` unless that path is too long for a unix socket address; then it
 * is `/run/capsule-<12 hex of sha256(stateDir)>/caddy-admin.sock` and `socketDir` says so.
 */
export function caddyPaths(stateDir: string): CaddyPaths {
  const dir = join(stateDir, "caddy");
  let adminSocket = join(dir, "admin.sock");
  let socketDir: string | undefined;
  if (!socketPathFits(adminSocket)) {
    socketDir = fallbackSocketDir(stateDir);
    adminSocket = `${socketDir}/caddy-admin.sock`;
  }
  const storage = join(dir, "storage");
  return {
    dir,
    bootstrap: join(dir, "bootstrap.json"),
    storage,
    log: join(dir, "caddy.log"),
    pidFile: join(dir, "caddy.pid"),
    adminSocket,
    socketDir,
    rootCert: join(storage, "pki", "authorities", "local", "root.crt"),
  };
}

/** renderBootstrapConfig is the config Caddy starts with: admin socket and storage only (pure). */
export function renderBootstrapConfig(p: CaddyPaths): Record<string, unknown> {
  return {
    admin: { listen: `unix/${p.adminSocket}`, config: { persist: false } },
    storage: { module: "file_system", root: p.storage },
  };
}

/** CaddySupervisorOptions: `runner`, `spawner` and `clock` are required; the rest are optional. */
export interface CaddySupervisorOptions {
  runner: CommandRunner;
  spawner: ProcessSpawner;
  /** clock paces the bounded waits and {@link CaddySupervisor.watch}. */
  clock: Clock;
  /** caddy is the binary; unset = "caddy" from PATH. */
  caddy?: string;
  /** admin makes the admin client for a socket path; unset = {@link UnixCaddyAdmin}. */
  admin?: (socketPath: string) => CaddyAdmin;
  /** timeoutMs bounds waiting for a Caddy to answer or to exit; unset = 15000. */
  timeoutMs?: number;
}

/** EnsureCaddyOptions: `stateDir` is required: capsuled's state dir (Caddy's goes under it). */
export interface EnsureCaddyOptions {
  stateDir: string;
}

/** CaddyState is a running Caddy as {@link CaddySupervisor.ensure} found or made it. */
export interface CaddyState {
  paths: CaddyPaths;
  /** admin talks to this Caddy (the same client across calls for one state dir). */
  admin: CaddyAdmin;
  /** pid is Caddy's pid when known (from the pid file, checked to be our Caddy). */
  pid: number | undefined;
  /** adopted is true when a Caddy already answered and was kept. */
  adopted: boolean;
}

/** WatchOptions: `stateDir` and `signal` are required; the rest are optional. */
export interface WatchOptions {
  stateDir: string;
  /** signal ends the watch. */
  signal: AbortSignal;
  /** onRestart runs after the watch started a new Caddy (re-apply the routes there). Its errors count as a failed restart. */
  onRestart?: (state: CaddyState) => Promise<void>;
  /** intervalMs is how often the pid is checked; unset = 3000. */
  intervalMs?: number;
  /** maxBackoffMs caps the wait between failed restarts (doubling from 1000); unset = 60000. */
  maxBackoffMs?: number;
}

/**
 * CaddySupervisor supervises an edge's Caddy: {@link ensure} adopts or starts it, {@link watch}
 * restarts it when it dies, {@link stop} ends it. See the module comment for the design; the
 * adopt/start/stop lifecycle is {@link DaemonSupervisor}'s.
 */
export class CaddySupervisor {
  private readonly runner: CommandRunner;
  private readonly clock: Clock;
  private readonly daemon: DaemonSupervisor;
  private readonly bin: string;
  private readonly makeAdmin: (socketPath: string) => CaddyAdmin;
  private readonly admins = new Map<string, CaddyAdmin>();

  constructor(opts: CaddySupervisorOptions) {
    this.runner = opts.runner;
    this.clock = opts.clock;
    this.daemon = new DaemonSupervisor({
      runner: opts.runner,
      spawner: opts.spawner,
      clock: opts.clock,
      timeoutMs: opts.timeoutMs ?? 15_000,
    });
    this.bin = opts.caddy ?? "caddy";
    this.makeAdmin = opts.admin ?? ((socketPath) => new UnixCaddyAdmin({ socketPath }));
  }

  private adminFor(p: CaddyPaths): CaddyAdmin {
    let a = this.admins.get(p.adminSocket);
    if (!a) {
      a = this.makeAdmin(p.adminSocket);
      this.admins.set(p.adminSocket, a);
    }
    return a;
  }

  /** spec is the state dir's Caddy for the {@link DaemonSupervisor}: ours when it runs our bootstrap config. */
  private spec(p: CaddyPaths): DaemonSpec {
    return {
      name: "caddy",
      address: p.adminSocket,
      pidFile: p.pidFile,
      logFile: p.log,
      argv: [this.bin, "run", "--config", p.bootstrap],
      // Caddy's defaults for config and data are under $HOME; keep anything it writes in our dir.
      env: { HOME: p.dir, XDG_CONFIG_HOME: join(p.dir, "config"), XDG_DATA_HOME: join(p.dir, "data") },
      answers: () => this.adminFor(p).ping(),
      matches: (cmdline) => cmdline.includes(p.bootstrap),
      prepare: async () => {
        await mkdir(p.dir, { recursive: true, mode: 0o700 });
        await mkdir(p.storage, { recursive: true, mode: 0o700 });
        if (p.socketDir) await this.runner.run(["mkdir", "-p", "-m", "0700", p.socketDir]);
        // No Caddy of ours is alive, so a socket file left here is stale (a SIGKILLed Caddy's).
        await rm(p.adminSocket, { force: true });
        await writeFile(p.bootstrap, `${JSON.stringify(renderBootstrapConfig(p), null, 2)}\n`, {
          mode: 0o600,
        });
      },
    };
  }

  /**
   * ensure makes a Caddy answer on the state dir's admin socket and returns how to reach it.
   * Idempotent: a Caddy that answers is adopted untouched (its routes stay as they are); one of
   * ours that is starting is waited for; one that stays silent past the timeout is killed and
   * replaced (it holds the ports and the socket); with none, one is started detached
   * (`caddy run --config bootstrap.json`, own session, output to caddy.log) and waited for.
   * Throws CAPSULE_COMMAND_FAILED when the new Caddy exits at start (the hint has its log's
   * tail), CAPSULE_TIMEOUT when it does not answer in time. Calls on one supervisor run one at
   * a time.
   */
  ensure(opts: EnsureCaddyOptions): Promise<CaddyState> {
    const p = caddyPaths(opts.stateDir);
    return this.daemon.exclusive(async () => {
      const { pid, adopted } = await this.daemon.ensure(this.spec(p));
      return { paths: p, admin: this.adminFor(p), pid, adopted };
    });
  }

  /** pid is the pid of the state dir's Caddy when one of ours runs, else undefined. Read-only. */
  pid(opts: EnsureCaddyOptions): Promise<number | undefined> {
    const spec = this.spec(caddyPaths(opts.stateDir));
    return this.daemon.exclusive(() => this.daemon.ourPid(spec));
  }

  /**
   * stop ends the state dir's Caddy (SIGTERM, then SIGKILL after the timeout) and removes its
   * pid file. For teardown and tests: capsuled never stops Caddy on exit. Idempotent: returns
   * false when no Caddy of ours was running.
   */
  stop(opts: EnsureCaddyOptions): Promise<boolean> {
    const p = caddyPaths(opts.stateDir);
    return this.daemon.exclusive(async () => {
      const stopped = await this.daemon.stop(this.spec(p));
      await this.admins.get(p.adminSocket)?.close();
      this.admins.delete(p.adminSocket);
      return stopped;
    });
  }

  /**
   * watch checks every `intervalMs` that our Caddy is alive and, when it is not (crashed,
   * killed), runs {@link ensure} and then `onRestart`. A failed restart is retried after a
   * backoff that doubles from 1 s up to `maxBackoffMs` and resets after a success. Resolves when
   * `signal` aborts; never throws. Meant to run for capsuled's lifetime, after a first ensure.
   */
  async watch(opts: WatchOptions): Promise<void> {
    const interval = opts.intervalMs ?? 3_000;
    const maxBackoff = opts.maxBackoffMs ?? 60_000;
    const spec = this.spec(caddyPaths(opts.stateDir));
    let backoff = 0;
    while (!opts.signal.aborted) {
      await this.clock.sleep(backoff || interval);
      if (opts.signal.aborted) return;
      try {
        if ((await this.daemon.exclusive(() => this.daemon.ourPid(spec))) !== undefined) {
          backoff = 0;
          continue;
        }
        const state = await this.ensure({ stateDir: opts.stateDir });
        await opts.onRestart?.(state);
        backoff = 0;
      } catch {
        backoff = Math.min(backoff ? backoff * 2 : 1_000, maxBackoff);
      }
    }
  }
}

/** CaddyEdgeOptions: `admin` and `plan` are required. */
export interface CaddyEdgeOptions {
  admin: CaddyAdmin;
  /** plan is every planning input (fixed for an edge's lifetime). */
  plan: PlanOptions;
}

/** ApplyResult says what {@link CaddyEdge.apply} did. */
export interface ApplyResult {
  /** changed is true when a new config was loaded, false when Caddy already ran the planned one. */
  changed: boolean;
  config: Record<string, unknown>;
}

/**
 * CaddyEdge keeps Caddy's config equal to the edge's plan. The plan does not depend on the
 * routes (Caddy proxies every terminated request to HAProxy's router and obtains certificates on
 * demand for the names the router knows), so route changes never reload Caddy: it is loaded once
 * and again only after a Caddy restart (it then runs its bootstrap config). It compares with
 * what Caddy runs (`GET /config/`), not with a cache.
 */
export class CaddyEdge {
  private readonly admin: CaddyAdmin;
  private readonly plan: PlanOptions;
  private queue: Promise<unknown> = Promise.resolve();

  constructor(opts: CaddyEdgeOptions) {
    this.admin = opts.admin;
    this.plan = opts.plan;
  }

  /**
   * apply makes Caddy run the planned config. Idempotent: when Caddy already runs it nothing is
   * loaded. Validation happens before any call to Caddy (CAPSULE_INVALID_ARGUMENT naming the
   * field); a config Caddy rejects throws CAPSULE_INVALID_CONFIG and Caddy keeps serving the old
   * one. Calls run one at a time.
   */
  apply(): Promise<ApplyResult> {
    const run = this.queue.then(
      () => this.applyNow(),
      () => this.applyNow(),
    );
    this.queue = run.catch(() => undefined);
    return run;
  }

  private async applyNow(): Promise<ApplyResult> {
    const config = planCaddyConfig(this.plan);
    const running = await this.admin.config();
    if (canonicalJson(running) === canonicalJson(config)) return { changed: false, config };
    await this.admin.load(config);
    return { changed: true, config };
  }
}
