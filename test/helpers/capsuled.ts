import { DAEMON_NODE_FLAGS } from "../../src/node/node-flags.js";
import { type ChildProcess, spawn } from "node:child_process";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { createInterface } from "node:readline";

/** REPO is the repository root (from test/helpers or dist/test/helpers); tests run the built bins from dist/. */
export const REPO = (() => {
  let dir = import.meta.dirname;
  while (!existsSync(join(dir, "package.json"))) dir = dirname(dir);
  return dir;
})();
export const CAPSULED = join(REPO, "dist/src/node/main.js");
export const CAPSULECTL = join(REPO, "dist/src/cli/main.js");

/** Daemon is a capsuled process started by a test. */
export interface Daemon {
  name: string;
  stateDir: string;
  address: string;
  port: number;
  fingerprint: string;
  id: string;
  proc: ChildProcess;
  /** kill sends a signal and waits for the exit (bounded). */
  kill(signal?: NodeJS.Signals): Promise<void>;
}

/** StartOptions: all optional; `stateDir` reuses a directory (restart), `port` pins the port. */
export interface StartOptions {
  name?: string;
  stateDir?: string;
  port?: number;
  args?: string[];
  timeoutMs?: number;
  /** fabric starts the WireGuard fabric (needs a namespace of its own); default off on loopback. */
  fabric?: boolean;
}

/** tempDir makes a temp dir that the caller must remove (see cleanup). */
export function tempDir(prefix = "capsule-test-"): string {
  return mkdtempSync(join(tmpdir(), prefix));
}

/** startDaemon starts capsuled on 127.0.0.1 and resolves once it logged "capsuled started" (bounded wait). */
export function startDaemon(opts: StartOptions = {}): Promise<Daemon> {
  const name = opts.name ?? "t";
  const stateDir = opts.stateDir ?? tempDir();
  const args = [
    CAPSULED,
    "--name",
    name,
    "--state-dir",
    stateDir,
    "--listen",
    `127.0.0.1:${opts.port ?? 0}`,
    "--log-level",
    "info",
    ...(opts.fabric ? [] : ["--no-fabric"]),
    ...(opts.args ?? []),
  ];
  const proc = spawn(process.execPath, [...DAEMON_NODE_FLAGS, ...args], {
    stdio: ["ignore", "pipe", "pipe"],
  });
  let stderr = "";
  proc.stderr?.on("data", (d) => {
    stderr += String(d);
  });
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      proc.kill("SIGKILL");
      reject(new Error(`capsuled did not start within ${opts.timeoutMs ?? 15000} ms: ${stderr}`));
    }, opts.timeoutMs ?? 15000);
    proc.once("exit", (code) => {
      clearTimeout(timer);
      reject(new Error(`capsuled exited with ${code}: ${stderr}`));
    });
    const rl = createInterface({ input: proc.stdout! });
    rl.on("line", (line) => {
      let rec: { msg?: string; listen?: string; fingerprint?: string; id?: string };
      try {
        rec = JSON.parse(line);
      } catch {
        return;
      }
      if (rec.msg !== "capsuled started") return;
      clearTimeout(timer);
      proc.removeAllListeners("exit");
      const port = Number(rec.listen?.split(":").pop());
      resolve({
        name,
        stateDir,
        address: `127.0.0.1:${port}`,
        port,
        fingerprint: rec.fingerprint!,
        id: rec.id!,
        proc,
        kill: (signal: NodeJS.Signals = "SIGTERM") =>
          new Promise<void>((res) => {
            if (proc.exitCode !== null || proc.signalCode !== null) return res();
            const t = setTimeout(() => {
              proc.kill("SIGKILL");
            }, 10_000);
            proc.once("exit", () => {
              clearTimeout(t);
              res();
            });
            proc.kill(signal);
          }),
      });
    });
  });
}

/** removeDir removes a temp dir (ignores a missing one). */
export function removeDir(dir: string): void {
  rmSync(dir, { recursive: true, force: true });
}
