/**
 * Test helpers for the lab: a fresh lab per test with a unique prefix that is always torn down,
 * a leftover check, and small TCP tools that run inside lab nodes.
 */
import { readFileSync } from "node:fs";
import { randomBytes } from "node:crypto";
import { existsSync, readdirSync } from "node:fs";
import type { Test } from "tap";
import { Lab, type LabUpOptions, MARKER_FILE } from "../../lab/lab.js";
import { defaultLabDir } from "../../lab/plan.js";
import { ETC_NETNS } from "../../lab/resolvers.js";
import { CGROUP_PROCS, parsePids } from "../../lab/teardown.js";
import { containerdPaths } from "../../src/node/runtime/containerd.js";
import { defaultCgroupParent } from "../../src/node/runtime/containers.js";
import { ExecaRunner, type RunResult } from "../../src/node/host/runner.js";

/** ROOT_SKIP is the skip reason of every test that needs root. */
export const ROOT_SKIP = "requires superuser privileges";

/** isRoot reports whether this process may create namespaces. */
export function isRoot(): boolean {
  return process.getuid?.() === 0;
}

/** uniquePrefix returns a fresh lab prefix: "cl" and four random lowercase letters or digits. */
export function uniquePrefix(): string {
  const alphabet = "abcdefghijklmnopqrstuvwxyz0123456789";
  return `cl${[...randomBytes(4)].map((b) => alphabet[b % alphabet.length]).join("")}`;
}

/**
 * withLab brings up a fresh lab with a unique prefix (unless `opts.prefix` is set) and registers
 * a teardown that ALWAYS removes it, even when `up` throws halfway; on a failing test it first
 * prints the tail of every capsule log. Returns the {@link Lab}.
 */
export async function withLab(t: Test, opts: LabUpOptions = {}): Promise<Lab> {
  const lab = new Lab({ prefix: uniquePrefix(), ...opts });
  t.teardown(async () => {
    if (!t.passing()) {
      const runner = new ExecaRunner();
      for (const c of lab.plan.capsules) {
        const r = await runner.run(["tail", "-n", "30", c.logFile], { allowFailure: true });
        t.comment(`--- ${c.logFile}\n${r.stdout}`);
      }
    }
    const r = await lab.down();
    if (r.leftovers.length) t.fail(`lab ${lab.plan.prefix} left behind: ${r.leftovers.join(", ")}`);
  });
  await lab.up();
  return lab;
}

/**
 * leftovers lists what remains of lab `prefix`: namespaces, `/etc/netns/<prefix>-*` entries,
 * mounts under its lab dir, processes running with its lab dir on their command line (capsuled,
 * the CA's dnsmasq and Caddy; zombies excluded), the lab dir itself, and any root-namespace veth
 * named like a lab interface (the lab never makes one there).
 */
export async function leftovers(prefix: string, labDir = defaultLabDir(prefix)): Promise<string[]> {
  const r = new ExecaRunner();
  const out: string[] = [];
  const ns = (await r.run(["ip", "netns", "list"])).stdout
    .split("\n")
    .map((l) => l.split(" ")[0] ?? "")
    .filter((n) => n.startsWith(`${prefix}-`));
  out.push(...ns.map((n) => `namespace ${n}`));
  if (existsSync(ETC_NETNS)) {
    for (const e of readdirSync(ETC_NETNS)) if (e.startsWith(`${prefix}-`)) out.push(`${ETC_NETNS}/${e}`);
  }
  const mounts = (await r.run(["findmnt", "-rn", "-o", "TARGET"])).stdout
    .split("\n")
    .filter((m) => m === labDir || m.startsWith(`${labDir}/`));
  out.push(...mounts.map((m) => `mount ${m}`));
  const ps = await r.run(["ps", "-eo", "pid=,stat=,args="]);
  for (const line of ps.stdout.split("\n")) {
    const [pid, stat, ...args] = line.trim().split(/\s+/);
    if (stat?.startsWith("Z") || Number(pid) === process.pid) continue;
    if (args.join(" ").includes(`${labDir}/`)) out.push(`process ${pid} ${args.join(" ")}`);
  }
  // Workload processes: in a lab capsule's container cgroup (see lab/teardown.ts).
  for (const c of new Lab({ prefix, labDir }).plan.capsules) {
    const parent = defaultCgroupParent({
      address: containerdPaths(c.stateDir).address,
      namespace: "capsule",
      snapshotter: "overlayfs",
    });
    const procs = await r.run(["sh", "-c", CGROUP_PROCS, "cgroup-procs", parent], { allowFailure: true });
    for (const pid of parsePids(procs.stdout)) out.push(`workload process ${pid} of ${c.name}`);
  }
  const loops = await r.run(["losetup", "-n", "-l", "-O", "NAME,BACK-FILE"], { allowFailure: true });
  for (const l of loops.stdout.split("\n")) {
    const [dev, file] = l.trim().split(/\s+/);
    if (dev && file?.startsWith(`${labDir}/`)) out.push(`loop device ${dev} (${file})`);
  }
  if (existsSync(labDir))
    out.push(`directory ${labDir}${existsSync(`${labDir}/${MARKER_FILE}`) ? "" : " (unmarked)"}`);
  // The lab makes veths only inside its namespaces; one of its interface names here is a leak.
  const veths = (await r.run(["ip", "-o", "link", "show", "type", "veth"])).stdout.split("\n");
  for (const l of veths) {
    const name = l.split(":")[1]?.trim().split("@")[0] ?? "";
    if (/^(edge|client|ca|probe|wan0|lan0|mgmt0|home[A-H]\d*(-rtr)?)$/.test(name))
      out.push(`root-namespace veth ${name}`);
  }
  return out;
}

/** assertNoLeftovers fails the test for anything lab `prefix` left behind (see {@link leftovers}). */
export async function assertNoLeftovers(t: Test, prefix: string, labDir?: string): Promise<void> {
  t.same(await leftovers(prefix, labDir), [], `nothing of lab ${prefix} remains`);
}

// A TCP server that answers every connection with `reply` (or the peer's address when reply is
// "@peer") and closes; it exits by itself after `lifeSec` so a failed test never leaks it.
const SERVER =
  'const [host,port,reply,life]=process.argv.slice(1);setTimeout(()=>process.exit(0),+life*1000);require("node:net").createServer((s)=>s.end(reply==="@peer"?s.remoteAddress:reply)).listen(+port,host)';
// A TCP client that prints what the server sent; exit 0 connected, 1 error (code on stderr), 2 timeout.
const CLIENT =
  'const [host,port,ms]=process.argv.slice(1);const s=require("node:net").connect(+port,host);let d="";s.setTimeout(+ms,()=>{process.stderr.write("ETIMEDOUT");process.exit(2)});s.on("data",(x)=>{d+=x});s.on("end",()=>{process.stdout.write(d);process.exit(0)});s.on("error",(e)=>{process.stderr.write(e.code||e.message);process.exit(1)})';

/**
 * startServer starts a background TCP server in lab node `node` on `host:port` and waits (at
 * most 5 s) until it listens. It lives at most `lifeSec` seconds; `lab down` kills it earlier.
 */
export async function startServer(
  lab: Lab,
  node: string,
  host: string,
  port: number,
  reply = "hello",
  lifeSec = 120,
): Promise<void> {
  const r = await lab.exec(node, [
    "setsid",
    "-f",
    "sh",
    "-c",
    'exec >/dev/null 2>&1 </dev/null; exec env -u NODE_OPTIONS "$@"',
    "server",
    process.execPath,
    "-e",
    SERVER,
    host,
    String(port),
    reply,
    String(lifeSec),
  ]);
  if (r.exitCode !== 0) throw new Error(`starting a server in ${node}: ${r.stderr}`);
  const deadline = Date.now() + 5_000;
  for (;;) {
    const ss = await lab.exec(node, ["ss", "-Htln", `sport = :${port}`]);
    if (ss.stdout.trim()) return;
    if (Date.now() > deadline)
      throw new Error(`server in ${node} not listening on ${host}:${port} after 5 s`);
    await new Promise((res) => setTimeout(res, 50));
  }
}

/** TcpResult is what {@link tcpRequest} saw: `ok` with the server's reply, or the error code. */
export interface TcpResult {
  ok: boolean;
  reply: string;
  error: string;
}

/** tcpRequest connects from lab node `node` to `host:port` (bounded by `timeoutMs`) and returns the reply. */
export async function tcpRequest(
  lab: Lab,
  node: string,
  host: string,
  port: number,
  timeoutMs = 2_000,
): Promise<TcpResult> {
  const r = await lab.exec(
    node,
    ["env", "-u", "NODE_OPTIONS", process.execPath, "-e", CLIENT, host, String(port), String(timeoutMs)],
    { timeoutMs: timeoutMs + 10_000 },
  );
  return { ok: r.exitCode === 0, reply: r.stdout, error: r.stderr.trim() };
}

/** tcpConnect reports whether a TCP connect from lab node `node` to `host:port` succeeds within `timeoutSec`. */
export async function tcpConnect(
  lab: Lab,
  node: string,
  host: string,
  port: number,
  timeoutSec = 2,
): Promise<boolean> {
  const r = await lab.exec(
    node,
    ["timeout", String(timeoutSec), "bash", "-c", 'exec 3<>"/dev/tcp/$0/$1"', host, String(port)],
    {
      timeoutMs: timeoutSec * 1000 + 10_000,
    },
  );
  return r.exitCode === 0;
}

/** InternetHost is a throwaway namespace on the lab internet (see {@link addInternetHost}). */
export interface InternetHost {
  /** ns is `<prefix>-<short>`; `lab down` removes it with the lab. */
  ns: string;
  address: string;
  /** exec runs argv in it under `ip netns exec` (so with the lab resolv.conf); never throws on a non-zero exit. */
  exec(argv: readonly string[], timeoutMs?: number): Promise<RunResult>;
}

/**
 * addInternetHost attaches a throwaway namespace `<prefix>-<short>` to the lab internet bridge at
 * `address` (192.0.2.0/24; 192.0.2.11 is the one names under acme-test.capsule.test resolve to),
 * resolving through the lab DNS like the client. Registers a teardown that stops everything in
 * it and removes it and its /etc/netns entry; `lab down` would too (it owns the prefix).
 */
export async function addInternetHost(
  t: Test,
  lab: Lab,
  short: string,
  address: string,
): Promise<InternetHost> {
  const r = new ExecaRunner();
  const { prefix } = lab.plan;
  const ns = `${prefix}-${short}`;
  const inet = `${prefix}-inet`;
  const resolv = lab.plan.nodes.find((n) => n.role === "client")?.resolvConf;
  const etc = `${ETC_NETNS}/${ns}`;
  t.teardown(async () => {
    const pids = parsePids((await r.run(["ip", "netns", "pids", ns], { allowFailure: true })).stdout);
    if (pids.length) await r.run(["kill", "-KILL", ...pids.map(String)], { allowFailure: true });
    await r.run(["ip", "netns", "del", ns], { allowFailure: true });
    await r.run(["rm", "-rf", etc], { allowFailure: true });
  });
  for (const argv of [
    ["ip", "netns", "add", ns],
    ["ip", "-n", ns, "link", "set", "lo", "up"],
    ["ip", "-n", inet, "link", "add", short, "type", "veth", "peer", "name", "wan0", "netns", ns],
    ["ip", "-n", inet, "link", "set", short, "master", "br0", "up"],
    ["ip", "-n", ns, "addr", "add", `${address}/24`, "dev", "wan0"],
    ["ip", "-n", ns, "link", "set", "wan0", "up"],
  ])
    await r.run(argv);
  if (resolv !== undefined) {
    await r.run(["mkdir", "-p", etc]);
    await r.run(["tee", `${etc}/resolv.conf`], { input: resolv });
  }
  return {
    ns,
    address,
    exec: (argv, timeoutMs = 30_000) =>
      r.run(["ip", "netns", "exec", ns, ...argv], { allowFailure: true, timeoutMs }),
  };
}

/** killCapsuled SIGKILLs lab capsule `name`'s capsuled and waits (5 s at most) until it is gone. */
export async function killCapsuled(lab: Lab, name: string): Promise<void> {
  const pid = Number(readFileSync(lab.capsule(name).pidFile, "utf8"));
  process.kill(pid, "SIGKILL");
  const deadline = Date.now() + 5_000;
  for (;;) {
    try {
      process.kill(pid, 0);
    } catch {
      return;
    }
    if (Date.now() > deadline)
      throw new Error(`capsuled of ${name} (pid ${pid}) still alive 5 s after SIGKILL`);
    await new Promise((r) => setTimeout(r, 50));
  }
}
