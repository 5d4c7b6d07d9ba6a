import { join } from "node:path";
import type { Lab } from "../../lab/lab.js";

/** rpc calls SERVICE/METHOD on a lab capsule as its operator (for methods without a CLI command). */
export async function rpc<T>(lab: Lab, capsule: string, method: string, body: object = {}): Promise<T> {
  const script = join(lab.plan.repoDir, "dist/test/helpers/rpc-call.js");
  const r = await lab.exec("op", [
    lab.plan.nodeBin,
    script,
    lab.plan.operatorDir,
    capsule,
    method,
    JSON.stringify(body),
  ]);
  if (r.exitCode !== 0) throw new Error(`${method} on ${capsule}: ${r.stderr.trim()}`);
  return JSON.parse(r.stdout) as T;
}

/** ctl runs capsulectl as the lab operator and throws (with its output) unless it exits 0. */
export async function ctl(lab: Lab, args: string[]): Promise<string> {
  const r = await lab.capsulectl(args);
  if (r.exitCode !== 0)
    throw new Error(
      `capsulectl ${args.join(" ")}: exit ${r.exitCode}: ${r.stderr.trim()} ${r.stdout.trim()}`,
    );
  return r.stdout;
}

/** fabricAddress is a lab capsule's fabric address. */
export async function fabricAddress(lab: Lab, capsule: string): Promise<string> {
  return (await rpc<{ capsuleAddress: string }>(lab, capsule, "Fabric/Self")).capsuleAddress;
}

/** ping reports whether `count` ICMP echoes from lab node `node` to `ip` all came back. */
export async function ping(
  lab: Lab,
  node: string,
  ip: string,
  opts: { count?: number; src?: string } = {},
): Promise<boolean> {
  const argv = [
    "busybox",
    "ping",
    "-c",
    String(opts.count ?? 1),
    "-W",
    "2",
    ...(opts.src ? ["-I", opts.src] : []),
    ip,
  ];
  const r = await lab.exec(node, argv, { timeoutMs: 15_000 });
  return r.exitCode === 0;
}

/** waitFor polls `check` every `everyMs` until it returns true or `timeoutMs` passes; returns the time taken or -1. */
export async function waitFor(
  check: () => Promise<boolean>,
  timeoutMs: number,
  everyMs = 100,
): Promise<number> {
  const start = Date.now();
  while (Date.now() - start < timeoutMs) {
    if (await check()) return Date.now() - start;
    await new Promise((r) => setTimeout(r, everyMs));
  }
  return -1;
}
