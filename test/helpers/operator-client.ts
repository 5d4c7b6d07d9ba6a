/**
 * operatorDialer: for scripts run inside the lab's operator namespace (test/helpers/rpc-call.ts,
 * bench/workloads-driver.ts), a function that dials context `context` of config dir `dir` as its
 * operator, the way capsulectl does. Exits 2 with a usage line when the context is unknown.
 */
import { RpcClient } from "../../src/api/client.js";
import { loadConfig, loadOperatorKey } from "../../src/cli/config.js";
import { endpointOf } from "../../src/cli/targets.js";

export async function operatorDialer(dir: string, context: string): Promise<() => RpcClient> {
  const ctx = (await loadConfig(dir)).contexts.find((c) => c.name === context);
  if (!ctx) {
    process.stderr.write(`no context ${context}\n`);
    process.exit(2);
  }
  const signer = await loadOperatorKey(dir);
  const endpoint = endpointOf({ name: ctx.name, context: ctx });
  return () => new RpcClient(endpoint, signer);
}
