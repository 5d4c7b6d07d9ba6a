import type { PoliciesHandlers } from "../../gen/capsule/v1/Policies.js";
import { invalidArgument } from "../../errors.js";
import type { Policies } from "../policy/manager.js";
import { type RpcDeps, unary } from "./rpc.js";

/** PolicyServiceDeps: `policies` is the manager (it exists on every capsule; without a fabric it stores but does not enforce). */
export interface PolicyServiceDeps extends RpcDeps {
  policies: Policies;
}

const SVC = "/capsule.v1.Policies";

const strings = (field: string, v: unknown): string[] => {
  if (v === undefined || v === null) return [];
  if (!Array.isArray(v) || v.some((x) => typeof x !== "string"))
    throw invalidArgument(field, "must be a list of strings");
  return v as string[];
};

/** policyService builds the handlers of capsule.v1.Policies (thin: the logic is in src/node/policy). */
export function policyService(d: PolicyServiceDeps): PoliciesHandlers {
  const p = d.policies;
  return {
    Apply: unary(
      d,
      `${SVC}/Apply`,
      (req: { manifestsJson: string[]; dryRun: boolean; workloadsJson: string[] }) =>
        p.apply(
          strings("manifests_json", req.manifestsJson),
          req.dryRun === true,
          strings("workloads_json", req.workloadsJson),
        ),
    ),
    Delete: unary(d, `${SVC}/Delete`, async (req: { name: string }) => ({
      deleted: await p.delete(req.name ?? ""),
    })),
    List: unary(d, `${SVC}/List`, () => ({ policies: p.list() })),
    Show: unary(d, `${SVC}/Show`, () => p.show()),
    Explain: unary(d, `${SVC}/Explain`, (req: { src: string; dst: string; port: string }) =>
      p.explain(req.src ?? "", req.dst ?? "", req.port ?? ""),
    ),
    Test: unary(d, `${SVC}/Test`, (req: { manifestsJson: string[]; workloadsJson: string[] }) =>
      p.test(strings("manifests_json", req.manifestsJson), strings("workloads_json", req.workloadsJson)),
    ),
  };
}
