// Policy benchmarks (needs root):
// - throughput forwarded through a namespace holding the compiled policy table with 10,000
//   allow entries vs the same path with no table, and vs a table with 1 entry, alternating in
//   one run (iperf3, TCP, src -> router -> dst namespaces; the router judges like a capsule);
// - compile + apply time of a mesh of 1,000 workloads x 10 rules each (all local: the worst
//   case, 10,000 set elements), nft -f in a throwaway namespace.
// - inventory change to enforced rule on a peer, in the lab: a workload created on homeA whose
//   labels a homeB policy allows, until homeB's table holds its address.
import { randomBytes } from "node:crypto";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Lab } from "../lab/lab.js";
import { compilePolicy } from "../src/fabric/policy/compile.js";
import type { Mesh, MeshWorkload, Policy, Rule } from "../src/fabric/policy/model.js";
import { ExecaRunner } from "../src/node/host/runner.js";
import { ctl, rpc, waitFor } from "../test/helpers/fabric.js";
import { buildImageArchive } from "../test/helpers/images.js";
import type { Row } from "./run.js";

const runner = new ExecaRunner();
const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)] ?? Number.NaN;
};
const ipOf = (i: number) => `100.${65 + Math.floor(i / 65536)}.${Math.floor(i / 256) % 256}.${i % 256}`;

/** throughputMesh: dst local on "rtr"; src plus `n - 1` other clients allowed to dst:5201. */
function throughputPolicy(n: number): { policies: Policy[]; mesh: Mesh } {
  const workloads: MeshWorkload[] = [
    { name: "dst", address: "100.64.1.2", labels: { app: "dst" }, capsule: "rtr" },
    { name: "src", address: "100.64.2.1", labels: { role: "client" }, capsule: "far" },
  ];
  for (let i = 1; i < n; i++)
    workloads.push({ name: `c${i}`, address: ipOf(i + 10), labels: { role: "client" }, capsule: "far" });
  return {
    mesh: {
      self: "rtr",
      capsules: [
        { name: "rtr", address: "100.64.1.254", edge: false },
        { name: "far", address: "100.64.2.254", edge: false },
      ],
      workloads,
    },
    policies: [
      {
        name: "bench",
        allow: [
          {
            from: { labels: { role: "client" } },
            to: { workload: "dst" },
            ports: [{ proto: "tcp", from: 5201, to: 5201 }],
          },
        ],
        tests: [],
      },
    ],
  };
}

async function sh(ns: string | undefined, cmd: string[], input?: string) {
  const argv = ns ? ["ip", "netns", "exec", ns, ...cmd] : cmd;
  return runner.run(argv, { timeoutMs: 60_000, ...(input !== undefined ? { input } : {}) });
}

async function throughput(rows: Row[]): Promise<void> {
  const p = `cpb${randomBytes(2).toString("hex")}`;
  const [src, rtr, dst] = [`${p}-src`, `${p}-rtr`, `${p}-dst`];
  try {
    for (const ns of [src, rtr, dst]) await sh(undefined, ["ip", "netns", "add", ns]);
    await sh(undefined, [
      "ip",
      "link",
      "add",
      "s0",
      "netns",
      src,
      "type",
      "veth",
      "peer",
      "r0",
      "netns",
      rtr,
    ]);
    await sh(undefined, [
      "ip",
      "link",
      "add",
      "d0",
      "netns",
      dst,
      "type",
      "veth",
      "peer",
      "r1",
      "netns",
      rtr,
    ]);
    for (const [ns, dev, addr] of [
      [src, "s0", "100.64.2.1/24"],
      [rtr, "r0", "100.64.2.254/24"],
      [rtr, "r1", "100.64.1.254/24"],
      [dst, "d0", "100.64.1.2/24"],
    ] as const) {
      await sh(ns, ["ip", "addr", "add", addr, "dev", dev]);
      await sh(ns, ["ip", "link", "set", dev, "up"]);
      await sh(ns, ["ip", "link", "set", "lo", "up"]);
    }
    await sh(src, ["ip", "route", "add", "100.64.0.0/10", "via", "100.64.2.254"]);
    await sh(dst, ["ip", "route", "add", "100.64.0.0/10", "via", "100.64.1.254"]);
    await sh(rtr, ["sysctl", "-qw", "net.ipv4.ip_forward=1"]);

    const table = (n: number) => {
      const { policies, mesh } = throughputPolicy(n);
      return compilePolicy({
        policies,
        implicit: [],
        mesh,
        fabricIface: "capsule0",
        fabricCidr: "100.64.0.0/10",
      }).script;
    };
    const big = table(10_000);
    const one = table(1);
    const load = async (script: string | undefined) => {
      await sh(rtr, ["nft", "flush", "ruleset"]);
      if (script) await sh(rtr, ["nft", "-f", "-"], script);
    };
    const iperf = async (): Promise<number> => {
      await sh(undefined, [
        "setsid",
        "-f",
        "ip",
        "netns",
        "exec",
        dst,
        "sh",
        "-c",
        "exec iperf3 -s -1 -B 100.64.1.2 -p 5201 >/dev/null 2>&1 </dev/null",
      ]);
      await new Promise((r) => setTimeout(r, 300));
      const r = await sh(src, ["iperf3", "-c", "100.64.1.2", "-p", "5201", "-t", "4", "-J"]);
      const j = JSON.parse(r.stdout) as { end: { sum_received: { bits_per_second: number } } };
      return j.end.sum_received.bits_per_second / 1e6;
    };
    const none: number[] = [];
    const ones: number[] = [];
    const bigs: number[] = [];
    for (let i = 0; i < 3; i++) {
      await load(undefined);
      none.push(await iperf());
      await load(one);
      ones.push(await iperf());
      await load(big);
      bigs.push(await iperf());
    }
    const elements = (
      await sh(rtr, ["nft", "list", "set", "inet", "capsule_policy", "allow_tcp"])
    ).stdout.split(",").length;
    const [n, o, b] = [median(none), median(ones), median(bigs)];
    rows.push(
      {
        bench: "policy",
        metric: `forwarded TCP, no table / 1 entry / ${elements} entries (median of 3 x 4 s, alternating)`,
        value: `${n.toFixed(0)} / ${o.toFixed(0)} / ${b.toFixed(0)} Mbit/s`,
      },
      {
        bench: "policy",
        metric: "throughput ratio: 10,000 allow entries / no table",
        value: (b / n).toFixed(3),
        target: ">= 0.95",
        ok: b / n >= 0.95,
      },
      {
        bench: "policy",
        metric: "throughput ratio: 10,000 allow entries / 1 entry",
        value: (b / o).toFixed(3),
      },
    );
  } finally {
    for (const ns of [src, rtr, dst]) await runner.run(["ip", "netns", "del", ns], { allowFailure: true });
  }
}

/** bigMesh: `n` workloads on `self`, each the target of `k` rules from other workloads. */
function bigMesh(n: number, k: number): { policies: Policy[]; mesh: Mesh } {
  const workloads: MeshWorkload[] = Array.from({ length: n }, (_, i) => ({
    name: `w${i}`,
    address: ipOf(i + 10),
    labels: { app: `a${i % 50}`, tier: `t${i % 5}` },
    capsule: "self",
  }));
  const rules: Rule[] = [];
  for (let i = 0; i < n; i++)
    for (let j = 0; j < k; j++)
      rules.push({
        from: { workload: `w${(i * 7 + j * 13 + 1) % n}` },
        to: { workload: `w${i}` },
        ports: [{ proto: j % 3 === 2 ? "udp" : "tcp", from: 8000 + j, to: 8000 + j }],
      });
  return {
    mesh: { self: "self", capsules: [{ name: "self", address: "100.64.0.1", edge: false }], workloads },
    policies: [{ name: "big", allow: rules, tests: [] }],
  };
}

async function compileApply(rows: Row[]): Promise<void> {
  const ns = `cpb${randomBytes(2).toString("hex")}-nft`;
  const { policies, mesh } = bigMesh(1000, 10);
  try {
    await sh(undefined, ["ip", "netns", "add", ns]);
    const compileMs: number[] = [];
    const applyMs: number[] = [];
    for (let i = 0; i < 5; i++) {
      const t0 = performance.now();
      const c = compilePolicy({
        policies,
        implicit: [],
        mesh,
        fabricIface: "capsule0",
        fabricCidr: "100.64.0.0/10",
      });
      const t1 = performance.now();
      await sh(ns, ["nft", "-f", "-"], c.script);
      const t2 = performance.now();
      compileMs.push(t1 - t0);
      applyMs.push(t2 - t1);
    }
    const c = median(compileMs);
    const a = median(applyMs);
    rows.push(
      {
        bench: "policy",
        metric: "compile, 1,000 local workloads x 10 rules (10,000 elements), median of 5",
        value: `${c.toFixed(0)} ms`,
      },
      {
        bench: "policy",
        metric: "apply (nft -f, whole table replaced), median of 5",
        value: `${a.toFixed(0)} ms`,
      },
      {
        bench: "policy",
        metric: "compile + apply, 1,000 workloads x 10 rules",
        value: `${(c + a).toFixed(0)} ms`,
        target: "<= 250 ms",
        ok: c + a <= 250,
      },
    );
  } finally {
    await runner.run(["ip", "netns", "del", ns], { allowFailure: true });
  }
}

async function meshPropagation(rows: Row[]): Promise<void> {
  const lab = new Lab({ prefix: "clpolb" });
  const dir = mkdtempSync(join(tmpdir(), "capsule-polbench-"));
  try {
    await lab.down();
    await lab.up();
    await ctl(lab, ["fabric", "enroll", "edge", "homeA"]);
    await ctl(lab, ["fabric", "enroll", "edge", "homeB"]);
    await ctl(lab, ["fabric", "enroll", "homeA", "homeB"]);
    const img = await buildImageArchive(dir, { name: "bench/idle:1" });
    for (const c of ["homeA", "homeB"]) {
      await waitFor(
        async () => (await lab.capsulectl(["--capsule", c, "image", "list"])).exitCode === 0,
        60_000,
        500,
      );
      await ctl(lab, ["--capsule", c, "image", "push", img.archive]);
    }
    const wl = (name: string, labels: Record<string, string>) =>
      JSON.stringify({
        kind: "Workload",
        name,
        labels,
        container: { image: "bench/idle:1", command: ["sleep", "100000"] },
      });
    const file = join(dir, "target.yaml");
    writeFileSync(
      file,
      `${wl("target", { app: "target" })}\n---\n${JSON.stringify({
        kind: "Policy",
        name: "probes",
        allow: [{ from: { labels: { role: "probe" } }, to: { workload: "target" }, ports: ["80/tcp"] }],
      })}`,
    );
    await ctl(lab, ["--capsule", "homeB", "apply", "-f", file, "--wait"]);
    // The start is homeA's "address reserved" log line (the inventory change; same clock), the
    // end the first poll of homeB's table that differs (polled every few ms).
    const reservedAt = (address: string) => {
      for (const l of readFileSync(lab.capsule("homeA").logFile, "utf8").split("\n").reverse()) {
        if (!l.includes('"address reserved"') || !l.includes(`"${address}"`)) continue;
        return (JSON.parse(l) as { time: number }).time;
      }
      throw new Error(`homeA did not log reserving ${address}`);
    };
    const table = async () =>
      (await lab.exec("homeB", ["nft", "list", "set", "inet", "capsule_policy", "allow_tcp"])).stdout;
    const samples: number[] = [];
    for (let i = 0; i < 10; i++) {
      const before = await table();
      const apply = rpc(lab, "homeA", "Workloads/Apply", {
        manifestsJson: [wl(`probe${i}`, { role: "probe" })],
      });
      let seenAt = 0;
      const ms = await waitFor(
        async () => {
          if ((await table()) === before) return false;
          seenAt = Date.now();
          return true;
        },
        15_000,
        5,
      );
      await apply;
      const { address } = await rpc<{ address: string }>(lab, "homeA", "Workloads/Get", {
        name: `probe${i}`,
      });
      if (ms < 0) throw new Error(`probe${i} (${address}) never reached homeB's table`);
      samples.push(seenAt - reservedAt(address));
    }
    const p50 = median(samples);
    rows.push({
      bench: "policy",
      metric: "inventory change on homeA (address reserved) -> enforced in homeB's table, p50 of 10",
      value: `${p50.toFixed(0)} ms (max ${Math.max(...samples).toFixed(0)})`,
      target: "p50 <= 1000 ms",
      ok: p50 <= 1000,
    });
  } finally {
    await lab.down();
    rmSync(dir, { recursive: true, force: true });
  }
}

/** run measures the policy figures (root only). */
export async function run(): Promise<Row[]> {
  const rows: Row[] = [];
  await compileApply(rows);
  await throughput(rows);
  await meshPropagation(rows);
  return rows;
}
