// Fan-out cost as the operator sees it: wall time of the real capsulectl asking one capsule
// (`--capsule c1 capsule info`) versus all 20 (`--all capsule info`), 20 capsuled on loopback
// adopted into one config dir. Median of 5 runs each, run alternately so both see the same machine.
import { spawn } from "node:child_process";
import { CAPSULECTL, type Daemon, removeDir, startDaemon, tempDir } from "../test/helpers/capsuled.js";
import type { Row } from "./run.js";

const CAPSULES = 20;
const RUNS = 5;
/** RUN_KILL_MS bounds one capsulectl run. */
const RUN_KILL_MS = 60_000;

/** ctl runs capsulectl against `dir` and resolves with its wall time; a failed run rejects with its stderr. */
function ctl(dir: string, args: string[]): Promise<number> {
  const t0 = process.hrtime.bigint();
  const p = spawn(process.execPath, [CAPSULECTL, "--config-dir", dir, ...args], {
    stdio: ["ignore", "ignore", "pipe"],
  });
  let err = "";
  p.stderr?.on("data", (d) => {
    err += String(d);
  });
  return new Promise((resolve, reject) => {
    const kill = setTimeout(() => p.kill("SIGKILL"), RUN_KILL_MS);
    p.once("close", (code) => {
      clearTimeout(kill);
      const ms = Number(process.hrtime.bigint() - t0) / 1e6;
      if (code === 0) resolve(ms);
      else reject(new Error(`capsulectl ${args.join(" ")}: exit ${code}: ${err.trim()}`));
    });
  });
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)] ?? Number.NaN;
}

export async function run(): Promise<Row[]> {
  const dir = tempDir("capsule-bench-cfg-");
  const started = await Promise.allSettled(
    Array.from({ length: CAPSULES }, (_, i) => startDaemon({ name: `c${i + 1}` })),
  );
  const daemons = started.flatMap((r) => (r.status === "fulfilled" ? [r.value] : [])) as Daemon[];
  try {
    const failed = started.find((r) => r.status === "rejected");
    if (failed) throw (failed as PromiseRejectedResult).reason;
    await Promise.all(daemons.map((d) => ctl(dir, ["adopt", d.address, "--name", d.name, "--yes"])));
    // Warm up both paths once (page cache, JIT of the capsuleds' first authenticated call).
    await ctl(dir, ["--capsule", "c1", "capsule", "info"]);
    await ctl(dir, ["--all", "capsule", "info"]);
    const one: number[] = [];
    const all: number[] = [];
    for (let i = 0; i < RUNS; i++) {
      one.push(await ctl(dir, ["--capsule", "c1", "capsule", "info"]));
      all.push(await ctl(dir, ["--all", "capsule", "info"]));
    }
    const m1 = median(one);
    const mAll = median(all);
    const ratio = mAll / m1;
    return [
      {
        bench: "fanout",
        metric: "capsulectl --capsule c1 capsule info, wall time (median of 5)",
        value: `${m1.toFixed(0)} ms`,
      },
      {
        bench: "fanout",
        metric: `capsulectl --all capsule info over ${CAPSULES}, wall time (median of 5)`,
        value: `${mAll.toFixed(0)} ms`,
      },
      {
        bench: "fanout",
        metric: `--all over ${CAPSULES} / one capsule`,
        value: `${ratio.toFixed(2)}x`,
        target: "≤ 2.0",
        ok: ratio <= 2.0,
      },
    ];
  } finally {
    await Promise.all(daemons.map((d) => d.kill("SIGTERM")));
    for (const d of daemons) removeDir(d.stateDir);
    removeDir(dir);
  }
}
