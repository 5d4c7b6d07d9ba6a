/**
 * `capsulectl apply -f FILE|DIR [--wait]` and `capsulectl workload list | get | start | stop |
 * restart | delete | logs | exec`. Every command is one RPC (apply --wait adds Get polls) plus
 * output; manifests are validated here first so a bad file sends nothing.
 */
import { readdir, readFile, stat } from "node:fs/promises";
import { join } from "node:path";
import { type Manifest, parseManifests } from "../../api/manifest.js";
import { CapsuleError, ErrorCode, invalidArgument, isCapsuleError, toCapsuleError } from "../../errors.js";
import type { ApplyPoliciesResponse__Output } from "../../gen/capsule/v1/ApplyPoliciesResponse.js";
import type { ApplyResponse__Output } from "../../gen/capsule/v1/ApplyResponse.js";
import type { ApplyResult__Output } from "../../gen/capsule/v1/ApplyResult.js";
import type { DeleteWorkloadResponse__Output } from "../../gen/capsule/v1/DeleteWorkloadResponse.js";
import type { ExecResponse__Output } from "../../gen/capsule/v1/ExecResponse.js";
import type { ListWorkloadsResponse__Output } from "../../gen/capsule/v1/ListWorkloadsResponse.js";
import type { LogChunk__Output } from "../../gen/capsule/v1/LogChunk.js";
import type { PortStatus__Output } from "../../gen/capsule/v1/PortStatus.js";
import type { Workload__Output } from "../../gen/capsule/v1/Workload.js";
import { humanDuration } from "../duration.js";
import { renderKeyValues, renderTable, type View } from "../output.js";
import type { RpcCaller, Session } from "../session.js";
import type { Target } from "../targets.js";
import { workloadExecStream } from "./exec.js";
import { labelsText, showLines } from "./lines.js";

/** MANIFEST_EXTENSIONS are the files `apply -f DIR` reads. */
const MANIFEST_FILE = /\.(ya?ml|json)$/i;

/**
 * WAIT_POLL_MS is the longest interval between `apply --wait`'s polls of a workload's phase; the
 * first come sooner (WAIT_FIRST_POLL_MS, doubling), since a container usually starts within a
 * few hundred milliseconds (see bench/RESULTS.md) and a fixed 500 ms step was most of the wait.
 */
export const WAIT_POLL_MS = 500;

/** WAIT_FIRST_POLL_MS is the interval before `apply --wait`'s second poll. */
export const WAIT_FIRST_POLL_MS = 100;

/** EVENTS_SHOWN is how many of the latest events `workload get` lists. */
export const EVENTS_SHOWN = 10;

/** ManifestFile is one file of manifests as read from disk. */
export interface ManifestFile {
  file: string;
  text: string;
}

/**
 * readManifestFiles reads FILE, or every *.yaml, *.yml and *.json directly in DIR sorted by
 * name. A directory with none of them is an error (a typo in -f must not apply nothing quietly).
 */
export async function readManifestFiles(path: string): Promise<ManifestFile[]> {
  let st: Awaited<ReturnType<typeof stat>>;
  try {
    st = await stat(path);
  } catch (e) {
    throw invalidArgument(
      "-f",
      `${path}: ${(e as NodeJS.ErrnoException).code === "ENOENT" ? "no such file or directory" : (e as Error).message}`,
    );
  }
  if (!st.isDirectory()) return [{ file: path, text: await readFile(path, "utf8") }];
  const names = (await readdir(path, { withFileTypes: true }))
    .filter((d) => d.isFile() && MANIFEST_FILE.test(d.name))
    .map((d) => d.name)
    .sort();
  if (names.length === 0) {
    throw invalidArgument(
      "-f",
      `${path}: no *.yaml, *.yml or *.json files`,
      "point -f at a manifest file or a directory of them",
    );
  }
  return Promise.all(
    names.map(async (n) => ({ file: join(path, n), text: await readFile(join(path, n), "utf8") })),
  );
}

/**
 * loadManifests parses and validates every document of every file (see parseManifests) and
 * refuses a name given twice of one kind across files. The first problem throws, naming file,
 * document and field. Pure.
 */
export function loadManifests(files: readonly ManifestFile[]): Manifest[] {
  const out: Manifest[] = [];
  const seen = new Map<string, string>();
  for (const f of files) {
    for (const m of parseManifests(f.text, f.file)) {
      const key = `${m.kind}/${m.name}`;
      const first = seen.get(key);
      if (first !== undefined) {
        throw invalidArgument(`${f.file}: ${m.name}`, `${m.kind} ${m.name} is also defined in ${first}`);
      }
      seen.set(key, f.file);
      out.push(m);
    }
  }
  if (out.length === 0) throw invalidArgument("-f", "no manifests found (every document is empty)");
  return out;
}

/** resourceName is the kubectl-style `workload/web`. Pure. */
export function resourceName(kind: string, name: string): string {
  return `${kind.toLowerCase()}/${name}`;
}

/** APPLY_VIEW is the several-targets form of apply: one row per resource and capsule. */
export const APPLY_VIEW: View<ApplyResponse__Output, ApplyResult__Output> = {
  rows: (v) => v.results,
  columns: [
    { header: "RESOURCE", get: (r) => resourceName(r.kind, r.name) },
    { header: "RESULT", get: (r) => r.action },
  ],
};

/** ApplyOptions are `apply`'s flags: `file` required; `wait`, `dryRun` off unless set; `waitTimeoutMs` bounds --wait. */
export interface ApplyOptions {
  file: string;
  wait?: boolean;
  dryRun?: boolean;
  waitTimeoutMs: number;
}

/**
 * apply validates every manifest locally (nothing is sent if one is bad), then on every selected
 * capsule sends the Policy documents in one Policies/Apply and, once that succeeded, the
 * Workload documents in one Workloads/Apply (policies first, so a workload comes up with the
 * rules meant for it in force), and prints `policy/web-db ...` and `workload/web
 * created|configured|unchanged`. Idempotent: the capsule changes nothing for an unchanged
 * document. With `wait`, it then polls each applied workload until it runs, failing (exit 1) on
 * failed/backoff with the capsule's reason or when `waitTimeoutMs` passes.
 */
export async function apply(s: Session, opts: ApplyOptions): Promise<void> {
  const manifests = loadManifests(await readManifestFiles(opts.file));
  const dryRun = opts.dryRun === true;
  const policies = manifests.filter((m) => m.kind === "Policy").map((m) => JSON.stringify(m));
  const workloads = manifests.filter((m) => m.kind !== "Policy").map((m) => JSON.stringify(m));
  const targets = await s.targets();
  const multi = s.isMulti(targets);
  const deadlineMs = s.globals.timeoutMs;
  const results = await s.withEach<ApplyResponse__Output>(
    targets,
    async (client) => {
      const out: ApplyResponse__Output["results"] = [];
      if (policies.length) {
        const r = await client.call<ApplyPoliciesResponse__Output>(
          "Policies/Apply",
          // The workloads go along so the policies' tests may name them before they exist.
          { manifestsJson: policies, dryRun, workloadsJson: workloads },
          { deadlineMs },
        );
        out.push(...r.results.map((x) => ({ kind: "Policy", name: x.name, action: x.action })));
      }
      if (workloads.length) {
        const r = await client.call<ApplyResponse__Output>(
          "Workloads/Apply",
          { manifestsJson: workloads, dryRun },
          { deadlineMs },
        );
        out.push(...r.results);
      }
      return { results: out };
    },
    // Each call has its own --timeout; the two together get two.
    { deadlineMs: policies.length && workloads.length ? 2 * deadlineMs : deadlineMs },
  );
  const suffix = opts.dryRun ? " (dry run)" : "";
  showLines(s, results, multi, APPLY_VIEW, (v) =>
    v.results.map((r) => `${resourceName(r.kind, r.name)} ${r.action}${suffix}\n`).join(""),
  );
  if (!opts.wait || opts.dryRun) return;
  // Wait on the capsules that took the manifests, for the workloads each reported.
  const names = new Map<Target, string[]>();
  for (const r of results) {
    if (r.ok)
      names.set(
        r.target,
        r.value.results.filter((x) => x.kind.toLowerCase() === "workload").map((x) => x.name),
      );
  }
  if (names.size === 0) return;
  const waited = await s.withEach(
    [...names.keys()],
    (client, t, signal) => waitRunning(s, client, t, names.get(t) ?? [], opts.waitTimeoutMs, signal),
    // Every poll has its own --timeout; the whole wait is bounded by --wait-timeout (+ one poll).
    { deadlineMs: opts.waitTimeoutMs + s.globals.timeoutMs },
  );
  showLines(s, waited, multi, WAIT_VIEW, (ws) =>
    ws
      .map((w) => `${resourceName("workload", w.name)} running${w.address ? ` at ${w.address}` : ""}\n`)
      .join(""),
  );
}

/** WAIT_VIEW is the several-targets form of apply --wait. */
export const WAIT_VIEW: View<Workload__Output[], Workload__Output> = {
  rows: (v) => v,
  columns: [
    { header: "WORKLOAD", get: (w) => w.name },
    { header: "PHASE", get: (w) => w.phase },
    { header: "ADDRESS", get: (w) => w.address },
  ],
};

/** RETRYABLE are poll failures that may pass (a slow or briefly unreachable capsule). */
const RETRYABLE = new Set<string>([ErrorCode.Timeout, ErrorCode.Unreachable]);

/**
 * waitRunning polls Workloads/Get for each name until every one is running. A workload in
 * failed or backoff fails the wait with its message; so does `timeoutMs` passing (naming the
 * phase it was stuck in). Timeouts and unreachability of single polls are retried.
 */
async function waitRunning(
  s: Session,
  client: RpcCaller,
  t: Target,
  names: readonly string[],
  timeoutMs: number,
  signal: AbortSignal,
): Promise<Workload__Output[]> {
  const until = Date.now() + timeoutMs;
  let pollMs = WAIT_FIRST_POLL_MS;
  const done = new Map<string, Workload__Output>();
  const last = new Map<string, Workload__Output>();
  for (;;) {
    for (const name of names) {
      if (done.has(name)) continue;
      let w: Workload__Output;
      try {
        w = await client.call<Workload__Output>(
          "Workloads/Get",
          { name },
          { deadlineMs: s.globals.timeoutMs },
        );
      } catch (e) {
        if (isCapsuleError(e) && RETRYABLE.has(e.code) && Date.now() < until) continue;
        throw toCapsuleError(e);
      }
      last.set(name, w);
      if (w.phase === "running") done.set(name, w);
      else if (w.phase === "failed" || w.phase === "backoff") {
        throw new CapsuleError(
          ErrorCode.FailedPrecondition,
          `${resourceName("workload", name)} ${w.phase}: ${w.message || "no reason given"}`,
          {
            hint: `see its events and output: capsulectl --capsule ${t.name} workload get ${name}; capsulectl --capsule ${t.name} workload logs ${name}`,
          },
        );
      }
    }
    if (done.size === names.length) return names.map((n) => done.get(n) as Workload__Output);
    if (Date.now() >= until || signal.aborted) {
      const stuck = names.filter((n) => !done.has(n));
      throw new CapsuleError(
        ErrorCode.Timeout,
        `${stuck.map((n) => `${resourceName("workload", n)} ${last.get(n)?.phase || "unknown"}`).join(", ")} after ${humanDuration(timeoutMs / 1000)}, not running`,
        { hint: `raise --wait-timeout, or look: capsulectl --capsule ${t.name} workload get ${stuck[0]}` },
      );
    }
    await s.io.sleep(pollMs);
    pollMs = Math.min(WAIT_POLL_MS, pollMs * 2);
  }
}

// ---------------------------------------------------------------- list, get

/** portsText renders ports as `8080/tcp` or `18080:8080/tcp` (host:workload), comma-joined. Pure. */
export function portsText(ports: readonly PortStatus__Output[]): string {
  return ports.map((p) => `${p.hostPort ? `${p.hostPort}:` : ""}${p.port}/${p.protocol || "tcp"}`).join(",");
}

/** ageText is the age of an RFC 3339 time at `now` ("5m3s"); "" when unset or unparsable. Pure. */
export function ageText(time: string, now: Date): string {
  const at = Date.parse(time);
  if (!time || Number.isNaN(at)) return "";
  return humanDuration(Math.max(0, (now.getTime() - at) / 1000));
}

/** listView is `workload list`; `now` dates the AGE column. */
export function listView(now: Date): View<ListWorkloadsResponse__Output, Workload__Output> {
  return {
    rows: (v) => v.workloads,
    columns: workloadColumns(now),
  };
}

function workloadColumns(now: Date): View<unknown, Workload__Output>["columns"] {
  return [
    { header: "NAME", get: (w) => w.name },
    { header: "PHASE", get: (w) => w.phase },
    { header: "ADDRESS", get: (w) => w.address },
    { header: "IMAGE", get: (w) => w.image },
    { header: "RESTARTS", get: (w) => w.restarts },
    { header: "AGE", get: (w) => ageText(w.createdAt, now) },
    { header: "PORTS", get: (w) => portsText(w.ports), wide: true },
    { header: "LABELS", get: (w) => labelsText(w.labels), wide: true },
    { header: "DESIRED", get: (w) => w.desired, wide: true },
  ];
}

/** workloadList lists every selected capsule's workloads. Read-only. */
export async function workloadList(s: Session): Promise<void> {
  await s.rpcAndShow<ListWorkloadsResponse__Output, Workload__Output>(
    "Workloads/List",
    () => ({}),
    listView(s.io.now()),
  );
}

/** describeWorkload renders one workload for `workload get`: key/values, ports, the latest events. Pure. */
export function describeWorkload(w: Workload__Output, now: Date): string {
  const age = ageText(w.createdAt, now);
  const parts = [
    renderKeyValues([
      ["Name", w.name],
      ["Kind", w.kind],
      ["Image", w.image],
      ["Desired", w.desired],
      ["Phase", w.phase],
      ["Message", w.message],
      ["Address", w.address],
      ["Restarts", w.restarts],
      ["PID", w.pid || ""],
      ["Labels", labelsText(w.labels)],
      ["Volumes", w.volumes.join(",")],
      ["Created", w.createdAt ? `${w.createdAt}${age ? ` (${age} ago)` : ""}` : ""],
      ["Generation", w.generation],
    ]),
  ];
  parts.push(
    `\nPorts:\n${
      w.ports.length
        ? indent(
            renderTable(w.ports, [
              { header: "PORT", get: (p: PortStatus__Output) => `${p.port}/${p.protocol || "tcp"}` },
              { header: "HOST-PORT", get: (p: PortStatus__Output) => p.hostPort || "" },
            ]),
          )
        : "  <none>\n"
    }`,
  );
  const events = w.events.slice(-EVENTS_SHOWN);
  parts.push(
    `\nEvents:\n${
      events.length
        ? indent(
            renderTable(events, [
              { header: "AGE", get: (e) => ageText(e.time, now) },
              { header: "TYPE", get: (e) => e.type },
              { header: "MESSAGE", get: (e) => e.message },
            ]),
          )
        : "  <none>\n"
    }`,
  );
  return parts.join("");
}

function indent(text: string): string {
  return text.replace(/^(?=.)/gm, "  ");
}

/**
 * workloadGet shows one workload: key/values, ports and its latest events for one capsule;
 * the list row per capsule for several; the raw object for -o json|yaml. Read-only.
 */
export async function workloadGet(s: Session, name: string): Promise<void> {
  const { results, multi } = await s.rpc<Workload__Output>("Workloads/Get", () => ({ name }));
  const now = s.io.now();
  showLines(s, results, multi, { rows: (v) => [v], columns: workloadColumns(now) }, (w) =>
    describeWorkload(w, now),
  );
}

// ---------------------------------------------------------------- start, stop, restart, delete

/** Verb is a lifecycle command, its RPC and the word its result line uses. */
const VERBS = {
  start: { method: "Workloads/Start", done: "started" },
  stop: { method: "Workloads/Stop", done: "stopped" },
  restart: { method: "Workloads/Restart", done: "restarted" },
} as const;

/** LifecycleVerb is one of start, stop, restart. */
export type LifecycleVerb = keyof typeof VERBS;

/**
 * workloadLifecycle starts, stops or restarts NAME on every selected capsule and prints
 * `workload/NAME started|stopped|restarted`. Start and stop are idempotent on the capsule.
 */
export async function workloadLifecycle(s: Session, verb: LifecycleVerb, name: string): Promise<void> {
  const { method, done } = VERBS[verb];
  const { results, multi } = await s.rpc<Workload__Output>(method, () => ({ name }));
  const view: View<Workload__Output, Workload__Output> = {
    rows: (v) => [v],
    columns: [
      { header: "WORKLOAD", get: (w) => w.name || name },
      { header: "RESULT", get: () => done },
      { header: "PHASE", get: (w) => w.phase },
    ],
  };
  showLines(s, results, multi, view, () => `${resourceName("workload", name)} ${done}\n`);
}

/** workloadDelete deletes NAME on every selected capsule. Idempotent: a missing workload says "not found" and exits 0. */
export async function workloadDelete(s: Session, name: string): Promise<void> {
  const { results, multi } = await s.rpc<DeleteWorkloadResponse__Output>("Workloads/Delete", () => ({
    name,
  }));
  const said = (v: DeleteWorkloadResponse__Output) => (v.deleted ? "deleted" : "not found");
  const view: View<DeleteWorkloadResponse__Output, DeleteWorkloadResponse__Output> = {
    rows: (v) => [v],
    columns: [
      { header: "WORKLOAD", get: () => name },
      { header: "RESULT", get: said },
    ],
  };
  showLines(s, results, multi, view, (v) => `${resourceName("workload", name)} ${said(v)}\n`);
}

// ---------------------------------------------------------------- logs, exec

/** LogsOptions: `follow` streams until Ctrl-C; `tail` (0 or unset = all) is how many last lines to start with. */
export interface LogsOptions {
  follow?: boolean;
  tail?: number;
}

/**
 * workloadLogs streams NAME's output from one capsule to stdout as it arrives. Without
 * `follow` the stream is bounded by --timeout; with it there is no deadline and Ctrl-C ends it
 * cleanly (exit 0).
 */
export async function workloadLogs(s: Session, name: string, opts: LogsOptions): Promise<void> {
  const target = await s.one("workload logs");
  const client = await s.dial(target);
  const ac = new AbortController();
  const undo = s.io.onInterrupt(() => ac.abort(new CapsuleError(ErrorCode.Internal, "interrupted")));
  try {
    const stream = client.callServerStream<LogChunk__Output>(
      "Workloads/Logs",
      { name, follow: opts.follow === true, tailLines: opts.tail ?? 0 },
      { deadlineMs: opts.follow ? null : s.globals.timeoutMs, signal: ac.signal },
    );
    for await (const chunk of stream) {
      if (chunk.data.length) s.io.stdout.write(chunk.data);
    }
  } catch (e) {
    // Ctrl-C is how a follow ends: not an error.
    if (!ac.signal.aborted) throw e;
  } finally {
    undo();
    client.close();
  }
}

/**
 * ExecOptions: `tty` allocates a terminal for the command, `stdin` passes capsulectl's stdin to
 * it (both unset = the one-shot Workloads/Exec); `timeoutMs` bounds a one-shot command (default
 * 60 s; an interactive session has no bound).
 */
export interface ExecOptions {
  tty?: boolean;
  stdin?: boolean;
  timeoutMs?: number;
}

/**
 * workloadExec runs `argv` in NAME on one capsule and exits with its exit code. Without -t/-i
 * it is one Workloads/Exec: output printed when the command ended (or as JSON with -o json).
 * With -t and/or -i it is a Workloads/ExecStream session: see {@link workloadExecStream}.
 */
export async function workloadExec(
  s: Session,
  name: string,
  argv: string[],
  opts: ExecOptions,
): Promise<void> {
  if (argv.length === 0)
    throw invalidArgument("CMD", "name a command after --", `capsulectl workload exec ${name} -- ls /`);
  if (opts.tty || opts.stdin) return workloadExecStream(s, name, argv, opts);
  const target = await s.one("workload exec");
  const timeoutMs = opts.timeoutMs ?? 60_000;
  // The call must outlive the command: its own deadline is the command's plus --timeout.
  const [r] = await s.withEach(
    [target],
    (client) =>
      client.call<ExecResponse__Output>(
        "Workloads/Exec",
        { name, argv, timeoutSeconds: Math.max(1, Math.ceil(timeoutMs / 1000)) },
        { deadlineMs: timeoutMs + s.globals.timeoutMs },
      ),
    { deadlineMs: timeoutMs + s.globals.timeoutMs },
  );
  if (!r) return;
  if (!r.ok) throw r.error;
  if (s.output === "json" || s.output === "yaml") {
    s.print(
      {
        exitCode: r.value.exitCode,
        stdout: r.value.stdout.toString("utf8"),
        stderr: r.value.stderr.toString("utf8"),
      },
      () => "",
    );
  } else {
    if (r.value.stdout.length) s.io.stdout.write(r.value.stdout);
    if (r.value.stderr.length) s.io.stderr.write(r.value.stderr);
  }
  // A negative code (killed by a signal, as some runtimes report it) still fails.
  const code = r.value.exitCode;
  s.exitCode = code === 0 ? 0 : code > 0 && code < 256 ? code : 1;
}
