/**
 * The lab's programmatic API: bring a multi-capsule network up on this machine, tear it down,
 * report its status, run commands inside it and drive capsulectl as the lab's operator.
 *
 * This module is the lab's composition root: it is the only place that builds the real
 * {@link ExecaRunner} and clock; every function takes a {@link LabContext} to swap them.
 */
import { existsSync, readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { CapsuleError, ErrorCode } from "../src/errors.js";
import type { Clock } from "../src/node/host/clock.js";
import { type CommandRunner, ExecaRunner, type RunResult } from "../src/node/host/runner.js";
import { caServices, caStatus, ensureCa } from "./ca.js";
import {
  enterArgv,
  ensureDaemon,
  ensureDirs,
  ensureMountNamespaces,
  isListening,
  processPid,
  RefClock,
  waitListening,
} from "./capsules.js";
import { applyNetwork, type LabCommand } from "./network.js";
import { applyResolvers } from "./resolvers.js";
import {
  type CapsulePlan,
  DEFAULT_PREFIX,
  defaultLabDir,
  findNode,
  type LabOptions,
  type LabPlan,
  planLab,
  validatePrefix,
} from "./plan.js";
import { labNamespaces, pruneNamespaces, teardownLab, type TeardownResult } from "./teardown.js";

/** LabContext swaps the lab's seams (all optional): the command runner, the clock and a progress logger. */
export interface LabContext {
  /** runner runs every command (default a real {@link ExecaRunner}). */
  runner?: CommandRunner;
  /** clock times every bounded wait (default real time). */
  clock?: Clock;
  /** log receives one line per phase (default silent). */
  log?: (line: string) => void;
}

/** LabUpOptions adds `up`-only knobs to {@link LabOptions}. */
export interface LabUpOptions extends LabOptions {
  /** startTimeoutMs bounds the wait for each capsule's API to listen, and for the lab CA to answer (default 20000). */
  startTimeoutMs?: number;
  /** adopt makes the lab's operator adopt every capsule (default true with capsuled, ignored for the stand-in). */
  adopt?: boolean;
}

/** LabState is the JSON record in `<labDir>/lab.json` that `down` and `status` read. */
export interface LabState {
  version: 1;
  prefix: string;
  labDir: string;
  /** phase is "creating" until `up` finished, then "up". */
  phase: "creating" | "up";
  /** options are the resolved options the plan was made from. */
  options: LabOptions & { repoDir: string; nodeBin: string };
  namespaces: string[];
  capsules: {
    name: string;
    ns: string;
    pid: number | undefined;
    api: string;
    log: string;
    mntns: string;
    /** argv the process was started with; a changed plan restarts it. */
    argv: string[];
  }[];
  /** services are the lab CA namespace's processes (dnsmasq, caddy); absent in a lab without one. */
  services?: { name: string; ns: string; pid: number | undefined; log: string; argv: string[] }[];
  updatedAt: string;
}

/** LabUpResult says what `up` did. */
export interface LabUpResult {
  plan: LabPlan;
  /** networkCommands are the mutating network commands run (empty when the network already matched). */
  networkCommands: LabCommand[];
  /** started are the capsules whose process this run started. */
  started: string[];
  /** servicesStarted are the lab CA namespace's services ("dnsmasq", "caddy") this run started. */
  servicesStarted: string[];
  /** resolverCommands are the commands that wrote or removed /etc/netns/<prefix>-* files (empty when current). */
  resolverCommands: LabCommand[];
  /** adopted are the capsules this run adopted. */
  adopted: string[];
  /** elapsedMs is the wall time of `up`. */
  elapsedMs: number;
}

/** MARKER_FILE marks a directory as a lab dir; `down` removes only directories that carry it. */
export const MARKER_FILE = ".capsule-lab";

function repoRoot(): string {
  // Works from lab/*.ts (tests) and dist/lab/*.js (built): walk up to our package.json.
  let dir = dirname(fileURLToPath(import.meta.url));
  for (let i = 0; i < 5; i++) {
    const pkg = join(dir, "package.json");
    if (existsSync(pkg) && JSON.parse(readFileSync(pkg, "utf8")).name === "capsule") return dir;
    dir = dirname(dir);
  }
  throw new CapsuleError(ErrorCode.Internal, "cannot find the capsule checkout above the lab module");
}

/** resolveLabOptions fills `repoDir` (this checkout) and `nodeBin` (the running node) when unset. */
export function resolveLabOptions(opts: LabOptions = {}): LabOptions & { repoDir: string; nodeBin: string } {
  return { ...opts, repoDir: opts.repoDir ?? repoRoot(), nodeBin: opts.nodeBin ?? process.execPath };
}

/** labPlan plans the lab for `opts` (see {@link planLab}); pure apart from resolving the defaults. */
export function labPlan(opts: LabOptions = {}): LabPlan {
  return planLab(resolveLabOptions(opts));
}

function seams(ctx: LabContext): { runner: CommandRunner; clock: Clock; log: (line: string) => void } {
  return {
    runner: ctx.runner ?? new ExecaRunner(),
    clock: ctx.clock ?? new RefClock(),
    log: ctx.log ?? (() => {}),
  };
}

async function writeState(
  runner: CommandRunner,
  plan: LabPlan,
  phase: LabState["phase"],
  pids: Map<string, number>,
  previous?: LabState,
  servicePids: Record<string, number> = {},
) {
  const state: LabState = {
    version: 1,
    prefix: plan.prefix,
    labDir: plan.labDir,
    phase,
    options: plan.options as LabState["options"],
    namespaces: plan.nodes.map((n) => n.ns),
    capsules: plan.capsules.map((c) => ({
      name: c.name,
      ns: c.ns,
      pid: pids.get(c.name),
      api: c.api,
      log: c.logFile,
      mntns: c.mntns,
      // Until this run has (re)started the process, the argv it runs with is the previous one.
      argv: pids.has(c.name) ? c.argv : (previous?.capsules.find((p) => p.name === c.name)?.argv ?? c.argv),
    })),
    ...(plan.ca
      ? {
          services: caServices(plan.ca).map((s) => ({
            name: s.name,
            ns: s.ns,
            pid: servicePids[s.name],
            log: s.logFile,
            argv:
              servicePids[s.name] !== undefined
                ? s.argv
                : (previous?.services?.find((p) => p.name === s.name)?.argv ?? s.argv),
          })),
        }
      : {}),
    updatedAt: new Date().toISOString(),
  };
  await runner.run(["tee", plan.stateFile], { input: `${JSON.stringify(state, null, 2)}\n` });
}

/** readLabState reads `<labDir>/lab.json`; undefined when it is missing or unreadable. */
export async function readLabState(runner: CommandRunner, labDir: string): Promise<LabState | undefined> {
  const r = await runner.run(["cat", join(labDir, "lab.json")], { allowFailure: true });
  if (r.exitCode !== 0) return undefined;
  try {
    const s = JSON.parse(r.stdout) as LabState;
    return s.version === 1 ? s : undefined;
  } catch {
    return undefined;
  }
}

/** LAB_TOOLS are the host programs the lab runs; {@link missingTools} probes for them before anything happens. */
export const LAB_TOOLS = [
  "ip",
  "nft",
  "nsenter",
  "unshare",
  "setsid",
  "findmnt",
  "mount",
  "umount",
  "bash",
  "timeout",
  "pgrep",
  "ps",
  "kill",
] as const;

/** missingTools returns the `tools` (default {@link LAB_TOOLS}) not found on `PATH` (read-only). */
export function missingTools(
  path = process.env.PATH ?? "/usr/sbin:/usr/bin:/sbin:/bin",
  tools: readonly string[] = LAB_TOOLS,
): string[] {
  const dirs = path.split(":").filter(Boolean);
  return tools.filter((tool) => !dirs.some((d) => existsSync(join(d, tool))));
}

/** CA_TOOLS are the host programs the lab CA and DNS namespace runs (probed when the plan has one). */
export const CA_TOOLS = ["dnsmasq", "caddy", "curl"] as const;

function preflight(plan: LabPlan, opts: LabUpOptions): void {
  const missing = missingTools();
  if (missing.length) {
    throw new CapsuleError(ErrorCode.FailedPrecondition, `the lab needs ${missing.join(", ")} on PATH`, {
      hint: "apt-get install iproute2 nftables util-linux procps bash coreutils (see lab/README.md)",
    });
  }
  const missingCa = plan.ca ? missingTools(undefined, CA_TOOLS) : [];
  if (missingCa.length) {
    throw new CapsuleError(ErrorCode.FailedPrecondition, `the lab CA needs ${missingCa.join(", ")} on PATH`, {
      hint: "apt-get install dnsmasq-base caddy curl (or bring the lab up with --no-ca)",
    });
  }
  if (process.getuid?.() !== 0) {
    throw new CapsuleError(ErrorCode.PermissionDenied, "the lab needs root (network and mount namespaces)", {
      hint: "run it with sudo",
    });
  }
  if (plan.daemon === "capsuled") {
    for (const f of ["dist/src/node/main.js", ...(opts.adopt === false ? [] : ["dist/src/cli/main.js"])]) {
      if (!existsSync(join(plan.repoDir, f))) {
        throw new CapsuleError(ErrorCode.FailedPrecondition, `${join(plan.repoDir, f)} is missing`, {
          hint: "run npm run build first (or use the stand-in daemon: --daemon stand-in)",
        });
      }
    }
  }
}

/**
 * labUp brings the lab up: namespaces, veths, bridges, addresses, routes, NAT, per-capsule
 * mount namespaces, one detached process per capsule, a bounded wait for each API to listen,
 * and (with capsuled) adoption into `<labDir>/operator`. Idempotent: on a lab that is up it
 * runs no mutating command and starts or adopts nothing. After a crash halfway it completes
 * the lab. Unset options take the defaults documented on {@link LabOptions}.
 */
export async function labUp(opts: LabUpOptions = {}, ctx: LabContext = {}): Promise<LabUpResult> {
  const t0 = Date.now();
  const { runner, clock, log } = seams(ctx);
  const plan = labPlan(opts);
  preflight(plan, opts);
  // 0700: capsule state dirs below hold private keys.
  await runner.run(["mkdir", "-p", "-m", "700", plan.labDir]);
  await runner.run(["touch", join(plan.labDir, MARKER_FILE)]);
  const previous = await readLabState(runner, plan.labDir);
  const pids = new Map<string, number>();
  await writeState(runner, plan, "creating", pids, previous);

  const networkCommands = await applyNetwork(runner, plan);
  log(
    `network: ${networkCommands.length ? `${networkCommands.length} changes` : "up to date"} (${Date.now() - t0} ms)`,
  );
  const strays = (await labNamespaces(runner, plan.prefix)).filter(
    (ns) => !plan.nodes.some((n) => n.ns === ns),
  );
  await pruneNamespaces(
    runner,
    clock,
    strays,
    plan.mntDir,
    plan.capsules.map((c) => c.mntns),
  );
  if (strays.length) log(`removed namespaces the plan no longer has: ${strays.join(", ")}`);

  const resolverCommands = await applyResolvers(runner, plan);
  const timeout = opts.startTimeoutMs ?? 20_000;
  // The CA comes up while the capsules' mount namespaces are made and the homes start; only the
  // edge's capsuled, told to use the directory and trust the root file, waits for it.
  const caUp = plan.ca
    ? ensureCa(
        runner,
        clock,
        plan.ca,
        Object.fromEntries((previous?.services ?? []).map((s) => [s.name, s.argv])),
        timeout,
      ).then((r) => {
        log(
          `ca: ${r.started.length ? `started ${r.started.join(", ")}` : "running"}, ${plan.ca!.directory} answering (${Date.now() - t0} ms)`,
        );
        return r;
      })
    : Promise.resolve(undefined);
  // Awaited below in every path; this only keeps an early failure elsewhere from leaving it unhandled.
  caUp.catch(() => {});

  await ensureDirs(runner, plan);
  await ensureMountNamespaces(runner, plan);
  const started: string[] = [];
  const results = await Promise.all(
    plan.capsules.map(async (c) => {
      if (c.role === "edge") await caUp;
      return ensureDaemon(runner, clock, c, previous?.capsules.find((p) => p.name === c.name)?.argv);
    }),
  );
  const ca = await caUp;
  const servicesStarted = ca?.started ?? [];
  const servicePids = ca?.pids ?? {};
  plan.capsules.forEach((c, i) => {
    const r = results[i]!;
    pids.set(c.name, r.pid);
    if (r.started) started.push(c.name);
  });
  await writeState(runner, plan, "creating", pids, undefined, servicePids);
  log(
    `processes: ${started.length ? `started ${started.join(", ")}` : "all running"} (${Date.now() - t0} ms)`,
  );

  await Promise.all(plan.capsules.map((c) => waitListening(runner, clock, plan, c, timeout)));
  log(`listening: ${plan.capsules.map((c) => c.api).join(", ")} (${Date.now() - t0} ms)`);

  const adopted: string[] = [];
  if (plan.daemon === "capsuled" && opts.adopt !== false) {
    const known = await operatorContexts(runner, plan);
    const todo = plan.capsules.filter((c) => known.get(c.name) !== c.api);
    // The lab can read each state dir, so the pin is checked, not trusted on first use.
    const fingerprints = await Promise.all(todo.map((c) => capsuleFingerprint(runner, plan, c)));
    // Sequential: every adopt rewrites the same config file.
    for (const [i, c] of todo.entries()) {
      const r = await runCapsulectl(runner, plan, [
        "adopt",
        c.api,
        "--name",
        c.name,
        "--fingerprint",
        fingerprints[i]!,
        "--yes",
      ]);
      if (r.exitCode !== 0) {
        throw new CapsuleError(
          ErrorCode.CommandFailed,
          `adopting ${c.name} (${c.api}) failed: ${lastLine(r)}`,
          {
            hint: `see ${c.logFile}`,
          },
        );
      }
      adopted.push(c.name);
    }
    log(
      `operator: ${adopted.length ? `adopted ${adopted.join(", ")}` : "all adopted"} (${Date.now() - t0} ms)`,
    );
  }
  await writeState(runner, plan, "up", pids, undefined, servicePids);
  return {
    plan,
    networkCommands,
    resolverCommands,
    started,
    servicesStarted,
    adopted,
    elapsedMs: Date.now() - t0,
  };
}

/** capsuleFingerprint reads a capsule's TLS fingerprint from its state dir (`capsuled fingerprint`). */
export async function capsuleFingerprint(
  runner: CommandRunner,
  plan: LabPlan,
  c: CapsulePlan,
): Promise<string> {
  const r = await runner.run([
    "env",
    "-u",
    "NODE_OPTIONS",
    plan.nodeBin,
    join(plan.repoDir, "dist/src/node/main.js"),
    "fingerprint",
    "--state-dir",
    c.stateDir,
  ]);
  const fp = r.stdout.trim();
  if (!/^SHA256:\S+$/.test(fp)) {
    throw new CapsuleError(ErrorCode.StateCorrupt, `${c.name}: no fingerprint in ${c.stateDir}: "${fp}"`, {
      hint: `see ${c.logFile}`,
    });
  }
  return fp;
}

function lastLine(r: RunResult): string {
  return (r.stderr || r.stdout).trim().split("\n").slice(-2).join(" | ");
}

async function operatorContexts(runner: CommandRunner, plan: LabPlan): Promise<Map<string, string>> {
  const r = await runCapsulectl(runner, plan, ["context", "list", "-o", "json"]);
  const out = new Map<string, string>();
  if (r.exitCode !== 0) return out;
  try {
    const rows = JSON.parse(r.stdout) as { name?: string; address?: string }[];
    for (const row of Array.isArray(rows) ? rows : [])
      if (row.name && row.address) out.set(row.name, row.address);
  } catch {
    // An unparsable list means nothing is known: adopt will say what is wrong.
  }
  return out;
}

/** capsulectlArgv is the command line that runs capsulectl as the lab's operator, inside `<prefix>-op`. */
export function capsulectlArgv(plan: LabPlan, args: readonly string[]): string[] {
  return [
    "ip",
    "netns",
    "exec",
    `${plan.prefix}-op`,
    // The lab's operator is isolated from the user's: no inherited config dir or target.
    "env",
    "-u",
    "NODE_OPTIONS",
    "-u",
    "CAPSULE_CONFIG_DIR",
    "-u",
    "CAPSULE_HOST",
    plan.nodeBin,
    join(plan.repoDir, "dist/src/cli/main.js"),
    "--config-dir",
    plan.operatorDir,
    ...args,
  ];
}

function runCapsulectl(runner: CommandRunner, plan: LabPlan, args: readonly string[], timeoutMs = 60_000) {
  return runner.run(capsulectlArgv(plan, args), { allowFailure: true, timeoutMs });
}

/** LabSelector names a lab: its prefix and, when not the default, its lab dir. */
export interface LabSelector {
  /** prefix of the lab (default "cl"). */
  prefix?: string;
  /** labDir of the lab (default `/tmp/capsule-lab-<prefix>`). */
  labDir?: string;
}

/**
 * labDown removes everything a lab made: processes (process groups, everything in its network
 * namespaces, anything still running with its state dirs), mount namespace pins, network
 * namespaces (and with them every veth and bridge) and the lab dir. Works from the prefix alone
 * when the state file is partial or missing. Idempotent: on a lab that is gone it does nothing.
 */
export async function labDown(sel: LabSelector = {}, ctx: LabContext = {}): Promise<TeardownResult> {
  const { runner, clock, log } = seams(ctx);
  const prefix = sel.prefix ?? DEFAULT_PREFIX;
  validatePrefix(prefix);
  const labDir = sel.labDir ?? defaultLabDir(prefix);
  const r = await teardownLab(runner, clock, { prefix, labDir });
  log(
    `down: killed ${r.killed.length} processes, removed ${r.namespaces.length} namespaces, ${r.unmounted.length} mounts${r.removedDir ? `, ${labDir}` : ""}`,
  );
  return r;
}

/** StatusRow is one line of `lab status`. */
export interface StatusRow {
  name: string;
  role: string;
  namespace: string;
  lan: string;
  wan: string;
  mgmt: string;
  /** pid of the capsule's process when alive in its namespace. */
  pid: number | undefined;
  /** listening is true when a TCP connect from the operator namespace to the API succeeds. */
  listening: boolean | undefined;
  /** namespaceExists is false when the namespace is gone. */
  namespaceExists: boolean;
  log: string;
  /**
   * services are the CA namespace's processes with their pids (the CA row only); its `listening`
   * says whether the ACME directory answers, TLS checked against the lab root.
   */
  services?: { name: string; pid: number | undefined }[];
}

/** LabStatus is the state of a lab as observed now. */
export interface LabStatus {
  prefix: string;
  labDir: string;
  /** found is false when neither a state file nor any namespace with the prefix exists. */
  found: boolean;
  phase: LabState["phase"] | "unknown";
  rows: StatusRow[];
  /** strayNamespaces are namespaces with the prefix that the plan does not know. */
  strayNamespaces: string[];
}

/** labStatus observes a lab (read-only): namespaces, process liveness and API reachability. */
export async function labStatus(sel: LabSelector = {}, ctx: LabContext = {}): Promise<LabStatus> {
  const { runner } = seams(ctx);
  const prefix = sel.prefix ?? DEFAULT_PREFIX;
  validatePrefix(prefix);
  const labDir = sel.labDir ?? defaultLabDir(prefix);
  const state = await readLabState(runner, labDir);
  const mine = await labNamespaces(runner, prefix);
  if (!state) {
    return { prefix, labDir, found: mine.length > 0, phase: "unknown", rows: [], strayNamespaces: mine };
  }
  const plan = planLab(state.options);
  const rows: StatusRow[] = await Promise.all(
    plan.nodes.map(async (n) => {
      const c = plan.capsules.find((x) => x.ns === n.ns);
      const exists = mine.includes(n.ns);
      const addr = (ifname: string) => n.addresses.find((a) => a.ifname === ifname)?.cidr ?? "-";
      const home = plan.homes.find((h) => h.routerNs === n.ns);
      let pid: number | undefined;
      let listening: boolean | undefined;
      let services: StatusRow["services"];
      if (c && exists) {
        pid = await processPid(runner, c);
        listening = await isListening(runner, plan, c);
      }
      if (n.role === "ca" && plan.ca) {
        const st = exists ? await caStatus(runner, plan.ca) : { pids: {}, directory: false };
        services = caServices(plan.ca).map((s) => ({ name: s.name, pid: st.pids[s.name] }));
        listening = st.directory;
      }
      return {
        name: c?.name ?? n.short,
        role: n.role,
        namespace: n.ns,
        lan: home ? `${home.routerLan}/27` : addr("lan0"),
        wan: addr("wan0"),
        mgmt: c ? `${c.mgmtAddress}/30` : n.role === "op" ? `${n.addresses.length} links` : "-",
        pid,
        listening,
        namespaceExists: exists,
        log: c?.logFile ?? (n.role === "ca" && plan.ca ? plan.ca.caddy.logFile : "-"),
        ...(services ? { services } : {}),
      };
    }),
  );
  const order = (r: StatusRow) => ["edge", "home", "router", "ca", "client", "op", "inet"].indexOf(r.role);
  rows.sort((a, b) => order(a) - order(b));
  const known = new Set(plan.nodes.map((n) => n.ns));
  return {
    prefix,
    labDir,
    found: true,
    phase: state.phase,
    rows,
    strayNamespaces: mine.filter((n) => !known.has(n)),
  };
}

function processCell(r: StatusRow): string {
  if (r.services) {
    const procs = r.services.map((p) => `${p.name} ${p.pid === undefined ? "down" : `pid ${p.pid}`}`);
    return `${procs.join(", ")}, ACME ${r.listening ? "answering" : "not answering"}`;
  }
  if (r.role !== "edge" && r.role !== "home") return "-";
  return r.pid === undefined ? "down" : `pid ${r.pid}, ${r.listening ? "listening" : "not listening"}`;
}

/** formatStatus renders {@link LabStatus} as the table `lab status` prints. Pure. */
export function formatStatus(s: LabStatus): string {
  if (!s.found) return `no lab with prefix "${s.prefix}" (lab dir ${s.labDir})\n`;
  const head = ["NAME", "ROLE", "NAMESPACE", "LAN", "WAN", "MGMT", "PROCESS", "LOG"];
  const body = s.rows.map((r) => [
    r.name,
    r.role,
    r.namespaceExists ? r.namespace : `${r.namespace} (missing)`,
    r.lan,
    r.wan,
    r.mgmt,
    processCell(r),
    r.log,
  ]);
  const widths = head.map((h, i) => Math.max(h.length, ...body.map((row) => row[i]!.length)));
  const line = (cells: string[]) =>
    cells
      .map((c, i) => (i === cells.length - 1 ? c : c.padEnd(widths[i]!)))
      .join("  ")
      .trimEnd();
  let out = `lab ${s.prefix} (${s.phase}) in ${s.labDir}\n${[head, ...body].map(line).join("\n")}\n`;
  if (!s.rows.length) out += `namespaces without a state file: ${s.strayNamespaces.join(", ")} (run down)\n`;
  else if (s.strayNamespaces.length) out += `stray namespaces: ${s.strayNamespaces.join(", ")}\n`;
  return out;
}

/**
 * labExecArgv is the command line that runs `argv` inside lab node `name`: a capsule's network
 * and mount namespaces (nsenter), or any other lab namespace ("client", "op", "inet",
 * "homeA-rtr", or the full namespace name) via `ip netns exec`. Pure.
 */
export function labExecArgv(plan: LabPlan, name: string, argv: readonly string[]): string[] {
  if (!argv.length)
    throw new CapsuleError(ErrorCode.InvalidArgument, "exec: no command given", {
      hint: "exec NAME -- CMD...",
    });
  const c: CapsulePlan | undefined = plan.capsules.find((x) => x.name === name || x.ns === name);
  if (c) return [...enterArgv(c), ...argv];
  const n = findNode(plan, name);
  if (!n) {
    throw new CapsuleError(ErrorCode.NotFound, `no lab node "${name}"`, {
      hint: `known: ${plan.nodes.map((x) => x.short).join(", ")}`,
    });
  }
  return ["ip", "netns", "exec", n.ns, ...argv];
}

async function planFor(runner: CommandRunner, sel: LabSelector): Promise<LabPlan> {
  const prefix = sel.prefix ?? DEFAULT_PREFIX;
  const labDir = sel.labDir ?? defaultLabDir(prefix);
  const state = await readLabState(runner, labDir);
  if (!state) {
    throw new CapsuleError(ErrorCode.NotFound, `no lab state in ${labDir}`, {
      hint: "bring the lab up first: lab up",
    });
  }
  return planLab(state.options);
}

/** labExec runs `argv` inside lab node `name` (see {@link labExecArgv}) and returns its result; never throws on a non-zero exit. */
export async function labExec(
  name: string,
  argv: readonly string[],
  sel: LabSelector & { timeoutMs?: number; input?: string } = {},
  ctx: LabContext = {},
): Promise<RunResult> {
  const { runner } = seams(ctx);
  const plan = await planFor(runner, sel);
  return runner.run(labExecArgv(plan, name, argv), {
    allowFailure: true,
    timeoutMs: sel.timeoutMs ?? 30_000,
    ...(sel.input === undefined ? {} : { input: sel.input }),
  });
}

/** capsulectl runs capsulectl as the lab's operator (inside `<prefix>-op`, config `<labDir>/operator`); never throws on a non-zero exit. */
export async function capsulectl(
  args: readonly string[],
  sel: LabSelector & { timeoutMs?: number } = {},
  ctx: LabContext = {},
): Promise<RunResult> {
  const { runner } = seams(ctx);
  return runCapsulectl(runner, await planFor(runner, sel), args, sel.timeoutMs);
}

/** Lab is the same API bound to one lab: `new Lab({ prefix: "cl1234" }).up()`. */
export class Lab {
  readonly options: LabUpOptions;
  readonly ctx: LabContext;
  /** plan is this lab's plan (pure; computed from the options). */
  readonly plan: LabPlan;

  constructor(options: LabUpOptions = {}, ctx: LabContext = {}) {
    this.options = options;
    this.ctx = ctx;
    this.plan = labPlan(options);
  }

  private get sel(): LabSelector {
    return { prefix: this.plan.prefix, labDir: this.plan.labDir };
  }

  /** up: see {@link labUp}. */
  up(): Promise<LabUpResult> {
    return labUp(this.options, this.ctx);
  }

  /** down: see {@link labDown}. */
  down(): Promise<TeardownResult> {
    return labDown(this.sel, this.ctx);
  }

  /** status: see {@link labStatus}. */
  status(): Promise<LabStatus> {
    return labStatus(this.sel, this.ctx);
  }

  /** exec: see {@link labExec}. */
  exec(
    name: string,
    argv: readonly string[],
    opts: { timeoutMs?: number; input?: string } = {},
  ): Promise<RunResult> {
    const { runner } = seams(this.ctx);
    return runner.run(labExecArgv(this.plan, name, argv), {
      allowFailure: true,
      timeoutMs: opts.timeoutMs ?? 30_000,
      ...(opts.input === undefined ? {} : { input: opts.input }),
    });
  }

  /** capsulectl: see {@link capsulectl}. */
  capsulectl(args: readonly string[], opts: { timeoutMs?: number } = {}): Promise<RunResult> {
    return runCapsulectl(seams(this.ctx).runner, this.plan, args, opts.timeoutMs);
  }

  /** capsule returns the plan of capsule `name`, or throws NotFound. */
  capsule(name: string): CapsulePlan {
    const c = this.plan.capsules.find((x) => x.name === name);
    if (!c) throw new CapsuleError(ErrorCode.NotFound, `no capsule "${name}" in lab ${this.plan.prefix}`);
    return c;
  }
}
