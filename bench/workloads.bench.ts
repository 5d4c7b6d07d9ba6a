// Workload benchmarks in the lab (needs root), on one home capsule: apply-to-running latency of
// one workload (through `capsulectl apply --wait`, and over one RPC connection), 50 workloads
// applied in one request against 50 × the single figure of the same run, re-adoption of those
// 50 after a capsuled SIGKILL + restart (same pids, no duplicates), and capsuled's and
// containerd's resident memory with the runtime up. RPC timings run in the operator namespace
// through bench/workloads-driver.ts (one client, no process start-up in the figure).
//
// What the figures said on the 2-core lab machine (2026-11-23): creating a workload is about
// 14 short-lived processes (6 ctr at ~11 ms each, 7 ip, and `ctr run` at ~100 ms), so 50 at once
// are bound by process start-up on the CPUs, not by any lock: the reconciler runs 4 workloads
// at a time and nothing else serializes them. Two costs were found and removed: one `ctr images
// ls` per document at apply (a 50-document Apply took 0.93 s, now 0.2 s), and `apply --wait`
// polling every 500 ms (one workload took 0.98 s through the CLI, now 0.56 s). Still open: one
// containers/tasks listing per workload reconcile instead of one per pass, and the shims (one
// containerd-shim-runc-v2 per container, ~2.7 MB PSS each).
import { randomBytes } from "node:crypto";
import { readdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { Lab } from "../lab/lab.js";
import { containerdPaths } from "../src/node/runtime/containerd.js";
import { ctl } from "../test/helpers/fabric.js";
import { buildImageArchive } from "../test/helpers/images.js";
import { waitRuntime } from "../test/helpers/workloads.js";
import type { Row } from "./run.js";

const BENCH = "workloads";
const SINGLE_RUNS = 10;
const BATCH = 50;

const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)] ?? Number.NaN;
};
const ms = (x: number) => `${Math.round(x)} ms`;

/** manifest is a workload that exits at once on SIGTERM (so deletes do not wait out the grace). */
const manifest = (name: string) =>
  JSON.stringify({
    kind: "Workload",
    name,
    container: { image: "demo/bench:1", command: ["sh", "-c", "trap 'exit 0' TERM; sleep 3600 & wait"] },
  });

/** rssKb reads a process's resident set from /proc (kB); NaN when it is gone. */
function rssKb(pid: number): number {
  try {
    return Number(/VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, "utf8"))?.[1] ?? Number.NaN);
  } catch {
    return Number.NaN;
  }
}

/** pssKb reads a process's proportional set size (shared pages split among their users), kB. */
function pssKb(pid: number): number {
  try {
    return Number(
      /^Pss:\s+(\d+) kB/m.exec(readFileSync(`/proc/${pid}/smaps_rollup`, "utf8"))?.[1] ?? Number.NaN,
    );
  } catch {
    return Number.NaN;
  }
}

/** processesMentioning lists live pids whose command line contains `needle`. */
function processesMentioning(needle: string): number[] {
  const out: number[] = [];
  for (const d of readdirSync("/proc")) {
    if (!/^\d+$/.test(d) || Number(d) === process.pid) continue;
    try {
      if (readFileSync(`/proc/${d}/cmdline`, "utf8").split("\0").join(" ").includes(needle))
        out.push(Number(d));
    } catch {}
  }
  return out;
}

const mb = (kb: number) => `${(kb / 1024).toFixed(1)} MB`;

/** run measures the workload figures in a lab of its own (one home, no edge) and always tears it down. */
export async function run(): Promise<Row[]> {
  if (process.getuid?.() !== 0)
    return [{ bench: BENCH, metric: "skipped", value: "requires superuser privileges" }];
  const alphabet = "abcdefghijklmnopqrstuvwxyz0123456789";
  const prefix = `clwl${[...randomBytes(4)].map((b) => alphabet[b % alphabet.length]).join("")}`;
  const lab = new Lab({ prefix, edge: false, homes: 1 });
  const rows: Row[] = [];
  const row = (metric: string, value: string, target?: string, ok?: boolean) => {
    rows.push({ bench: BENCH, metric, value, ...(target ? { target, ok } : {}) });
  };
  const driver = async <T>(args: string[], timeoutMs = 300_000): Promise<T> => {
    const r = await lab.exec(
      "op",
      [
        "env",
        "-u",
        "NODE_OPTIONS",
        lab.plan.nodeBin,
        join(lab.plan.repoDir, "dist/bench/workloads-driver.js"),
        lab.plan.operatorDir,
        "homeA",
        ...args,
      ],
      { timeoutMs },
    );
    if (r.exitCode !== 0) throw new Error(`driver ${args[0]}: ${r.stderr.trim() || r.stdout.trim()}`);
    return JSON.parse(r.stdout) as T;
  };
  try {
    await lab.up();
    const home = lab.capsule("homeA");
    if ((await waitRuntime(lab, "homeA")) < 0) throw new Error("homeA: workload runtime not up");
    const img = await buildImageArchive(lab.plan.labDir, { name: "demo/bench:1" });
    await ctl(lab, ["--capsule", "homeA", "image", "push", img.archive]);

    // (d) idle memory with the runtime up and no workload.
    await new Promise((r) => setTimeout(r, 3_000));
    const capsuledPid = () => Number(readFileSync(home.pidFile, "utf8"));
    const containerdPid = Number(readFileSync(containerdPaths(home.stateDir).pidFile, "utf8"));
    const idleCapsuled = rssKb(capsuledPid());
    const idleContainerd = rssKb(containerdPid);

    // (a) one workload, apply to running: over one RPC connection, then through the CLI.
    const rpcMs: number[] = [];
    for (let i = 0; i < SINGLE_RUNS; i++) {
      rpcMs.push((await driver<{ ms: number }>(["apply-one", manifest(`one-${i}`)])).ms);
      await driver(["delete", `one-${i}`]);
    }
    const cliMs: number[] = [];
    const file = join(lab.plan.labDir, "one.json");
    for (let i = 0; i < SINGLE_RUNS; i++) {
      writeFileSync(file, manifest(`cli-${i}`));
      const t0 = performance.now();
      await ctl(lab, ["--capsule", "homeA", "apply", "-f", file, "--wait"]);
      cliMs.push(performance.now() - t0);
      await driver(["delete", `cli-${i}`]);
    }
    const t0 = performance.now();
    await ctl(lab, ["--capsule", "homeA", "capsule", "info"]);
    const cliFloor = performance.now() - t0;
    const single = median(rpcMs);
    row(
      `apply → running, one workload, over RPC (p50 of ${SINGLE_RUNS}; container started, capsule's event)`,
      ms(single),
    );
    row(
      `apply → running, one workload, \`capsulectl apply --wait\` (p50 of ${SINGLE_RUNS})`,
      ms(median(cliMs)),
    );
    row("`capsulectl capsule info` in the same lab (CLI start-up and one call, for scale)", ms(cliFloor));

    // (b) 50 at once, in one Apply, against 50 × the single figure.
    const names = Array.from({ length: BATCH }, (_, i) => `w${String(i).padStart(2, "0")}`);
    const b = await driver<{ ms: number; applyMs: number }>([
      "apply-batch",
      JSON.stringify(names.map(manifest)),
    ]);
    const batch = b.ms;
    const ratio = batch / (BATCH * single);
    row(`${BATCH} workloads in one apply → all running (wall)`, ms(batch));
    row(`${BATCH} workloads: the Apply call itself (validate, addresses, rows)`, ms(b.applyMs));
    row(`${BATCH} at once / ${BATCH} × one`, ratio.toFixed(2), "< 1", ratio < 1);
    row(`${BATCH} at once: per workload`, ms(batch / BATCH));

    // (d) memory with 50 workloads.
    const sock = containerdPaths(home.stateDir).address;
    const shims = processesMentioning(`-address ${sock}`).filter((p) =>
      readFileSync(`/proc/${p}/cmdline`, "utf8").includes("containerd-shim"),
    );
    const shimKb = shims.reduce((a, p) => a + (rssKb(p) || 0), 0);
    const shimPss = shims.reduce((a, p) => a + (pssKb(p) || 0), 0);
    row(
      "capsuled RSS, runtime up, idle, no workloads",
      mb(idleCapsuled),
      "≤ 100 MB",
      idleCapsuled <= 100 * 1024,
    );
    row("containerd RSS, idle, no workloads (separate process)", mb(idleContainerd));
    row(`capsuled RSS with ${BATCH} workloads`, mb(rssKb(capsuledPid())));
    row(`containerd RSS with ${BATCH} workloads`, mb(rssKb(containerdPid)));
    row(
      `containerd shims with ${BATCH} workloads: count, total RSS, total PSS`,
      `${shims.length}, ${mb(shimKb)}, ${mb(shimPss)}`,
    );

    // (c) capsuled SIGKILL + restart with 50 running: back to all 50 running, same pids.
    const before = await driver<{ workloads: { name: string; pid: number }[] }>(["list"]);
    const pids = Object.fromEntries(before.workloads.map((w) => [w.name, w.pid]));
    const ctrLs = async () =>
      (await lab.exec("homeA", ["ctr", "-a", sock, "-n", "capsule", "containers", "ls", "-q"])).stdout
        .split("\n")
        .filter(Boolean).length;
    const containersBefore = await ctrLs();
    const old = capsuledPid();
    process.kill(old, "SIGKILL");
    while (rssKb(old) > 0) await new Promise((r) => setTimeout(r, 20));
    const k0 = Date.now();
    const waiting = driver<{ ms: number; firstAnswerMs: number }>([
      "wait-running",
      String(k0),
      String(BATCH),
      JSON.stringify(pids),
    ]);
    await lab.up();
    const back = await waiting;
    row(`capsuled SIGKILL + restart → ${BATCH} reported running, same pids`, ms(back.ms));
    row("capsuled SIGKILL + restart → first Workloads/List answer", ms(back.firstAnswerMs));
    // Give the reconciler passes to (wrongly) act, then check nothing moved or doubled.
    await new Promise((r) => setTimeout(r, 6_000));
    const after = await driver<{ workloads: { name: string; pid: number; phase: string }[] }>(["list"]);
    const moved = after.workloads.filter((w) => w.phase !== "running" || pids[w.name] !== w.pid).length;
    const containersAfter = await ctrLs();
    const clean = moved === 0 && containersAfter === containersBefore && containersAfter === BATCH;
    row(
      "after the restart (+6 s): workloads moved or restarted, containers before → after",
      `${moved}, ${containersBefore} → ${containersAfter}`,
      "0, 50 → 50",
      clean,
    );
    return rows;
  } finally {
    await lab.down();
  }
}
