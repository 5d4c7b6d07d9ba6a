import { spawn } from "node:child_process";
import { closeSync, openSync, readFileSync } from "node:fs";
import { CapsuleError, ErrorCode } from "../../errors.js";

/** SpawnOptions: `logFile` is required (stdout and stderr are appended to it); `env` is optional. */
export interface SpawnOptions {
  /** logFile receives the process's stdout and stderr (appended, created mode 0600). */
  logFile: string;
  /** env is added to a minimal pinned environment (PATH, LC_ALL=C); unset = nothing added. */
  env?: Record<string, string>;
}

/**
 * ProcessSpawner is the seam for long-lived helper processes that must outlive capsuled
 * (wireguard-go): a SIGKILLed capsuled must not take the data path down with it, and the next
 * capsuled adopts what is running. Tests swap in {@link FakeSpawner}.
 */
export interface ProcessSpawner {
  /**
   * spawnDetached starts argv in its own session (so it is its own process group and no
   * signal aimed at capsuled's group reaches it), stdin from /dev/null, output to the log
   * file, and does not keep capsuled's event loop alive. Returns the pid. Not idempotent:
   * every call starts a process; callers check first.
   */
  spawnDetached(argv: readonly string[], opts: SpawnOptions): Promise<number>;
  /** isAlive reports whether `pid` is a running process (a zombie counts as dead). */
  isAlive(pid: number): Promise<boolean>;
}

/** DetachedSpawner is the real {@link ProcessSpawner}, built on node:child_process. */
export class DetachedSpawner implements ProcessSpawner {
  async spawnDetached(argv: readonly string[], opts: SpawnOptions): Promise<number> {
    const [file, ...args] = argv;
    if (!file) throw new CapsuleError(ErrorCode.InvalidArgument, "spawnDetached: empty command");
    const fd = openSync(opts.logFile, "a", 0o600);
    try {
      const child = spawn(file, args, {
        detached: true,
        stdio: ["ignore", fd, fd],
        // Pinned, not inherited: NODE_OPTIONS or a test runner's variables must not leak into
        // a daemon that lives on after us.
        env: { PATH: process.env.PATH ?? "/usr/sbin:/usr/bin:/sbin:/bin", LC_ALL: "C", ...opts.env },
      });
      const pid = await new Promise<number>((resolve, reject) => {
        child.once("error", (e) =>
          reject(
            new CapsuleError(ErrorCode.CommandFailed, `${argv.join(" ")}: ${e.message}`, {
              cause: e,
              details: { argv: [...argv] },
            }),
          ),
        );
        child.once("spawn", () => resolve(child.pid ?? -1));
      });
      // Node still reaps it if it exits while we live (no zombie); unref lets capsuled exit first.
      child.unref();
      return pid;
    } finally {
      closeSync(fd);
    }
  }

  async isAlive(pid: number): Promise<boolean> {
    return DetachedSpawner.isAliveSync(pid);
  }

  /**
   * isAliveSync is {@link isAlive} without the promise. A zombie is dead: a wireguard-go that
   * outlived the capsuled that started it belongs to pid 1, which reaps it when it gets to it.
   */
  static isAliveSync(pid: number): boolean {
    if (!Number.isInteger(pid) || pid <= 0) return false;
    try {
      // /proc/PID/stat: "pid (comm) S ..."; comm may contain spaces and parentheses, so the
      // state is the first field after the last ')'.
      const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
      const state = stat.slice(stat.lastIndexOf(")") + 2, stat.lastIndexOf(")") + 3);
      return state !== "Z" && state !== "X";
    } catch {
      return false;
    }
  }
}

/** FakeSpawnCall is one recorded spawn. */
export interface FakeSpawnCall {
  argv: string[];
  logFile: string;
  env: Record<string, string>;
  pid: number;
}

/**
 * FakeSpawner records every spawn (argv, log file, env) and hands out pids from 1000 up; all
 * of them are alive until {@link FakeSpawner.kill}. `lines` gives canonical text
 * (`spawn [K=V ...] argv...`) for golden tests.
 */
export class FakeSpawner implements ProcessSpawner {
  readonly calls: FakeSpawnCall[] = [];
  private readonly dead = new Set<number>();
  private nextPid = 1000;

  async spawnDetached(argv: readonly string[], opts: SpawnOptions): Promise<number> {
    const pid = this.nextPid++;
    this.calls.push({ argv: [...argv], logFile: opts.logFile, env: { ...opts.env }, pid });
    return pid;
  }

  async isAlive(pid: number): Promise<boolean> {
    return pid >= 1000 && pid < this.nextPid && !this.dead.has(pid);
  }

  /** kill marks a pid dead, as if the process exited. */
  kill(pid: number): void {
    this.dead.add(pid);
  }

  /** lines renders the calls as canonical text, environment first (sorted). */
  get lines(): string[] {
    return this.calls.map((c) => {
      const env = Object.entries(c.env)
        .sort(([a], [b]) => a.localeCompare(b))
        .map(([k, v]) => `${k}=${v}`);
      return ["spawn", ...env, ...c.argv].join(" ");
    });
  }
}
