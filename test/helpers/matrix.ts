/**
 * The policy conformance matrix's tools: servers and probers that run with the host's node and
 * busybox inside a workload's (or capsule's) network namespace, and an expected-matrix
 * evaluator written independently of src/fabric/policy (it shares no code with the compiler).
 *
 * Servers and probers run with `nsenter --net=...` rather than inside the container image
 * because the busybox in the test images has no UDP client or server; the packets they send
 * and receive are the workload's own (same namespace, same fabric address, same veth).
 */
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import type { Lab } from "../../lab/lab.js";
import { ExecaRunner } from "../../src/node/host/runner.js";

/** Proto of a probe. */
export type MProto = "tcp" | "udp" | "icmp";

/** MWorkload is one workload of the matrix: where it runs, its labels and what it listens on. */
export interface MWorkload {
  name: string;
  capsule: string;
  labels: Record<string, string>;
  tcp: number[];
  udp: number[];
}

/** MSelector mirrors the contract's selectors (one key). */
export type MSelector =
  { workload: string } | { labels: Record<string, string> } | { capsule: string } | { edge: string };

/** MRule is an allow rule as the test writes it. */
export interface MRule {
  from: MSelector;
  to: MSelector;
  ports: string[];
}

/** MPolicy is a Policy document as the test writes it. */
export interface MPolicy {
  name: string;
  allow: MRule[];
  tests?: { from: string; to: string; port: string; expect: "allow" | "deny" }[];
}

/** MSource is who sends: a workload, or a capsule's own host namespace (its agent). */
export type MSource = { kind: "workload"; w: MWorkload } | { kind: "host"; capsule: string };

/** Probe is one tuple: from a source to a workload's port (port 0 for icmp). */
export interface Probe {
  src: MSource;
  dst: MWorkload;
  proto: MProto;
  port: number;
}

/** policyYaml renders policies as manifest documents (JSON is YAML). */
export function policyYaml(policies: readonly MPolicy[]): string {
  return policies.map((p) => JSON.stringify({ kind: "Policy", ...p })).join("\n---\n");
}

function portMatches(spec: string, proto: MProto, port: number): boolean {
  if (spec === "icmp") return proto === "icmp";
  const m = /^(\d+)(?:-(\d+))?\/(tcp|udp)$/.exec(spec);
  if (!m) throw new Error(`bad port spec in the test: ${spec}`);
  const lo = Number(m[1]);
  const hi = Number(m[2] ?? m[1]);
  return m[3] === proto && port >= lo && port <= hi;
}

function labelsMatch(want: Record<string, string>, have: Record<string, string>): boolean {
  const keys = Object.keys(want);
  return keys.length > 0 && keys.every((k) => have[k] === want[k]);
}

function srcMatches(sel: MSelector, src: MSource): boolean {
  if ("workload" in sel) return src.kind === "workload" && src.w.name === sel.workload;
  if ("labels" in sel) return src.kind === "workload" && labelsMatch(sel.labels, src.w.labels);
  if ("capsule" in sel) return (src.kind === "workload" ? src.w.capsule : src.capsule) === sel.capsule;
  return src.kind === "host" && src.capsule === sel.edge;
}

function dstMatches(sel: MSelector, dst: MWorkload): boolean {
  if ("workload" in sel) return dst.name === sel.workload;
  if ("labels" in sel) return labelsMatch(sel.labels, dst.labels);
  if ("capsule" in sel) return dst.capsule === sel.capsule;
  return false;
}

/**
 * expected is the contract's answer for one probe: the destination capsule's own host reaches
 * its workloads; a workload reaches itself; otherwise some rule must allow it.
 */
export function expected(policies: readonly MPolicy[], p: Probe): boolean {
  if (p.src.kind === "host" && p.src.capsule === p.dst.capsule) return true;
  if (p.src.kind === "workload" && p.src.w.name === p.dst.name) return true;
  return policies.some((pol) =>
    pol.allow.some(
      (r) =>
        srcMatches(r.from, p.src) &&
        dstMatches(r.to, p.dst) &&
        r.ports.some((s) => portMatches(s, p.proto, p.port)),
    ),
  );
}

/** probesFrom lists every tuple from `src`: each workload's ports and ICMP. */
export function probesFrom(src: MSource, workloads: readonly MWorkload[]): Probe[] {
  return workloads.flatMap((dst) => [
    ...dst.tcp.map((port) => ({ src, dst, proto: "tcp" as const, port })),
    ...dst.udp.map((port) => ({ src, dst, proto: "udp" as const, port })),
    { src, dst, proto: "icmp" as const, port: 0 },
  ]);
}

/** label is a probe as one line: "web -> api 8080/tcp". */
export function label(p: Probe): string {
  const s = p.src.kind === "workload" ? p.src.w.name : `${p.src.capsule}(host)`;
  return `${s} -> ${p.dst.name} ${p.proto === "icmp" ? "icmp" : `${p.port}/${p.proto}`}`;
}

// Echo server: every TCP connection and UDP datagram gets its bytes back. Exits after `life` s.
const SERVER = `
const [life, ...specs] = process.argv.slice(2);
setTimeout(() => process.exit(0), +life * 1000);
for (const s of specs) {
  const [proto, port] = s.split(":");
  if (proto === "tcp") require("node:net").createServer((c) => { c.on("error", () => {}); c.pipe(c); }).listen(+port, "0.0.0.0");
  else { const u = require("node:dgram").createSocket("udp4"); u.on("message", (m, r) => u.send(m, r.port, r.address)); u.bind(+port, "0.0.0.0"); }
}`;

// Prober: argv[1] is JSON [[proto, host, port], ...]; prints JSON booleans (reply seen within ms).
const PROBER = `
const [list, ms] = process.argv.slice(2);
const one = ([proto, host, port]) => new Promise((done) => {
  const t = setTimeout(() => fin(false), +ms);
  let sock;
  const fin = (ok) => { clearTimeout(t); try { sock && (sock.destroy ? sock.destroy() : sock.close()); } catch {} done(ok); };
  if (proto === "tcp") {
    sock = require("node:net").connect(+port, host, () => sock.write("ok"));
    sock.on("data", (d) => fin(String(d).startsWith("ok")));
    sock.on("error", () => fin(false));
  } else if (proto === "udp") {
    sock = require("node:dgram").createSocket("udp4");
    sock.on("message", (m) => fin(String(m) === "ok"));
    sock.on("error", () => fin(false));
    sock.send("ok", +port, host);
  } else {
    const p = require("node:child_process").spawn("busybox", ["ping", "-c", "1", "-W", "1", host], { stdio: "ignore" });
    p.on("exit", (c) => fin(c === 0));
  }
});
Promise.all(JSON.parse(list).map(one)).then((r) => { process.stdout.write(JSON.stringify(r)); process.exit(0); });`;

// Loop prober: hammers the tuples for `dur` ms (one attempt each per round) and prints how many
// attempts got a reply.
const LOOP = `
const [list, dur] = process.argv.slice(2);
const tuples = JSON.parse(list);
const end = Date.now() + +dur;
let through = 0, attempts = 0;
const one = ([proto, host, port]) => new Promise((done) => {
  let sock;
  const fin = (ok) => { clearTimeout(t); if (ok) through++; attempts++; try { sock.destroy ? sock.destroy() : sock.close(); } catch {} done(); };
  const t = setTimeout(() => fin(false), 300);
  if (proto === "tcp") { sock = require("node:net").connect(+port, host, () => sock.write("ok")); sock.on("data", () => fin(true)); sock.on("error", () => fin(false)); }
  else { sock = require("node:dgram").createSocket("udp4"); sock.on("message", () => fin(true)); sock.on("error", () => fin(false)); sock.send("ok", +port, host); }
});
(async () => { while (Date.now() < end) await Promise.all(tuples.map(one)); process.stdout.write(JSON.stringify({ through, attempts })); process.exit(0); })();`;

// Stream: one long TCP connection sending a line every 50 ms; prints the times replies came back.
const STREAM = `
const [host, port, dur] = process.argv.slice(2);
const times = [];
const s = require("node:net").connect(+port, host);
s.on("data", () => times.push(Date.now()));
s.on("error", () => {});
const iv = setInterval(() => s.write("ok"), 50);
setTimeout(() => { clearInterval(iv); process.stdout.write(JSON.stringify(times)); process.exit(0); }, +dur);`;

/** Netns is where a server or prober runs: a path for `nsenter --net`. */
export type Netns = string;

/**
 * Matrix runs servers and probers in lab namespaces. Scripts are written under the lab dir so
 * `lab down` kills anything still running from them.
 */
export class Matrix {
  private readonly runner = new ExecaRunner();
  private readonly dir: string;

  constructor(
    private readonly lab: Lab,
    private readonly node = process.execPath,
  ) {
    this.dir = lab.plan.labDir;
    for (const [f, s] of Object.entries({ SERVER, PROBER, LOOP, STREAM }))
      writeFileSync(join(this.dir, `matrix-${f.toLowerCase()}.js`), s);
  }

  private argv(netns: Netns, script: string, args: string[]): string[] {
    return [
      "nsenter",
      `--net=${netns}`,
      "--",
      "env",
      "-u",
      "NODE_OPTIONS",
      this.node,
      join(this.dir, `matrix-${script}.js`),
      ...args,
    ];
  }

  /** serve starts a detached echo server in `netns` on the workload's ports (lives `lifeSec`). */
  async serve(netns: Netns, w: MWorkload, lifeSec = 900): Promise<void> {
    const specs = [...w.tcp.map((p) => `tcp:${p}`), ...w.udp.map((p) => `udp:${p}`)];
    // Detached with its stdio closed, or the runner would wait for the server's pipes.
    await this.runner.run(
      [
        "setsid",
        "-f",
        "sh",
        "-c",
        'exec >/dev/null 2>&1 </dev/null; exec "$@"',
        "server",
        ...this.argv(netns, "server", [String(lifeSec), ...specs]),
      ],
      { timeoutMs: 5_000 },
    );
    const deadline = Date.now() + 5_000;
    for (;;) {
      const ss = await this.runner.run(["nsenter", `--net=${netns}`, "ss", "-Htlun"], { allowFailure: true });
      const listening = specs.every((s) => ss.stdout.includes(`:${s.split(":")[1]} `));
      if (listening) return;
      if (Date.now() > deadline) throw new Error(`servers of ${w.name} not listening after 5 s`);
      await new Promise((r) => setTimeout(r, 50));
    }
  }

  /** probe runs every tuple from `netns` in parallel and returns which got a reply within `ms`. */
  async probe(netns: Netns, tuples: [MProto, string, number][], ms = 1500): Promise<boolean[]> {
    const r = await this.runner.run(this.argv(netns, "prober", [JSON.stringify(tuples), String(ms)]), {
      timeoutMs: ms + 15_000,
    });
    return JSON.parse(r.stdout) as boolean[];
  }

  /** hammer probes `tuples` from `netns` repeatedly for `durMs` and counts replies. */
  async hammer(
    netns: Netns,
    tuples: [MProto, string, number][],
    durMs: number,
  ): Promise<{ through: number; attempts: number }> {
    const r = await this.runner.run(this.argv(netns, "loop", [JSON.stringify(tuples), String(durMs)]), {
      timeoutMs: durMs + 15_000,
    });
    return JSON.parse(r.stdout) as { through: number; attempts: number };
  }

  /** stream keeps one TCP connection busy for `durMs` and returns the times replies arrived. */
  async stream(netns: Netns, host: string, port: number, durMs: number): Promise<number[]> {
    const r = await this.runner.run(this.argv(netns, "stream", [host, String(port), String(durMs)]), {
      timeoutMs: durMs + 15_000,
    });
    return JSON.parse(r.stdout) as number[];
  }
}
