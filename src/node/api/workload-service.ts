import type { ExecInput__Output } from "../../gen/capsule/v1/ExecInput.js";
import type { ExecOutput } from "../../gen/capsule/v1/ExecOutput.js";
import type { WorkloadsHandlers } from "../../gen/capsule/v1/Workloads.js";
import { invalidArgument } from "../../errors.js";
import type { ExecSession } from "../runtime/exec.js";
import type { Workloads, WorkloadView } from "../workloads/manager.js";
import { bidiStream, needRuntime, type RpcDeps, serverStream, unary } from "./rpc.js";

/** WorkloadServiceDeps: `workloads` returns the manager, or undefined while workloads are not available (no fabric, containerd starting). */
export interface WorkloadServiceDeps extends RpcDeps {
  workloads: () => Workloads | undefined;
}

const SVC = "/capsule.v1.Workloads";

const name = (req: { name: string }) => {
  if (!req.name) throw invalidArgument("name", "is required");
  return req.name;
};

const toWire = (v: WorkloadView) => ({ ...v });

/** workloadService builds the handlers of capsule.v1.Workloads (thin: the logic is in src/node/workloads). */
export function workloadService(d: WorkloadServiceDeps): WorkloadsHandlers {
  const w = () => needRuntime(d.workloads());
  return {
    Apply: unary(d, `${SVC}/Apply`, async (req: { manifestsJson: string[]; dryRun: boolean }) => ({
      results: await w().apply(req.manifestsJson ?? [], { dryRun: req.dryRun }),
    })),
    List: unary(d, `${SVC}/List`, async () => ({ workloads: (await w().list()).map(toWire) })),
    Get: unary(d, `${SVC}/Get`, async (req: { name: string }) => toWire(await w().get(name(req)))),
    Start: unary(d, `${SVC}/Start`, async (req: { name: string }) => toWire(await w().start(name(req)))),
    Stop: unary(d, `${SVC}/Stop`, async (req: { name: string }) => toWire(await w().stop(name(req)))),
    Restart: unary(d, `${SVC}/Restart`, async (req: { name: string }) =>
      toWire(await w().restart(name(req))),
    ),
    Delete: unary(d, `${SVC}/Delete`, async (req: { name: string }) => ({
      deleted: await w().delete(name(req)),
    })),
    Logs: serverStream(
      d,
      `${SVC}/Logs`,
      async function* (req: { name: string; follow: boolean; tailLines: number }, _ctx, signal) {
        const logs = w().logs(name(req), { follow: req.follow, tailLines: req.tailLines, signal });
        for await (const s of logs) yield { data: Buffer.from(s) };
      },
    ),
    Exec: unary(d, `${SVC}/Exec`, async (req: { name: string; argv: string[]; timeoutSeconds: number }) => {
      if (!req.argv?.length) throw invalidArgument("argv", "is empty", "give the command after --");
      const r = await w().exec(name(req), req.argv, (req.timeoutSeconds || 60) * 1000);
      return { exitCode: r.exitCode, stdout: Buffer.from(r.stdout), stderr: Buffer.from(r.stderr) };
    }),
    ExecStream: bidiStream(d, `${SVC}/ExecStream`, (input: AsyncIterable<ExecInput__Output>, _ctx, signal) =>
      execStream(w, input, signal),
    ),
  };
}

const size = (rows: number, cols: number) => ({ rows: Math.max(0, rows | 0), cols: Math.max(0, cols | 0) });

/**
 * execStream serves one Workloads/ExecStream: the first message starts the command; the rest
 * (stdin, stdin_closed, resize) are fed to it while its output is sent back, then its exit
 * code. A cancelled call, or a client that goes away, kills the command.
 */
async function* execStream(
  w: () => Workloads,
  input: AsyncIterable<ExecInput__Output>,
  signal: AbortSignal,
): AsyncGenerator<ExecOutput> {
  const it = input[Symbol.asyncIterator]();
  const first = await it.next();
  const start = first.done ? undefined : first.value.start;
  if (!start || first.value?.msg !== "start") {
    throw invalidArgument("start", "the first message must be an ExecStart");
  }
  if (!start.argv?.length) throw invalidArgument("argv", "is empty", "give the command after --");
  const session: ExecSession = await w().execStream(name(start), start.argv, {
    tty: start.tty,
    stdin: start.stdin,
    size: size(start.rows, start.cols),
  });
  const kill = () => void session.kill();
  signal.addEventListener("abort", kill, { once: true });
  // The client's messages are fed to the command while its output flows back; a client that
  // half-closes early only stops feeding it.
  const feed = (async () => {
    for (;;) {
      const m = await it.next();
      if (m.done) return;
      if (m.value.msg === "stdin" && m.value.stdin) await session.write(m.value.stdin);
      else if (m.value.msg === "stdinClosed") await session.closeStdin();
      else if (m.value.msg === "resize" && m.value.resize)
        await session.resize(size(m.value.resize.rows, m.value.resize.cols));
    }
  })();
  // Input after the command ended, or a reset stream, changes nothing any more.
  feed.catch(() => {});
  try {
    for await (const o of session.output) {
      yield o.stream === "stdout" ? { stdout: o.data } : { stderr: o.data };
    }
    yield { exitCode: await session.exit };
  } finally {
    signal.removeEventListener("abort", kill);
    // The caller stopped reading (cancelled, or an error): the command must not outlive it.
    await session.kill();
    await session.exit.catch(() => {});
  }
}
