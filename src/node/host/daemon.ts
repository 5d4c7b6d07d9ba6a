/**
 * Daemon: the lifecycle shared by capsuled's detached daemons (containerd, an edge's Caddy).
 *
 * Such a daemon runs in its own session and outlives capsuled. A starting capsuled adopts one
 * that answers; it starts one only when none answers, waits for one of ours that is still
 * starting, and kills and replaces one of ours that stays silent past the timeout (a hung
 * daemon holds what a new one needs: a database lock, ports, a socket). "Ours" means the pid
 * in the daemon's pid file is alive and its /proc cmdline passes the daemon's own check, so a
 * reused pid is never signalled.
 *
 * The supervisors keep what is theirs (paths, config files, the probe); this module keeps the
 * decisions, the bounded waits and the one-at-a-time queue. It depends on the host seams only,
 * so both the runtime layer and the edge may use it.
 */
import { readFile, rm, writeFile } from "node:fs/promises";
import { CapsuleError, ErrorCode } from "../../errors.js";
import type { Clock } from "./clock.js";
import type { CommandRunner } from "./runner.js";
import type { ProcessSpawner } from "./spawner.js";

/** DaemonSpec describes one daemon instance (one state dir's): how to reach, recognise and start it. */
export interface DaemonSpec {
  /** name is how messages call it ("containerd", "caddy"). */
  name: string;
  /** address is where it answers, for messages (a socket path). */
  address: string;
  /** pidFile holds the pid of the daemon we started; its directory must exist by the spawn (see `prepare`). */
  pidFile: string;
  /** logFile receives the daemon's output; its tail is the hint when the daemon exits at start. */
  logFile: string;
  /** argv starts the daemon. */
  argv: readonly string[];
  /** env is added to the spawner's pinned environment; unset = nothing added. */
  env?: Record<string, string>;
  /** answers probes the daemon (true = it answers at `address`); must not throw. */
  answers: () => Promise<boolean>;
  /** matches tells whether a process with this cmdline (split at NULs) is this daemon, guarding against pid reuse. */
  matches: (cmdline: readonly string[]) => boolean;
  /** prepare runs just before a start (make directories, write the config); unset = nothing. */
  prepare?: () => Promise<void>;
}

/** DaemonStatus is a running daemon as {@link DaemonSupervisor.ensure} found or made it. */
export interface DaemonStatus {
  /** pid is the daemon's pid when known (from the pid file, checked to be ours). */
  pid: number | undefined;
  /** adopted is true when a daemon already answered (or was starting) and was kept. */
  adopted: boolean;
}

/** DaemonSupervisorOptions: all fields are required. */
export interface DaemonSupervisorOptions {
  runner: CommandRunner;
  spawner: ProcessSpawner;
  /** clock paces the bounded waits. */
  clock: Clock;
  /** timeoutMs bounds each wait for a daemon to answer or to exit. */
  timeoutMs: number;
}

/** POLL_MS is how often the bounded waits look again. */
const POLL_MS = 50;

/**
 * DaemonSupervisor adopts, starts and stops detached daemons described by a {@link DaemonSpec}.
 * {@link ensure}, {@link stop} and {@link ourPid} are not queued by themselves: a supervisor
 * built on this one wraps each of its public calls in {@link exclusive}, so that everything one
 * call does (including the supervisor's own steps around these) runs one call at a time.
 */
export class DaemonSupervisor {
  private readonly runner: CommandRunner;
  private readonly spawner: ProcessSpawner;
  private readonly clock: Clock;
  /** timeoutMs bounds each wait for a daemon to answer or to exit. */
  readonly timeoutMs: number;
  private queue: Promise<unknown> = Promise.resolve();

  constructor(opts: DaemonSupervisorOptions) {
    this.runner = opts.runner;
    this.spawner = opts.spawner;
    this.clock = opts.clock;
    this.timeoutMs = opts.timeoutMs;
  }

  /**
   * exclusive runs `fn` after every earlier exclusive call has settled (whether it resolved or
   * threw) and returns its result. Two ensures racing past "nothing answers" would each start
   * a daemon.
   */
  exclusive<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.queue.then(fn, fn);
    this.queue = run.catch(() => undefined);
    return run;
  }

  /**
   * ourPid returns the pid in the spec's pid file when that process is alive and its cmdline
   * `matches`; undefined otherwise (no file, garbage, dead, or a reused pid). Read-only.
   */
  async ourPid(spec: DaemonSpec): Promise<number | undefined> {
    const pid = Number.parseInt(await readFile(spec.pidFile, "utf8").catch(() => ""), 10);
    if (!Number.isInteger(pid) || pid <= 0 || !(await this.spawner.isAlive(pid))) return undefined;
    // The pid may have been reused since: only a process that is our daemon counts.
    const r = await this.runner.run(["cat", `/proc/${pid}/cmdline`], { allowFailure: true });
    return r.exitCode === 0 && spec.matches(r.stdout.split("\0")) ? pid : undefined;
  }

  /**
   * ensure makes the daemon answer. One that answers is adopted untouched; one of ours that is
   * starting is waited for; one of ours silent past the timeout is killed (SIGKILL) and
   * replaced; with none, `prepare` runs, the daemon is started detached with its output to the
   * log file, its pid is written to the pid file (mode 0600) and it is waited for. Throws
   * CAPSULE_COMMAND_FAILED when the new daemon exits at start (the hint has its log's tail),
   * CAPSULE_TIMEOUT when it does not answer in time or a hung one survives SIGKILL. Not queued:
   * see {@link exclusive}.
   */
  async ensure(spec: DaemonSpec): Promise<DaemonStatus> {
    if (await spec.answers()) return { pid: await this.ourPid(spec), adopted: true };

    const old = await this.ourPid(spec);
    if (old !== undefined) {
      if (await this.waitAnswer(spec, old)) return { pid: old, adopted: true };
      // Alive, ours, and silent for the whole timeout: hung.
      await this.kill(spec, old, "KILL");
    }

    await spec.prepare?.();
    const pid = await this.spawner.spawnDetached(spec.argv, {
      logFile: spec.logFile,
      ...(spec.env ? { env: spec.env } : {}),
    });
    await writeFile(spec.pidFile, `${pid}\n`, { mode: 0o600 });
    if (!(await this.waitAnswer(spec, pid))) {
      if (!(await this.spawner.isAlive(pid))) {
        throw new CapsuleError(ErrorCode.CommandFailed, `${spec.name} exited at start`, {
          hint: `see ${spec.logFile}${await logTail(spec.logFile)}`,
          details: { pid },
        });
      }
      throw new CapsuleError(
        ErrorCode.Timeout,
        `${spec.name} (pid ${pid}) did not answer on ${spec.address} within ${this.timeoutMs} ms`,
        { hint: `see ${spec.logFile}`, details: { pid } },
      );
    }
    return { pid, adopted: false };
  }

  /**
   * stop ends the daemon if one of ours runs (SIGTERM, then SIGKILL after the timeout) and
   * removes the pid file. Idempotent: returns false when none of ours was running. Throws
   * CAPSULE_TIMEOUT when it survives SIGKILL. Not queued: see {@link exclusive}.
   */
  async stop(spec: DaemonSpec): Promise<boolean> {
    const pid = await this.ourPid(spec);
    if (pid !== undefined) await this.kill(spec, pid, "TERM");
    await rm(spec.pidFile, { force: true });
    return pid !== undefined;
  }

  /** waitAnswer polls until the daemon answers (true), `pid` dies or the timeout passes (false). */
  private async waitAnswer(spec: DaemonSpec, pid: number): Promise<boolean> {
    const deadline = this.clock.now() + this.timeoutMs;
    for (;;) {
      if (await spec.answers()) return true;
      if (!(await this.spawner.isAlive(pid)) || this.clock.now() >= deadline) return false;
      await this.clock.sleep(POLL_MS);
    }
  }

  /** waitGone polls until `pid` is dead (true) or the timeout passes (false). */
  private async waitGone(pid: number): Promise<boolean> {
    const deadline = this.clock.now() + this.timeoutMs;
    while (await this.spawner.isAlive(pid)) {
      if (this.clock.now() >= deadline) return false;
      await this.clock.sleep(POLL_MS);
    }
    return true;
  }

  /** kill signals `pid` and waits for it to go; a TERM not obeyed in time becomes a KILL. */
  private async kill(spec: DaemonSpec, pid: number, signal: "TERM" | "KILL"): Promise<void> {
    await this.runner.run(["kill", `-${signal}`, String(pid)], { allowFailure: true });
    if (await this.waitGone(pid)) return;
    if (signal === "TERM") return this.kill(spec, pid, "KILL");
    throw new CapsuleError(ErrorCode.Timeout, `${spec.name} (pid ${pid}) survived SIGKILL`, {
      details: { pid },
    });
  }
}

/**
 * logTail is a hint suffix for a daemon that died: ":", a newline and the last 5 lines of `file`;
 * "" when the file is empty or unreadable. Never throws.
 */
export async function logTail(file: string): Promise<string> {
  try {
    const lines = (await readFile(file, "utf8")).trimEnd().split("\n").slice(-5).join("\n");
    return lines ? `:\n${lines}` : "";
  } catch {
    return "";
  }
}
