/**
 * HAProxy: an edge's own HAProxy (the public HTTPS port), started detached in master-worker
 * mode, adopted on restart, reloaded seamlessly when its config changes.
 *
 * Lifecycle follows Caddy's (./caddy.ts) through the shared {@link DaemonSupervisor}: HAProxy
 * runs in its own session and outlives capsuled; a starting capsuled adopts a master whose CLI
 * answers, and starts one only when none does. The master is `haproxy -W -S <master.sock> -f
 * haproxy.cfg`; its pid never changes (a reload re-executes it in place), and the config file
 * is the last one applied, so a HAProxy restarted by {@link HaproxySupervisor.watch} comes back
 * with the same routes before capsuled re-applies anything.
 *
 * Apply: the new text is written to haproxy.cfg.new, checked with `haproxy -c -f`, renamed over
 * haproxy.cfg, and the master gets SIGUSR2. With `expose-fd listeners` on the stats socket the
 * new worker takes over the listening sockets, so no connection is refused; the old worker
 * finishes its connections. The reload is confirmed on the master CLI (`show proc`: the reload
 * counter moved and the failed counter did not). Nothing is reloaded when the text equals the
 * file HAProxy runs (the file is the truth: it is only replaced after a successful check).
 *
 * Everything lives under `<stateDir>/haproxy/`: haproxy.cfg, haproxy.log, haproxy.pid,
 * master.sock and stats.sock (under /run/capsule-<hash>/ when the state dir path is too long
 * for a unix socket, like Caddy's admin socket).
 */
import { mkdir, readFile, rename, rm, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { CapsuleError, ErrorCode } from "../errors.js";
import type { Clock } from "../node/host/clock.js";
import { DaemonSupervisor, type DaemonSpec, logTail } from "../node/host/daemon.js";
import type { CommandRunner } from "../node/host/runner.js";
import type { ProcessSpawner } from "../node/host/spawner.js";
import { unixCommand } from "./unix-socket.js";
import { fallbackSocketDir, socketPathFits } from "../node/host/socket-path.js";

/** HaproxyPaths is where one HAProxy keeps everything (see {@link haproxyPaths}). */
export interface HaproxyPaths {
  /** dir is `<stateDir>/haproxy`. */
  dir: string;
  config: string;
  /** next is where a candidate config is written and checked before it replaces `config`. */
  next: string;
  log: string;
  pidFile: string;
  masterSocket: string;
  statsSocket: string;
  /** routesMap is the HTTPS routes map (host -> upstream) the router frontend loads. */
  routesMap: string;
  /** socketDir is set when the sockets had to move to /run (the state dir path is too long). */
  socketDir: string | undefined;
}

/** haproxyPaths lays out one HAProxy under the state dir (pure). */
export function haproxyPaths(stateDir: string): HaproxyPaths {
  const dir = join(stateDir, "haproxy");
  let masterSocket = join(dir, "master.sock");
  let statsSocket = join(dir, "stats.sock");
  let socketDir: string | undefined;
  if (!socketPathFits(masterSocket)) {
    socketDir = fallbackSocketDir(stateDir);
    masterSocket = `${socketDir}/haproxy-master.sock`;
    statsSocket = `${socketDir}/haproxy-stats.sock`;
  }
  return {
    dir,
    config: join(dir, "haproxy.cfg"),
    next: join(dir, "haproxy.cfg.new"),
    log: join(dir, "haproxy.log"),
    pidFile: join(dir, "haproxy.pid"),
    masterSocket,
    statsSocket,
    routesMap: join(dir, "routes.map"),
    socketDir,
  };
}

/** MasterProc is the master CLI's `show proc` reduced to what a reload check needs. */
export interface MasterProc {
  reloads: number;
  failed: number;
  workers: number[];
}

/** parseShowProc reads `show proc` output (HAProxy 2.6). Pure; undefined when there is no master line. */
export function parseShowProc(text: string): MasterProc | undefined {
  let master: { reloads: number; failed: number } | undefined;
  const workers: number[] = [];
  let section = "";
  for (const line of text.split("\n")) {
    if (line.startsWith("# ")) {
      section = line.slice(2).trim();
      continue;
    }
    const m = /^(\d+)\s+(master|worker)\s+(\d+)(?:\s+\[failed:\s*(\d+)\])?/.exec(line);
    if (!m) continue;
    if (m[2] === "master") master = { reloads: Number(m[3]), failed: Number(m[4] ?? 0) };
    else if (section === "workers") workers.push(Number(m[1]));
  }
  return master && { ...master, workers };
}

/** StatRow is one row of `show stat`. */
export interface StatRow {
  proxy: string;
  server: string;
  status: string;
}

/** parseShowStat reads `show stat` CSV (`# pxname,svname,...` header). Pure. */
export function parseShowStat(text: string): StatRow[] {
  const lines = text.split("\n");
  const header = (lines[0] ?? "").replace(/^#\s*/, "").split(",");
  const px = header.indexOf("pxname");
  const sv = header.indexOf("svname");
  const st = header.indexOf("status");
  if (px < 0 || sv < 0 || st < 0) return [];
  return lines
    .slice(1)
    .filter((l) => l.trim() !== "")
    .map((l) => l.split(","))
    .map((f) => ({ proxy: f[px] ?? "", server: f[sv] ?? "", status: f[st] ?? "" }));
}

/** HaproxySupervisorOptions: `stateDir`, `runner`, `spawner`, `clock` are required; the rest optional. */
export interface HaproxySupervisorOptions {
  stateDir: string;
  runner: CommandRunner;
  spawner: ProcessSpawner;
  clock: Clock;
  /** haproxy is the binary; unset = "haproxy" from PATH. */
  haproxy?: string;
  /** timeoutMs bounds each wait (start, reload, exit); unset = 15000. */
  timeoutMs?: number;
  /** command sends one line to a unix socket and returns the answer; unset = {@link unixCommand}. */
  command?: (path: string, command: string, timeoutMs: number) => Promise<string>;
}

/** HaproxyState is a running HAProxy as {@link HaproxySupervisor.ensure} found or made it. */
export interface HaproxyState {
  paths: HaproxyPaths;
  pid: number | undefined;
  adopted: boolean;
}

/** HaproxyApplyResult says what {@link HaproxySupervisor.apply} did. */
export interface HaproxyApplyResult {
  /** changed is true when the config was replaced and HAProxy reloaded. */
  changed: boolean;
}

const CLI_MS = 2_000;
const POLL_MS = 50;

/**
 * HaproxySupervisor adopts/starts/stops an edge's HAProxy and applies its config. Every public
 * call runs one at a time (a reload racing a restart would confuse both).
 */
export class HaproxySupervisor {
  readonly paths: HaproxyPaths;
  private readonly runner: CommandRunner;
  private readonly clock: Clock;
  private readonly daemon: DaemonSupervisor;
  private readonly bin: string;
  private readonly command: (path: string, command: string, timeoutMs: number) => Promise<string>;
  /** reloads counts the reloads this object triggered (for tests and metrics). */
  reloads = 0;

  constructor(opts: HaproxySupervisorOptions) {
    this.paths = haproxyPaths(opts.stateDir);
    this.runner = opts.runner;
    this.clock = opts.clock;
    this.daemon = new DaemonSupervisor({
      runner: opts.runner,
      spawner: opts.spawner,
      clock: opts.clock,
      timeoutMs: opts.timeoutMs ?? 15_000,
    });
    this.bin = opts.haproxy ?? "haproxy";
    this.command = opts.command ?? unixCommand;
  }

  private async showProc(): Promise<MasterProc | undefined> {
    try {
      return parseShowProc(await this.command(this.paths.masterSocket, "show proc", CLI_MS));
    } catch {
      return undefined;
    }
  }

  private spec(initialConfig: () => string): DaemonSpec {
    const p = this.paths;
    return {
      name: "haproxy",
      address: p.masterSocket,
      pidFile: p.pidFile,
      logFile: p.log,
      argv: [this.bin, "-W", "-S", `${p.masterSocket},mode,600`, "-f", p.config],
      answers: async () => (await this.showProc()) !== undefined,
      matches: (cmdline) => cmdline.includes(p.config) && cmdline.includes("-W"),
      prepare: async () => {
        await mkdir(p.dir, { recursive: true, mode: 0o700 });
        if (p.socketDir) await this.runner.run(["mkdir", "-p", "-m", "0700", p.socketDir]);
        // No HAProxy of ours is alive: socket files left here are stale.
        await rm(p.masterSocket, { force: true });
        await rm(p.statsSocket, { force: true });
        // The last applied config is kept: a restart serves the same routes. Only a first start
        // (or a file that no longer checks) gets the initial one.
        // The config loads the routes map: HAProxy refuses to start without the file.
        if ((await readFile(p.routesMap, "utf8").catch(() => undefined)) === undefined)
          await writeFile(p.routesMap, "", { mode: 0o600 });
        const existing = await readFile(p.config, "utf8").catch(() => undefined);
        if (existing === undefined || !(await this.check(p.config))) await this.writeConfig(initialConfig());
      },
    };
  }

  private async writeConfig(text: string): Promise<void> {
    await writeFile(this.paths.next, text, { mode: 0o600 });
    await rename(this.paths.next, this.paths.config);
  }

  private async check(file: string): Promise<boolean> {
    const r = await this.runner.run([this.bin, "-c", "-q", "-f", file], { allowFailure: true });
    return r.exitCode === 0;
  }

  /**
   * ensure makes HAProxy's master answer. Idempotent: one that answers is adopted untouched;
   * with none, it is started detached on the last applied config (or `initialConfig()` when
   * there is none) and waited for. Throws like {@link DaemonSupervisor.ensure}.
   */
  ensure(initialConfig: () => string): Promise<HaproxyState> {
    return this.daemon.exclusive(async () => {
      const s = await this.daemon.ensure(this.spec(initialConfig));
      return { paths: this.paths, ...s };
    });
  }

  /**
   * apply makes HAProxy run `config`. Idempotent: nothing happens when haproxy.cfg already
   * holds it. Otherwise the text is checked (`haproxy -c`; a rejected one throws
   * CAPSULE_INVALID_CONFIG with HAProxy's message and leaves the running config and file
   * untouched), replaces haproxy.cfg and the master reloads (SIGUSR2); the call returns once
   * the master reports the reload done (CAPSULE_COMMAND_FAILED when it reports it failed,
   * CAPSULE_TIMEOUT when it does not report within the timeout). Needs a running master
   * ({@link ensure}); CAPSULE_FAILED_PRECONDITION otherwise.
   */
  apply(config: string): Promise<HaproxyApplyResult> {
    return this.daemon.exclusive(async () => {
      const p = this.paths;
      const current = await readFile(p.config, "utf8").catch(() => undefined);
      const pid = await this.daemon.ourPid(this.spec(() => config));
      if (pid === undefined)
        throw new CapsuleError(ErrorCode.FailedPrecondition, "haproxy is not running", {
          hint: `start the edge first; see ${p.log}`,
        });
      if (current === config) return { changed: false };
      await mkdir(p.dir, { recursive: true, mode: 0o700 });
      await writeFile(p.next, config, { mode: 0o600 });
      const r = await this.runner.run([this.bin, "-c", "-q", "-f", p.next], { allowFailure: true });
      if (r.exitCode !== 0) {
        await rm(p.next, { force: true });
        const why = (r.stderr || r.stdout).trim().split("\n").slice(-3).join(" | ");
        throw new CapsuleError(ErrorCode.InvalidConfig, `haproxy rejected the config: ${why}`, {
          details: { stderr: r.stderr },
        });
      }
      const before = await this.showProc();
      await rename(p.next, p.config);
      await this.runner.run(["kill", "-USR2", String(pid)]);
      this.reloads++;
      try {
        await this.waitReload(before);
      } catch (e) {
        // The file must keep saying what HAProxy runs, or the next apply of the same text
        // would be skipped as "unchanged".
        if (current !== undefined) await writeFile(p.config, current, { mode: 0o600 }).catch(() => undefined);
        throw e;
      }
      return { changed: true };
    });
  }

  /** waitReload polls the master CLI until the reload counter passes `before`'s. */
  private async waitReload(before: MasterProc | undefined): Promise<void> {
    const deadline = this.clock.now() + this.daemon.timeoutMs;
    for (;;) {
      const now = await this.showProc();
      if (now && before && now.failed > before.failed)
        throw new CapsuleError(
          ErrorCode.CommandFailed,
          "haproxy failed to reload (the old config keeps serving)",
          {
            hint: `see ${this.paths.log}${await logTail(this.paths.log)}`,
          },
        );
      if (now && (!before || now.reloads > before.reloads) && now.workers.length > 0) return;
      if (this.clock.now() >= deadline)
        throw new CapsuleError(
          ErrorCode.Timeout,
          `haproxy did not confirm the reload within ${this.daemon.timeoutMs} ms`,
          { hint: `see ${this.paths.log}` },
        );
      await this.clock.sleep(POLL_MS);
    }
  }

  /**
   * applyMap makes the map file `path` and the map HAProxy runs hold exactly `text` (lines
   * `key value`, see planRoutesMap). The file is replaced atomically (a reload or restart loads
   * it); a running HAProxy gets the new contents through its runtime API in one atomic step
   * (`prepare map`, `add map @version` per line, `commit map`), without a reload, so no
   * connection notices. Idempotent: false when the file and the live map already match.
   * A live map that still differs afterwards throws CAPSULE_COMMAND_FAILED.
   */
  applyMap(path: string, text: string): Promise<{ changed: boolean }> {
    return this.daemon.exclusive(async () => {
      const current = await readFile(path, "utf8").catch(() => undefined);
      const live = await this.showMap(path);
      if (current === text && (live === undefined || live === text)) return { changed: false };
      if (current !== text) {
        await writeFile(`${path}.new`, text, { mode: 0o600 });
        await rename(`${path}.new`, path);
      }
      if (live === undefined || live === text) return { changed: true };
      const sock = this.paths.statsSocket;
      const prepared = await this.command(sock, `prepare map ${path}`, CLI_MS);
      const version = /New version created: (\d+)/.exec(prepared)?.[1];
      if (!version)
        throw new CapsuleError(ErrorCode.CommandFailed, `haproxy: prepare map failed: ${prepared.trim()}`);
      const cmds = text
        .split("\n")
        .filter(Boolean)
        .map((l) => `add map @${version} ${path} ${l}`);
      cmds.push(`commit map @${version} ${path}`);
      await this.command(sock, cmds.join("; "), CLI_MS);
      const after = await this.showMap(path);
      if (after !== text)
        throw new CapsuleError(
          ErrorCode.CommandFailed,
          `haproxy: the map ${path} did not take the new routes`,
          {
            hint: `see ${this.paths.log}`,
          },
        );
      return { changed: true };
    });
  }

  /** showMap returns the live map as `key value` lines (sorted), or undefined when HAProxy does not answer. */
  private async showMap(path: string): Promise<string | undefined> {
    let out: string;
    try {
      out = await this.command(this.paths.statsSocket, `show map ${path}`, CLI_MS);
    } catch {
      return undefined;
    }
    if (/Unknown map identifier/i.test(out)) return undefined;
    return out
      .split("\n")
      .map((l) => l.trim().split(/\s+/))
      .filter((f) => f.length >= 3 && f[0]?.startsWith("0x"))
      .map((f) => `${f[1]} ${f.slice(2).join(" ")}\n`)
      .sort()
      .join("");
  }

  /** stats returns `show stat` from the stats socket; [] when HAProxy does not answer. Never throws. */
  async stats(): Promise<StatRow[]> {
    try {
      return parseShowStat(await this.command(this.paths.statsSocket, "show stat", CLI_MS));
    } catch {
      return [];
    }
  }

  /** pid is our running master's pid, or undefined. Read-only. */
  pid(): Promise<number | undefined> {
    return this.daemon.exclusive(() => this.daemon.ourPid(this.spec(() => "")));
  }

  /**
   * stop ends HAProxy (SIGTERM to the master, which stops its workers; SIGKILL after the
   * timeout) and removes its pid file. For teardown and tests: capsuled never stops it on exit.
   * Idempotent: false when none of ours was running.
   */
  stop(): Promise<boolean> {
    return this.daemon.exclusive(() => this.daemon.stop(this.spec(() => "")));
  }

  /**
   * watch checks every `intervalMs` (unset = 3000) that our master is alive and, when it is not,
   * runs {@link ensure} (it comes back on the last applied config). A failed restart is retried
   * after a backoff doubling from 1 s up to `maxBackoffMs` (unset = 60000). Resolves when
   * `signal` aborts; never throws.
   */
  async watch(opts: {
    signal: AbortSignal;
    initialConfig: () => string;
    intervalMs?: number;
    maxBackoffMs?: number;
    onRestart?: () => void;
  }): Promise<void> {
    const interval = opts.intervalMs ?? 3_000;
    const maxBackoff = opts.maxBackoffMs ?? 60_000;
    const spec = this.spec(opts.initialConfig);
    let backoff = 0;
    while (!opts.signal.aborted) {
      await this.clock.sleep(backoff || interval);
      if (opts.signal.aborted) return;
      try {
        if ((await this.daemon.exclusive(() => this.daemon.ourPid(spec))) !== undefined) {
          backoff = 0;
          continue;
        }
        await this.ensure(opts.initialConfig);
        opts.onRestart?.();
        backoff = 0;
      } catch {
        backoff = Math.min(backoff ? backoff * 2 : 1_000, maxBackoff);
      }
    }
  }
}
