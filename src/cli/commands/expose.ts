/**
 * `capsulectl expose WORKLOAD --edge EDGE (--host NAME --port PORT [--passthrough] | --tcp PUBLIC:PORT)`
 * and `capsulectl unexpose WORKLOAD --edge EDGE (--host NAME | --tcp PUBLIC)`: run on the capsule
 * that runs the workload (--capsule), which adds the allow rule and asks the edge to route.
 */
import { invalidArgument } from "../../errors.js";
import type { Exposure__Output } from "../../gen/capsule/v1/Exposure.js";
import type { UnexposeResponse__Output } from "../../gen/capsule/v1/UnexposeResponse.js";
import type { Session } from "../session.js";
import { showLines } from "./lines.js";

/** ExposeFlags are expose's options as commander gives them. */
export interface ExposeFlags {
  edge: string;
  host?: string;
  port?: string;
  passthrough?: boolean;
  tcp?: string;
}

const port = (field: string, text: string | undefined, hint: string): number => {
  const n = Number(text);
  if (text === undefined || !/^\d{1,5}$/.test(text) || n < 1 || n > 65535)
    throw invalidArgument(field, `"${text ?? ""}" is not a port`, hint);
  return n;
};

/** parseExpose checks the flags and returns the request (pure; names the flag at fault). */
export function parseExpose(workload: string, f: ExposeFlags) {
  if (f.tcp !== undefined) {
    if (f.host !== undefined)
      throw invalidArgument("--host", "cannot be used with --tcp", "give one of them");
    if (f.passthrough) throw invalidArgument("--passthrough", "needs --host, not --tcp");
    const m = /^(\d+):(\d+)$/.exec(f.tcp);
    if (!m) throw invalidArgument("--tcp", `"${f.tcp}" is not PUBLICPORT:PORT`, "e.g. --tcp 2222:22");
    const hint = "e.g. --tcp 2222:22";
    if (f.port !== undefined && f.port !== m[2])
      throw invalidArgument("--port", `${f.port} differs from the port in --tcp (${m[2]})`, "drop --port");
    return {
      workload,
      edge: f.edge,
      host: "",
      port: port("--tcp", m[2], hint),
      passthrough: false,
      tcpPublicPort: port("--tcp", m[1], hint),
    };
  }
  if (f.host === undefined)
    throw invalidArgument("--host", "missing", "give --host NAME --port PORT, or --tcp PUBLICPORT:PORT");
  return {
    workload,
    edge: f.edge,
    host: f.host,
    port: port("--port", f.port, "give --port, the workload's port"),
    passthrough: f.passthrough === true,
    tcpPublicPort: 0,
  };
}

/** expose publishes WORKLOAD at EDGE and prints where visitors reach it. */
export async function expose(s: Session, workload: string, f: ExposeFlags): Promise<void> {
  const req = parseExpose(workload, f);
  const { results, multi } = await s.rpc<Exposure__Output>("Edge/Expose", () => req);
  showLines(
    s,
    results,
    multi,
    {
      rows: (v) => [v],
      columns: [
        { header: "WORKLOAD", get: (v) => v.workload },
        { header: "EDGE", get: (v) => v.edge },
        { header: "KIND", get: (v) => v.kind },
        { header: "URL", get: (v) => v.url },
        { header: "UPSTREAM", get: (v) => v.upstream },
        { header: "RESULT", get: (v) => v.action },
      ],
    },
    (v) => `exposure/${v.workload} ${v.action}: ${v.url} -> ${v.upstream} (${v.kind} at ${v.edge})\n`,
  );
}

/** UnexposeFlags are unexpose's options. */
export interface UnexposeFlags {
  edge: string;
  host?: string;
  tcp?: string;
}

/** unexpose removes one exposure of WORKLOAD at EDGE. Idempotent: "not exposed" exits 0. */
export async function unexpose(s: Session, workload: string, f: UnexposeFlags): Promise<void> {
  if ((f.host === undefined) === (f.tcp === undefined))
    throw invalidArgument("--host", "give exactly one of --host NAME or --tcp PUBLICPORT");
  const req = {
    workload,
    edge: f.edge,
    host: f.host ?? "",
    tcpPublicPort: f.tcp === undefined ? 0 : port("--tcp", f.tcp.split(":")[0], "e.g. --tcp 2222"),
  };
  const what = f.host ?? `port ${req.tcpPublicPort}`;
  const said = (v: UnexposeResponse__Output) => (v.removed ? "removed" : "not exposed");
  const { results, multi } = await s.rpc<UnexposeResponse__Output>("Edge/Unexpose", () => req);
  showLines(
    s,
    results,
    multi,
    {
      rows: (v) => [v],
      columns: [
        { header: "WORKLOAD", get: () => workload },
        { header: "ROUTE", get: () => what },
        { header: "RESULT", get: said },
      ],
    },
    (v) => `exposure/${workload} ${what} at ${f.edge} ${said(v)}\n`,
  );
}
