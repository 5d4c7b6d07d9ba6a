import type { WorkloadsHandlers } from "../../gen/capsule/v1/Workloads.js";
import { invalidArgument } from "../../errors.js";
import type { Workloads, WorkloadView } from "../workloads/manager.js";
import { needRuntime, type RpcDeps, serverStream, unary } from "./rpc.js";

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
  };
}
