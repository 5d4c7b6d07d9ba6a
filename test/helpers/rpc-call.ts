// Calls one RPC as the operator of a config dir and prints the JSON answer: a test's way to
// reach API methods that have no CLI command (e.g. Fabric/ReserveAddress standing in for a
// workload) from inside the lab's operator namespace.
// Usage: node dist/test/helpers/rpc-call.js CONFIG_DIR CONTEXT SERVICE/METHOD JSON
import { operatorDialer } from "./operator-client.js";

const [dir, context, method, body] = process.argv.slice(2);
if (!dir || !context || !method) {
  process.stderr.write("usage: rpc-call CONFIG_DIR CONTEXT SERVICE/METHOD [JSON]\n");
  process.exit(2);
}
const client = (await operatorDialer(dir, context))();
try {
  const res = await client.call(method, JSON.parse(body ?? "{}"));
  process.stdout.write(`${JSON.stringify(res)}\n`);
  process.exit(0);
} catch (e) {
  process.stderr.write(`${(e as Error).message}\n`);
  process.exit(1);
}
