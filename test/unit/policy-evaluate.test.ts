// The direct evaluator: selector resolution, decisions, explain text, warnings, policy tests.
import t from "tap";
import {
  decide,
  endpointAddress,
  explain,
  formatRule,
  rankedRules,
  resolveSelector,
  runTests,
  warnings,
} from "../../src/fabric/policy/evaluate.js";
import type { ImplicitRule, Mesh, Policy, PortRange, Rule } from "../../src/fabric/policy/model.js";

// home (100.64.1.1): web, db     away (100.64.2.1): api, cache     edge1 (100.64.3.1, edge)
const MESH: Mesh = {
  self: "home",
  capsules: [
    { name: "home", address: "100.64.1.1", edge: false },
    { name: "away", address: "100.64.2.1", edge: false },
    { name: "edge1", address: "100.64.3.1", edge: true },
  ],
  workloads: [
    { name: "web", address: "100.64.1.2", labels: { app: "web", tier: "front" }, capsule: "home" },
    { name: "db", address: "100.64.1.3", labels: { app: "db" }, capsule: "home" },
    { name: "api", address: "100.64.2.2", labels: { app: "api", tier: "front" }, capsule: "away" },
    { name: "cache", address: "100.64.2.3", labels: { app: "db", role: "cache" }, capsule: "away" },
  ],
};
const WEB = "100.64.1.2";
const DB = "100.64.1.3";
const API = "100.64.2.2";
const CACHE = "100.64.2.3";
const HOME = "100.64.1.1";
const AWAY = "100.64.2.1";
const EDGE = "100.64.3.1";

const tcp = (from: number, to = from): PortRange => ({ proto: "tcp", from, to });
const udp = (from: number, to = from): PortRange => ({ proto: "udp", from, to });
const icmp: PortRange = { proto: "icmp", from: 0, to: 0 };
const policy = (name: string, allow: Rule[], tests: Policy["tests"] = []): Policy => ({ name, allow, tests });

const WEB_DB = policy("web-db", [
  { from: { workload: "web" }, to: { labels: { app: "db" } }, ports: [tcp(5432)] },
]);

t.test("resolveSelector: each selector kind", async (t) => {
  t.same(resolveSelector({ workload: "web" }, MESH), [WEB]);
  t.same(resolveSelector({ workload: "nope" }, MESH), []);
  t.same(resolveSelector({ labels: { app: "db" } }, MESH), [DB, CACHE], "on any capsule");
  t.same(resolveSelector({ labels: { tier: "front" } }, MESH), [WEB, API]);
  t.same(
    resolveSelector({ labels: { app: "db", role: "cache" } }, MESH),
    [CACHE],
    "labels are a subset match",
  );
  t.same(resolveSelector({ labels: { app: "db", role: "primary" } }, MESH), []);
  t.same(resolveSelector({ labels: {} }, MESH), [], "an empty labels map matches nothing");
  t.same(resolveSelector({ labels: { constructor: "x" } }, MESH), [], "no prototype keys");
  t.same(
    resolveSelector({ capsule: "away" }, MESH),
    [AWAY, API, CACHE],
    "the capsule's address and its workloads",
  );
  t.same(resolveSelector({ capsule: "edge1" }, MESH), [EDGE]);
  t.same(resolveSelector({ edge: "edge1" }, MESH), [EDGE], "only the edge's own address");
  t.same(resolveSelector({ edge: "home" }, MESH), [], "a capsule that is not an edge");
  t.same(resolveSelector({ capsule: "gone" }, MESH), []);
  const twice: Mesh = {
    ...MESH,
    workloads: [...MESH.workloads, { name: "web", address: "100.64.2.9", labels: {}, capsule: "away" }],
  };
  t.same(resolveSelector({ workload: "web" }, twice), [WEB, "100.64.2.9"], "a name run by two capsules");
});

t.test("decide: default deny, rules, ports, protocols", async (t) => {
  const d = (policies: Policy[], src: string, dst: string, proto: "tcp" | "udp" | "icmp", port: number) =>
    decide(policies, [], MESH, { src, dst, proto, port });
  t.same(
    d([], WEB, DB, "tcp", 5432),
    { allowed: false, reason: "no-rule", judge: "home" },
    "no policy: denied",
  );
  t.same(d([WEB_DB], WEB, DB, "tcp", 5432), {
    allowed: true,
    reason: "rule",
    rule: { policy: "web-db", index: 0 },
    judge: "home",
  });
  t.equal(d([WEB_DB], WEB, CACHE, "tcp", 5432).judge, "away", "judged where the destination runs");
  t.equal(d([WEB_DB], WEB, CACHE, "tcp", 5432).allowed, true, "labels pick workloads on any capsule");
  t.equal(d([WEB_DB], WEB, DB, "tcp", 5433).allowed, false, "another port");
  t.equal(d([WEB_DB], WEB, DB, "udp", 5432).allowed, false, "another protocol");
  t.equal(d([WEB_DB], DB, WEB, "tcp", 5432).allowed, false, "the other direction");
  t.equal(d([WEB_DB], API, DB, "tcp", 5432).allowed, false, "another source");
  const ranges = policy("r", [
    { from: { capsule: "away" }, to: { workload: "db" }, ports: [udp(8000, 8100), icmp] },
  ]);
  t.equal(d([ranges], API, DB, "udp", 8000).allowed, true, "range start");
  t.equal(d([ranges], API, DB, "udp", 8100).allowed, true, "range end");
  t.equal(d([ranges], API, DB, "udp", 8101).allowed, false, "past the end");
  t.equal(d([ranges], API, DB, "tcp", 8050).allowed, false, "tcp is not udp");
  t.equal(d([ranges], AWAY, DB, "icmp", 0).allowed, true, "capsule selector: the capsule's own address");
  t.equal(d([ranges], CACHE, DB, "icmp", 8).allowed, true, "icmp: any type, port ignored");
  t.equal(d([ranges], WEB, DB, "icmp", 0).allowed, false);
  const edge = policy("edge", [
    { from: { edge: "edge1" }, to: { labels: { tier: "front" } }, ports: [tcp(8080)] },
  ]);
  t.equal(d([edge], EDGE, WEB, "tcp", 8080).allowed, true, "edge selector = the edge capsule's address");
  t.equal(d([edge], EDGE, API, "tcp", 8080).allowed, true);
  t.equal(d([edge], HOME, API, "tcp", 8080).allowed, false, "another capsule's address");
  t.equal(d([edge], AWAY, API, "tcp", 8080).allowed, true, "api's own capsule always reaches it");
});

t.test("decide: what is never judged", async (t) => {
  const d = (src: string, dst: string) => decide([], [], MESH, { src, dst, proto: "tcp", port: 80 });
  t.same(d(WEB, "1.1.1.1"), { allowed: true, reason: "outside-fabric" });
  t.same(d(WEB, WEB), { allowed: true, reason: "same-address" });
  t.same(d(WEB, HOME), { allowed: true, reason: "capsule-address" });
  t.same(d(API, EDGE), { allowed: true, reason: "capsule-address" });
  t.same(d(HOME, DB), { allowed: true, reason: "own-capsule" }, "the capsule reaches its own workloads");
  t.same(d(AWAY, DB), { allowed: false, reason: "no-rule", judge: "home" }, "another capsule does not");
  t.same(d(WEB, "100.64.1.99"), { allowed: false, reason: "no-rule" }, "an address not in the inventory");
  t.same(
    decide([], [], MESH, { src: WEB, dst: "10.0.0.1", proto: "tcp", port: 1 }, "10.0.0.0/8"),
    { allowed: false, reason: "no-rule" },
    "the fabric range is a parameter",
  );
});

t.test("decide: first allowing rule in policy-name order, then implicit rules", async (t) => {
  const all = { from: { labels: { app: "web" } }, to: { workload: "db" }, ports: [tcp(1, 65535)] };
  const b = policy("b", [{ from: { workload: "api" }, to: { workload: "db" }, ports: [tcp(1)] }, all]);
  const a = policy("a", [all]);
  const implicit: ImplicitRule[] = [{ origin: "expose web --edge edge1", rule: all }];
  const tuple = { src: WEB, dst: DB, proto: "tcp" as const, port: 5432 };
  t.same(
    decide([b, a], implicit, MESH, tuple).rule,
    { policy: "a", index: 0 },
    "a before b, whatever the input order",
  );
  t.same(decide([b], implicit, MESH, tuple).rule, { policy: "b", index: 1 }, "the rule's index");
  t.same(
    decide([], implicit, MESH, tuple).rule,
    { origin: "expose web --edge edge1" },
    "implicit rules last",
  );
  t.same(
    rankedRules([b, a], implicit).map((r) => r.ref),
    [
      { policy: "a", index: 0 },
      { policy: "b", index: 0 },
      { policy: "b", index: 1 },
      { origin: "expose web --edge edge1" },
    ],
  );
});

t.test("explain: one line that names the rule or says why", async (t) => {
  const ex = (policies: Policy[], src: string, dst: string, proto: "tcp" | "icmp", port: number) =>
    explain(policies, [], MESH, { src, dst, proto, port });
  t.equal(
    ex([WEB_DB], WEB, DB, "tcp", 5432),
    "allowed by policy web-db rule 1: from {workload: web} to {labels: {app: db}} 5432/tcp",
  );
  t.equal(ex([WEB_DB], DB, WEB, "tcp", 8080), "denied: no rule");
  t.equal(
    ex([], WEB, "100.64.1.99", "tcp", 80),
    "denied: no rule (100.64.1.99 is not a workload in the mesh inventory)",
  );
  t.equal(ex([], WEB, "192.0.2.1", "tcp", 80), "allowed: not judged (192.0.2.1 is not a fabric address)");
  t.equal(
    ex([], WEB, WEB, "tcp", 80),
    "allowed: not judged (a workload reaching its own address never leaves its namespace)",
  );
  t.equal(ex([], WEB, AWAY, "tcp", 80), "allowed: not judged (100.64.2.1 is capsule away's own address)");
  t.equal(ex([], HOME, WEB, "tcp", 80), "allowed: not judged (capsule home reaches its own workloads)");
  const implicit: ImplicitRule[] = [
    {
      origin: "expose web --edge edge1",
      rule: { from: { edge: "edge1" }, to: { workload: "web" }, ports: [tcp(8080)] },
    },
  ];
  t.equal(
    explain([], implicit, MESH, { src: EDGE, dst: WEB, proto: "tcp", port: 8080 }),
    "allowed by implicit rule (expose web --edge edge1): from {edge: edge1} to {workload: web} 8080/tcp",
  );
  t.equal(
    formatRule({
      from: { labels: { tier: "front", app: "web" } },
      to: { capsule: "home" },
      ports: [tcp(80), udp(8000, 8100), icmp],
    }),
    "from {labels: {app: web, tier: front}} to {capsule: home} 80/tcp, 8000-8100/udp, icmp",
    "labels sorted, ports as written",
  );
});

t.test("warnings: selectors that match nothing", async (t) => {
  const p = policy("p", [
    { from: { workload: "ghost" }, to: { labels: {} }, ports: [tcp(1)] },
    { from: { labels: { app: "nope" } }, to: { workload: "db" }, ports: [tcp(1)] },
    { from: { capsule: "gone" }, to: { edge: "edge1" }, ports: [tcp(1)] },
    { from: { edge: "home" }, to: { capsule: "edge1" }, ports: [tcp(1)] },
    { from: { edge: "edge1" }, to: { capsule: "away" }, ports: [tcp(1)] },
  ]);
  t.same(warnings([p, WEB_DB], MESH), [
    {
      policy: "p",
      index: 0,
      side: "from",
      message: "{workload: ghost} matches nothing: no workload named ghost in the mesh",
    },
    {
      policy: "p",
      index: 0,
      side: "to",
      message: "{labels: {}} matches nothing: an empty labels selector matches nothing",
    },
    {
      policy: "p",
      index: 1,
      side: "from",
      message: "{labels: {app: nope}} matches nothing: no workload has labels {app: nope}",
    },
    {
      policy: "p",
      index: 2,
      side: "from",
      message: "{capsule: gone} matches nothing: no capsule named gone in the mesh",
    },
    {
      policy: "p",
      index: 2,
      side: "to",
      message:
        "{edge: edge1} matches nothing: edge edge1's own address is never judged; as a destination this selects no workload",
    },
    {
      policy: "p",
      index: 3,
      side: "from",
      message: "{edge: home} matches nothing: capsule home is not an edge",
    },
    {
      policy: "p",
      index: 3,
      side: "to",
      message:
        "{capsule: edge1} matches nothing: capsule edge1 runs no workload (its own address is never judged)",
    },
  ]);
  t.same(warnings([WEB_DB], MESH), []);
});

t.test("runTests: workload names through the mesh; failures say why", async (t) => {
  const p = policy("web-db", WEB_DB.allow, [
    { from: "web", to: "db", port: tcp(5432), expect: "allow" },
    { from: "db", to: "web", port: tcp(8080), expect: "deny" },
    { from: "web", to: "db", port: tcp(5433), expect: "allow" },
    { from: "web", to: "ghost", port: tcp(1), expect: "deny" },
    { from: "web", to: "web", port: icmp, expect: "allow" },
  ]);
  const other = policy("a-other", [], [{ from: "ghost", to: "db", port: tcp(1), expect: "deny" }]);
  const r = runTests([p, other], [], MESH);
  t.same(
    r.map((x) => [x.policy, x.index, x.passed, x.message]),
    [
      ["a-other", 0, false, "ghost -> db 1/tcp: workload ghost is not in the mesh inventory"],
      [
        "web-db",
        0,
        true,
        "web -> db 5432/tcp: allow (allowed by policy web-db rule 1: from {workload: web} to {labels: {app: db}} 5432/tcp)",
      ],
      ["web-db", 1, true, "db -> web 8080/tcp: deny (denied: no rule)"],
      ["web-db", 2, false, "web -> db 5433/tcp: expected allow, got denied: no rule"],
      ["web-db", 3, false, "web -> ghost 1/tcp: workload ghost is not in the mesh inventory"],
      [
        "web-db",
        4,
        true,
        "web -> web icmp: allow (allowed: not judged (a workload reaching its own address never leaves its namespace))",
      ],
    ],
  );
  t.same(r[1]?.verdict?.rule, { policy: "web-db", index: 0 });
  t.equal(r[0]?.verdict, undefined);
  // Tests see every policy: another policy's rule can make this one's test pass.
  const q = policy("q", [], [{ from: "web", to: "db", port: tcp(5432), expect: "allow" }]);
  t.same(
    runTests([q, WEB_DB], [], MESH).map((x) => x.passed),
    [true],
  );
  // A name that two capsules run: every pair must agree.
  const twice: Mesh = {
    ...MESH,
    workloads: [...MESH.workloads, { name: "db", address: "100.64.2.9", labels: {}, capsule: "away" }],
  };
  const only = policy(
    "only",
    [{ from: { workload: "web" }, to: { labels: { app: "db" } }, ports: [tcp(5432)] }],
    [{ from: "web", to: "db", port: tcp(5432), expect: "allow" }],
  );
  t.same(
    runTests([only], [], twice).map((x) => x.message),
    ["web -> db 5432/tcp: expected allow, got denied: no rule for 100.64.1.2 -> 100.64.2.9"],
  );
});

t.test("endpointAddress: address, workload, capsule", async (t) => {
  t.equal(endpointAddress(MESH, "100.64.9.9"), "100.64.9.9");
  t.equal(endpointAddress(MESH, "db"), DB);
  t.equal(endpointAddress(MESH, "edge1"), EDGE);
  t.throws(() => endpointAddress(MESH, "ghost", "SRC"), {
    code: "CAPSULE_INVALID_ARGUMENT",
    message: "SRC: ghost is not a workload, capsule or IPv4 address in the mesh",
  });
  const twice: Mesh = {
    ...MESH,
    workloads: [...MESH.workloads, { name: "db", address: "100.64.2.9", labels: {}, capsule: "away" }],
  };
  t.throws(() => endpointAddress(twice, "db", "DST"), { message: "DST: workload db runs on home, away" });
});
