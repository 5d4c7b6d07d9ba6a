// The in-namespace half of bench/workloads.bench.ts: run inside the lab's operator namespace
// (where the capsules' API is reachable), it times workload operations with one long-lived
// RpcClient, so the figures carry no process start-up, and prints one JSON line.
//
// Start-to-running is read from the capsule's own event ("container X created (pid N)", written
// when `ctr run` returned), against the wall clock at the Apply: polls (every 100 ms, light on
// the capsule: each costs it two ctr runs) only find that event, they add nothing to the figure.
//
// Usage: node dist/bench/workloads-driver.js CONFIG_DIR CONTEXT MODE ARGS...
//   apply-one MANIFEST_JSON         Apply one workload; wait until it runs: {ms, observedMs, pid}
//   apply-batch MANIFESTS_JSON      Apply them all in one request; wait until all run:
//                                   {ms (last container started), applyMs (the Apply call), observedMs}
//   delete NAME...                  Delete them, 8 at a time: {ms}
//   wait-running T0 N PIDS_JSON     Poll List (through restarts) until N run with exactly these
//                                   pids (name -> pid): {ms since T0, firstAnswerMs}
//   list                            {workloads: [{name, phase, pid}]}
import { operatorDialer } from "../test/helpers/operator-client.js";

interface W {
  name: string;
  phase: string;
  pid: number;
  events: { time: string; type: string; message: string }[];
}

/**
 * startedAt is when the capsule recorded starting the workload's container (ms since the
 * epoch); undefined until it did (containerd may report the task a moment before).
 */
function startedAt(w: W): number | undefined {
  const e = w.events.filter((x) => x.type === "created" && x.message.startsWith("container ")).at(-1);
  return e ? Date.parse(e.time) : undefined;
}

const [dir, context, mode, ...args] = process.argv.slice(2);
if (!dir || !context || !mode) {
  process.stderr.write("usage: workloads-driver CONFIG_DIR CONTEXT MODE ARGS...\n");
  process.exit(2);
}
const connect = await operatorDialer(dir, context);
let client = connect();
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const list = async () => (await client.call<{ workloads: W[] }>("Workloads/List", {})).workloads;

async function main(): Promise<unknown> {
  switch (mode) {
    case "apply-one": {
      const doc = args[0] ?? "";
      const name = (JSON.parse(doc) as { name: string }).name;
      const t0 = Date.now();
      await client.call("Workloads/Apply", { manifestsJson: [doc] });
      for (;;) {
        const w = await client.call<W>("Workloads/Get", { name });
        const at = startedAt(w);
        if (w.phase === "running" && w.pid > 0 && at !== undefined)
          return { ms: at - t0, observedMs: Date.now() - t0, pid: w.pid };
        if (w.phase === "failed" || w.phase === "backoff") throw new Error(`${name} ${w.phase}`);
        await sleep(100);
      }
    }
    case "apply-batch": {
      const docs = JSON.parse(args[0] ?? "[]") as string[];
      const names = new Set(docs.map((d) => (JSON.parse(d) as { name: string }).name));
      const t0 = Date.now();
      await client.call("Workloads/Apply", { manifestsJson: docs }, { deadlineMs: 120_000 });
      const applyMs = Date.now() - t0;
      for (;;) {
        const ws = (await list()).filter((w) => names.has(w.name));
        const at = ws.map(startedAt);
        if (
          ws.length === names.size &&
          ws.every((w) => w.phase === "running" && w.pid > 0) &&
          at.every((x) => x !== undefined)
        )
          return { ms: Math.max(...(at as number[])) - t0, applyMs, observedMs: Date.now() - t0 };
        await sleep(250);
      }
    }
    case "delete": {
      const t0 = performance.now();
      const queue = [...args];
      await Promise.all(
        Array.from({ length: 8 }, async () => {
          for (let n = queue.shift(); n; n = queue.shift())
            await client.call("Workloads/Delete", { name: n }, { deadlineMs: 60_000 });
        }),
      );
      return { ms: performance.now() - t0 };
    }
    case "wait-running": {
      const t0 = Number(args[0]);
      const n = Number(args[1]);
      const pids = JSON.parse(args[2] ?? "{}") as Record<string, number>;
      let firstAnswerMs: number | undefined;
      for (;;) {
        try {
          const ws = await list();
          firstAnswerMs ??= Date.now() - t0;
          const running = ws.filter((w) => w.phase === "running" && w.pid > 0);
          if (running.length === n) {
            const moved = running.filter((w) => pids[w.name] !== w.pid).map((w) => w.name);
            if (moved.length) throw new Error(`not adopted, new pids: ${moved.join(", ")}`);
            return { ms: Date.now() - t0, firstAnswerMs };
          }
        } catch (e) {
          if ((e as Error).message.startsWith("not adopted")) throw e;
          // capsuled restarting, or its runtime not up yet: keep asking, on a fresh channel (a
          // failed one backs off its reconnects for up to seconds, which would be measured).
          client.close();
          client = connect();
        }
        await sleep(50);
      }
    }
    case "list":
      return { workloads: (await list()).map((w) => ({ name: w.name, phase: w.phase, pid: w.pid })) };
    default:
      throw new Error(`unknown mode ${mode}`);
  }
}

try {
  process.stdout.write(`${JSON.stringify(await main())}\n`);
  client.close();
  process.exit(0);
} catch (e) {
  process.stderr.write(`${(e as Error).message}\n`);
  client.close();
  process.exit(1);
}
