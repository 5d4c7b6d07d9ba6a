// The policy conformance matrix, in the lab: six workloads over edge, homeA and homeB, each
// listening on 1-3 TCP/UDP ports, probed with real TCP, UDP and ICMP from every workload and
// from two capsules' own namespaces, compared with a matrix computed by an evaluator that
// shares no code with the compiler (test/helpers/matrix.ts). Rounds: no policy (default deny),
// a policy with label, name, capsule and edge selectors, after a capsuled SIGKILL + restart,
// after a workload restart, after a policy change (with a prober hammering tuples neither
// policy allows during the change, and an established connection cut within 1 s), and through
// SIGKILLs of capsuled in the middle of applies (the live table is always the old or the new).
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import t from "tap";
import { ctl, rpc, waitFor } from "../helpers/fabric.js";
import { buildImageArchive } from "../helpers/images.js";
import { isRoot, ROOT_SKIP, withLab } from "../helpers/lab.js";
import {
  expected,
  label,
  Matrix,
  type MPolicy,
  type MProto,
  type MSource,
  type MWorkload,
  policyYaml,
  type Probe,
  probesFrom,
} from "../helpers/matrix.js";

const WORKLOADS: MWorkload[] = [
  { name: "proxy", capsule: "edge", labels: { app: "proxy", tier: "edge" }, tcp: [80, 443], udp: [] },
  { name: "web", capsule: "homeA", labels: { app: "web", tier: "front" }, tcp: [8080, 8090], udp: [9000] },
  { name: "db", capsule: "homeA", labels: { app: "db", tier: "data" }, tcp: [5432], udp: [9000] },
  { name: "api", capsule: "homeB", labels: { app: "api", tier: "front" }, tcp: [8080, 8081], udp: [9000] },
  { name: "cache", capsule: "homeB", labels: { app: "cache", tier: "data" }, tcp: [6379], udp: [9000] },
  { name: "batch", capsule: "homeB", labels: { app: "batch" }, tcp: [8080], udp: [] },
];
const CAPSULES = ["edge", "homeA", "homeB"];

const DATA: MPolicy = {
  name: "data",
  allow: [
    { from: { capsule: "homeB" }, to: { workload: "cache" }, ports: ["6379/tcp", "9000/udp"] },
    { from: { workload: "proxy" }, to: { labels: { app: "web" } }, ports: ["9000/udp"] },
    {
      from: { labels: { app: "batch" } },
      to: { labels: { tier: "data" } },
      ports: ["5432/tcp", "6379/tcp", "icmp"],
    },
  ],
};
const FRONT1: MPolicy = {
  name: "front",
  allow: [
    { from: { labels: { tier: "front" } }, to: { labels: { app: "db" } }, ports: ["5432/tcp"] },
    { from: { workload: "web" }, to: { workload: "api" }, ports: ["8080-8081/tcp", "icmp"] },
    { from: { edge: "edge" }, to: { labels: { tier: "front" } }, ports: ["8080/tcp"] },
  ],
  tests: [
    { from: "web", to: "db", port: "5432/tcp", expect: "allow" },
    { from: "db", to: "web", port: "8080/tcp", expect: "deny" },
  ],
};
// The change: web -> api narrowed to 8080/tcp (8081 and icmp gone), db -> batch added.
const FRONT2: MPolicy = {
  name: "front",
  allow: [
    { from: { labels: { tier: "front" } }, to: { labels: { app: "db" } }, ports: ["5432/tcp"] },
    { from: { workload: "web" }, to: { workload: "api" }, ports: ["8080/tcp"] },
    { from: { edge: "edge" }, to: { labels: { tier: "front" } }, ports: ["8080/tcp"] },
    { from: { workload: "db" }, to: { workload: "batch" }, ports: ["8080/tcp"] },
  ],
  tests: [{ from: "web", to: "api", port: "8081/tcp", expect: "deny" }],
};

interface Live {
  address: string;
  pid: number;
}

if (!isRoot()) {
  t.plan(0, ROOT_SKIP);
} else {
  t.test("policy conformance matrix", async (t) => {
    const lab = await withLab(t);
    const dir = mkdtempSync(join(tmpdir(), "capsule-matrix-"));
    t.teardown(() => rmSync(dir, { recursive: true, force: true }));
    const m = new Matrix(lab);

    await ctl(lab, ["fabric", "enroll", "edge", "homeA"]);
    await ctl(lab, ["fabric", "enroll", "edge", "homeB"]);
    await ctl(lab, ["fabric", "enroll", "homeA", "homeB"]);
    const img = await buildImageArchive(dir, { name: "demo/idle:1" });
    await waitFor(
      async () => {
        for (const c of CAPSULES)
          if ((await lab.capsulectl(["--capsule", c, "image", "list"])).exitCode) return false;
        return true;
      },
      60_000,
      500,
    );
    for (const c of CAPSULES) await ctl(lab, ["--capsule", c, "image", "push", img.archive]);
    for (const c of CAPSULES) {
      const file = join(dir, `${c}.yaml`);
      writeFileSync(
        file,
        WORKLOADS.filter((w) => w.capsule === c)
          .map((w) =>
            JSON.stringify({
              kind: "Workload",
              name: w.name,
              labels: w.labels,
              container: { image: "demo/idle:1", command: ["sleep", "100000"] },
            }),
          )
          .join("\n---\n"),
      );
      await ctl(lab, ["--capsule", c, "apply", "-f", file, "--wait"]);
    }

    const live = new Map<string, Live>();
    const refresh = async (w: MWorkload) => {
      const g = await rpc<Live>(lab, w.capsule, "Workloads/Get", { name: w.name });
      live.set(w.name, { address: g.address, pid: g.pid });
      return g;
    };
    for (const w of WORKLOADS) {
      await refresh(w);
      await m.serve(`/proc/${live.get(w.name)?.pid}/ns/net`, w);
    }
    const sources: MSource[] = [
      ...WORKLOADS.map((w) => ({ kind: "workload" as const, w })),
      { kind: "host", capsule: "edge" },
      { kind: "host", capsule: "homeA" },
    ];
    const netnsOf = (s: MSource) =>
      s.kind === "workload"
        ? `/proc/${live.get(s.w.name)?.pid}/ns/net`
        : `/run/netns/${lab.capsule(s.capsule).ns}`;
    const tuple = (p: Probe): [MProto, string, number] => [
      p.proto,
      live.get(p.dst.name)?.address ?? "",
      p.port,
    ];

    /** round probes the whole matrix and returns the tuples that differ from `policies`. */
    const round = async (policies: MPolicy[]) => {
      const wrong: string[] = [];
      let total = 0;
      await Promise.all(
        sources.map(async (s) => {
          const probes = probesFrom(s, WORKLOADS);
          const got = await m.probe(netnsOf(s), probes.map(tuple));
          probes.forEach((p, i) => {
            total++;
            const want = expected(policies, p);
            if (got[i] !== want)
              wrong.push(`${label(p)}: ${got[i] ? "allowed" : "denied"}, want ${want ? "allow" : "deny"}`);
          });
        }),
      );
      return { wrong: wrong.sort(), total };
    };
    const check = async (name: string, policies: MPolicy[], settleMs = 0) => {
      let r = await round(policies);
      const t0 = Date.now();
      while (r.wrong.length && Date.now() - t0 < settleMs) {
        await new Promise((res) => setTimeout(res, 500));
        r = await round(policies);
      }
      const allowed = sources
        .flatMap((s) => probesFrom(s, WORKLOADS))
        .filter((p) => expected(policies, p)).length;
      t.same(r.wrong, [], `${name}: ${r.total} probes (${allowed} expected allowed), 0 unexpected`);
    };

    // 1. No policy: default deny (only a capsule's own namespace and a workload itself get through).
    await check("no policy", [], 10_000);

    // 2. The policy, applied on every capsule.
    const p1 = join(dir, "p1.yaml");
    writeFileSync(p1, policyYaml([FRONT1, DATA]));
    await ctl(lab, ["--all", "policy", "apply", "-f", p1]);
    await check("policy 1", [FRONT1, DATA], 3_000);
    t.match(
      await ctl(lab, ["--capsule", "homeB", "policy", "explain", "web", "api", "8081/tcp"]),
      /allowed by policy front rule/,
    );
    t.match(
      await ctl(lab, ["--capsule", "homeA", "policy", "explain", "db", "web", "8080/tcp"]),
      /denied: no rule/,
    );

    // 3. capsuled SIGKILL + restart on every capsule: the rules never went away.
    for (const c of CAPSULES) process.kill(Number(readFileSync(lab.capsule(c).pidFile, "utf8")), "SIGKILL");
    await check("capsuled killed", [FRONT1, DATA]);
    await lab.up();
    await check("after capsuled restart", [FRONT1, DATA]);

    // 4. A workload restart (new process; same address, same namespace or a new one).
    const api = WORKLOADS.find((w) => w.name === "api") as MWorkload;
    const oldPid = live.get("api")?.pid;
    await ctl(lab, ["--capsule", "homeB", "workload", "restart", "api"]);
    await waitFor(async () => {
      const g = await refresh(api);
      return g.pid > 0 && g.pid !== oldPid;
    }, 30_000);
    await m.serve(`/proc/${live.get("api")?.pid}/ns/net`, api).catch(() => undefined);
    await check("after a workload restart", [FRONT1, DATA], 3_000);

    // 5. The change, while (a) a prober hammers tuples neither policy allows and (b) web keeps
    // one connection to api:8081 (allowed before, denied after) busy.
    const neither = sources
      .filter((s) => s.kind === "workload")
      .flatMap((s) => probesFrom(s, WORKLOADS))
      .filter((p) => p.proto !== "icmp" && !expected([FRONT1, DATA], p) && !expected([FRONT2, DATA], p));
    const web = sources[1] as MSource;
    const hammer = Promise.all(
      ["db", "cache", "batch"].map((n) => {
        const s = sources.find((x) => x.kind === "workload" && x.w.name === n) as MSource;
        return m.hammer(netnsOf(s), neither.filter((p) => p.src === s).map(tuple), 4_000);
      }),
    );
    const stream = m.stream(netnsOf(web), live.get("api")?.address ?? "", 8081, 4_000);
    await new Promise((r) => setTimeout(r, 1_500));
    const p2 = join(dir, "p2.yaml");
    writeFileSync(p2, policyYaml([FRONT2, DATA]));
    await ctl(lab, ["--all", "policy", "apply", "-f", p2]);
    const applied = Date.now();
    const [h, times] = await Promise.all([hammer, stream]);
    const through = h.reduce((a, x) => a + x.through, 0);
    const attempts = h.reduce((a, x) => a + x.attempts, 0);
    t.equal(
      through,
      0,
      `0 of ${attempts} attempts at ${neither.length} never-allowed tuples got through during the change`,
    );
    t.ok(
      times.some((x) => x < applied - 500),
      "the connection carried traffic before the change",
    );
    const last = Math.max(...times);
    t.ok(
      last - applied < 1_000,
      `the established connection was cut ${Math.max(0, last - applied)} ms after apply returned`,
    );
    await check("policy 2", [FRONT2, DATA]);

    // 6. SIGKILL capsuled at random points during applies: the live table is always the old or
    // the new one, and nothing neither allows gets through.
    const table = async () =>
      (await lab.exec("homeB", ["nft", "list", "table", "inet", "capsule_policy"])).stdout
        .replace(/ # handle \d+/g, "")
        .replace(/packets \d+ bytes \d+/g, "packets 0 bytes 0");
    const tables = { [p2]: await table(), [p1]: "" };
    await ctl(lab, ["--capsule", "homeB", "policy", "apply", "-f", p1]);
    tables[p1] = await table();
    t.not(tables[p1], tables[p2], "the two policies compile to different tables");
    const db = sources.find((x) => x.kind === "workload" && x.w.name === "db") as MSource;
    const killHammer = m.hammer(
      netnsOf(db),
      neither.filter((p) => p.src === db && p.dst.capsule === "homeB").map(tuple),
      12_000,
    );
    let seen = 0;
    for (let i = 0; i < 6; i++) {
      const file = i % 2 ? p1 : p2;
      const apply = lab.capsulectl(["--capsule", "homeB", "policy", "apply", "-f", file]);
      await new Promise((r) => setTimeout(r, Math.floor(Math.random() * 400)));
      process.kill(Number(readFileSync(lab.capsule("homeB").pidFile, "utf8")), "SIGKILL");
      await apply;
      const now = await table();
      if (now === tables[p1] || now === tables[p2]) seen++;
      else t.fail(`after kill ${i + 1} the live table is neither the old nor the new:\n${now}`);
      await lab.up();
    }
    t.equal(seen, 6, "after each of 6 kills the live table was the old or the new policy's");
    const k = await killHammer;
    t.equal(k.through, 0, `0 of ${k.attempts} attempts at never-allowed tuples got through across the kills`);
  });
}
