/**
 * What every runtime module shares about talking to containerd through `ctr`: the endpoint,
 * the argv prefix, how ctr's tables and errors read. Pure; nothing here runs a command.
 *
 * Why `ctr` and not containerd's gRPC API from Node: ctr (same package, same version as the
 * daemon) already does the client-side work a gRPC client would have to reimplement: import
 * (content ingest, unpack into the snapshotter), the OCI spec from the image config, rootfs
 * snapshot preparation, the `file://` log URI, exec I/O. The price is a process per call
 * (~10 ms) and parsing human tables, which {@link parseTable} does by column offsets; both are
 * fine at a capsule's scale, and every effect is a command line a test can diff.
 */
import { CapsuleError, CommandError, ErrorCode } from "../../errors.js";
import type { RunResult } from "../host/runner.js";

/** Snapshotter is the containerd snapshotter images are unpacked into and containers run on. */
export type Snapshotter = "overlayfs" | "native";

/** CtrEndpoint says how ctr reaches our containerd: all fields required. */
export interface CtrEndpoint {
  /** address is containerd's gRPC unix socket. */
  address: string;
  /** namespace is the containerd namespace our images and containers live in ("capsule"). */
  namespace: string;
  /** snapshotter is the one every import and run uses (images unpacked in one are invisible to the other). */
  snapshotter: Snapshotter;
}

/** ctrArgv is the argv of a ctr command against `ep`: `ctr -a ADDRESS -n NAMESPACE ARGS...`. */
export function ctrArgv(ep: CtrEndpoint, ...args: string[]): string[] {
  return ["ctr", "-a", ep.address, "-n", ep.namespace, ...args];
}

/**
 * parseTable reads a table ctr printed with Go's tabwriter (a header line, then one line per
 * row) into records keyed by the header names. Cells are cut at the header's column offsets,
 * not split on spaces: some cells have spaces in them ("1.9 MiB").
 */
export function parseTable(text: string): Record<string, string>[] {
  const lines = text.split("\n").filter((l) => l.trim() !== "");
  const header = lines.shift();
  if (!header) return [];
  const cols: { name: string; start: number }[] = [];
  for (const m of header.matchAll(/\S+/g)) cols.push({ name: m[0], start: m.index ?? 0 });
  return lines.map((line) => {
    const row: Record<string, string> = {};
    cols.forEach((c, i) => {
      const end = cols[i + 1]?.start ?? line.length;
      row[c.name] = line.slice(c.start, i + 1 < cols.length ? end : undefined).trim();
    });
    return row;
  });
}

/** ctrMessage is ctr's own error message: the last stderr line starting with "ctr: ", without the prefix. */
export function ctrMessage(stderr: string): string | undefined {
  const lines = stderr.split("\n").filter((l) => l.startsWith("ctr: "));
  return lines.at(-1)?.slice(5);
}

/** isNotFound reports whether a failed ctr command said that the thing it was asked about does not exist. */
export function isNotFound(r: Pick<RunResult, "stderr">): boolean {
  return /not found/i.test(ctrMessage(r.stderr) ?? "");
}

/**
 * ctrError turns a failed ctr command into the error a caller can act on: containerd not
 * answering is CAPSULE_UNREACHABLE, anything else a CommandError carrying argv and output.
 */
export function ctrError(argv: readonly string[], r: RunResult): CapsuleError {
  const msg = ctrMessage(r.stderr) ?? "";
  if (/failed to dial|connection refused|no such file or directory.*\.sock/i.test(msg)) {
    const address = argv[argv.indexOf("-a") + 1] ?? "?";
    return new CapsuleError(ErrorCode.Unreachable, `containerd at ${address} is not answering`, {
      hint: "capsuled restarts containerd when it finds it dead; see containerd.log under the state dir",
      cause: new CommandError(argv, r.exitCode, r.stdout, r.stderr),
    });
  }
  return new CommandError(argv, r.exitCode, r.stdout, r.stderr);
}

/** parseHumanBytes reads ctr's sizes ("1.9 MiB", "512 B") back into bytes, to ctr's printed precision. */
export function parseHumanBytes(s: string): number | undefined {
  const m = /^(\d+(?:\.\d+)?)\s*(B|KiB|MiB|GiB|TiB|PiB)$/.exec(s.trim());
  if (!m) return undefined;
  const pow = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"].indexOf(m[2]!);
  return Math.round(Number(m[1]) * 1024 ** pow);
}
