// The policy manager against a FakeRunner-backed NftPolicyApplier and an in-memory store:
// default deny at boot, all-or-nothing applies (a refused ruleset leaves store and live table
// unchanged), failing tests and bad input refused by name, debounced recompiles on inventory
// changes, and a restart that enforces the persisted mesh before the fabric starts.
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { pino } from "pino";
import t, { type Test } from "tap";
import { Fabric } from "../../src/fabric/fabric.js";
import { FakeCaller, FakeDataplane, FakeHostNet } from "../../src/fabric/fakes.js";
import { generateWgKey } from "../../src/fabric/keys.js";
import type { Mesh } from "../../src/fabric/policy/model.js";
import { FabricRepo } from "../../src/fabric/repo.js";
import { FakeClock } from "../../src/node/host/clock.js";
import { FakeRunner } from "../../src/node/host/runner.js";
import { Metrics } from "../../src/node/metrics.js";
import { NftPolicyApplier, POLICY_FILE } from "../../src/node/policy/applier.js";
import { Policies } from "../../src/node/policy/manager.js";
import { meshOf } from "../../src/node/policy/mesh.js";
import { PolicyRepo } from "../../src/node/policy/repo.js";
import { Store } from "../../src/node/store/store.js";

const log = pino({ level: "silent" });

/** MESH: homeA runs web and db, homeB runs api; edge is an edge. */
function baseMesh(): Mesh {
  return {
    self: "homea",
    capsules: [
      { name: "edge", address: "100.64.1.1", edge: true },
      { name: "homea", address: "100.64.2.1", edge: false },
      { name: "homeb", address: "100.64.3.1", edge: false },
    ],
    workloads: [
      { name: "web", address: "100.64.2.2", labels: { app: "web" }, capsule: "homea" },
      { name: "db", address: "100.64.2.3", labels: { app: "db" }, capsule: "homea" },
      { name: "api", address: "100.64.3.2", labels: { app: "api" }, capsule: "homeb" },
    ],
  };
}

const WEB_DB = {
  kind: "Policy",
  name: "web-db",
  allow: [{ from: { workload: "web" }, to: { labels: { app: "db" } }, ports: ["5432/tcp"] }],
  tests: [
    { from: "web", to: "db", port: "5432/tcp", expect: "allow" },
    { from: "db", to: "web", port: "8080/tcp", expect: "deny" },
  ],
};
const OPEN_WEB = {
  kind: "Policy",
  name: "open-web",
  allow: [{ from: { labels: { app: "db" } }, to: { workload: "web" }, ports: ["8080/tcp"] }],
};

const json = (...docs: object[]) => docs.map((d) => JSON.stringify(d));

interface Rig {
  store: Store;
  repo: PolicyRepo;
  fake: FakeRunner;
  applier: NftPolicyApplier;
  policies: Policies;
  mesh: Mesh;
  dir: string;
  /** nftRuns lists the scripts nft -f loaded, in order. */
  loaded(): string[];
  reject: { check: boolean; apply: boolean };
}

function rig(t: Test, opts: { enforce?: boolean; store?: Store; dir?: string; metrics?: Metrics } = {}): Rig {
  const dir = opts.dir ?? mkdtempSync(join(tmpdir(), "policy-mgr-"));
  if (!opts.dir) t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const store = opts.store ?? Store.open(":memory:");
  const reject = { check: false, apply: false };
  const fake = new FakeRunner().on((argv) => {
    if (argv[1] === "--check" && reject.check)
      return { exitCode: 1, stderr: "Error: syntax error, unexpected" };
    if (argv[1] === "-f" && reject.apply) return { exitCode: 1, stderr: "Error: Could not process rule" };
    if (argv[1] === "-j") return { exitCode: 1, stderr: "No such file or directory" };
    return undefined;
  });
  const applier = new NftPolicyApplier({ runner: fake, stateDir: dir });
  const repo = new PolicyRepo(store);
  const r: Rig = {
    store,
    repo,
    fake,
    applier,
    dir,
    mesh: baseMesh(),
    reject,
    loaded: () => fake.commands.flatMap((c, i) => (c === "nft -f -" ? [fake.inputs[i] ?? ""] : [])),
    policies: undefined as unknown as Policies,
  };
  r.policies = new Policies({
    repo,
    applier: opts.enforce === false ? undefined : applier,
    mesh: () => r.mesh,
    fabricIface: "capsule0",
    clock: new FakeClock(),
    log,
    metrics: opts.metrics,
  });
  t.teardown(() => r.policies.stop());
  return r;
}

t.test("boot with no policies: default deny, persisted for the next boot", async (t) => {
  const r = rig(t);
  await r.policies.reconcile();
  t.same(r.fake.commands, ["nft --check -f -", "nft -j list counters table inet capsule_policy", "nft -f -"]);
  const script = r.loaded()[0] ?? "";
  t.match(
    script,
    /^table inet capsule_policy \{\n\}\ndelete table inet capsule_policy\n/,
    "whole-table replace",
  );
  t.notMatch(script, /elements = \{ 100\.64\.\d+\.\d+ \. /, "no allow element");
  t.match(script, /100\.64\.2\.2 : "wl_web"/, "a drop counter per local workload");
  t.equal(readFileSync(join(r.dir, POLICY_FILE), "utf8"), script);
  await r.policies.reconcile();
  t.equal(r.loaded().length, 1, "the same ruleset is not loaded twice");
});

t.test("apply: created, unchanged, configured; stored and enforced", async (t) => {
  const metrics = new Metrics();
  const r = rig(t, { metrics });
  metrics.registerPolicy({ drops: () => r.policies.drops(), rules: () => r.policies.ruleCount() });
  const a = await r.policies.apply(json(WEB_DB));
  t.same(a.results, [{ name: "web-db", action: "created" }]);
  t.same(
    a.tests.map((x) => [x.index, x.expect, x.got, x.passed]),
    [
      [1, "allow", "allow", true],
      [2, "deny", "deny", true],
    ],
  );
  t.equal(a.tests[0]?.rule, "policy web-db rule 1");
  t.equal(a.enforced, true);
  t.same(
    r.repo.list().map((p) => p.name),
    ["web-db"],
  );
  t.match(r.loaded().at(-1), /100\.64\.2\.2 \. 100\.64\.2\.3 \. 5432/, "web -> db 5432 allowed");

  const n = r.fake.commands.length;
  t.same((await r.policies.apply(json(WEB_DB))).results, [{ name: "web-db", action: "unchanged" }]);
  t.equal(r.fake.commands.length, n, "an unchanged apply runs nothing");

  const wider = { ...WEB_DB, allow: [{ ...WEB_DB.allow[0], ports: ["5432/tcp", "icmp"] }] };
  const apiDb = {
    ...OPEN_WEB,
    name: "api-db",
    allow: [{ from: { workload: "api" }, to: { workload: "db" }, ports: ["5432/tcp"] }],
  };
  t.same((await r.policies.apply(json(wider, apiDb))).results, [
    { name: "api-db", action: "created" },
    { name: "web-db", action: "configured" },
  ]);
  t.equal(r.loaded().length, 2);
  t.same(
    r.policies.list().map((p) => [p.name, p.rules, p.tests]),
    [
      ["api-db", 1, 0],
      ["web-db", 1, 2],
    ],
  );
  t.equal(r.policies.ruleCount(), 2);
  t.match(await metrics.registry.metrics(), /capsule_policy_apply_duration_seconds_count\{outcome="ok"\} 2/);
  t.match(await metrics.registry.metrics(), /capsule_policy_rules 2/);
});

t.test("apply: a failing test refuses the whole request, naming the test; nothing changes", async (t) => {
  const r = rig(t);
  await r.policies.apply(json(WEB_DB));
  const before = r.fake.commands.length;
  const rows = r.repo.list();
  // open-web lets db reach web on 8080: web-db's second test (stored) now fails.
  await t.rejects(r.policies.apply(json(OPEN_WEB)), {
    code: "CAPSULE_FAILED_PRECONDITION",
    message:
      "policy web-db test 2 (db -> web 8080/tcp): expected deny, got allow by policy open-web rule 1; nothing changed",
  });
  t.equal(r.fake.commands.length, before, "no nft ran");
  t.same(r.repo.list(), rows, "store unchanged");
  t.same(
    r.policies.list().map((p) => p.name),
    ["web-db"],
  );
  // The new policy's own tests count too.
  const selfFail = {
    kind: "Policy",
    name: "z",
    allow: [{ from: { workload: "api" }, to: { workload: "db" }, ports: ["5432/tcp"] }],
    tests: [{ from: "web", to: "db", port: "5432/tcp", expect: "deny" }],
  };
  await t.rejects(r.policies.apply(json(WEB_DB, selfFail)), {
    message: /^policy z test 1 \(web -> db 5432\/tcp\): expected deny, got allow by policy web-db rule 1/,
  });
});

t.test("apply: bad input is refused naming the field; nothing changes", async (t) => {
  const r = rig(t);
  const bad = { ...WEB_DB, allow: [{ ...WEB_DB.allow[0], ports: ["5432/tcp", "70000/tcp"] }] };
  await t.rejects(r.policies.apply(json(bad)), {
    code: "CAPSULE_INVALID_ARGUMENT",
    message: /^web-db: allow\.0\.ports\.1: 70000 is not a port/,
  });
  await t.rejects(r.policies.apply(["{nope"]), {
    code: "CAPSULE_INVALID_ARGUMENT",
    message: /^manifests_json\.0: is not JSON/,
  });
  await t.rejects(
    r.policies.apply(json({ ...WEB_DB, allow: [{ from: {}, to: { workload: "db" }, ports: ["1/tcp"] }] })),
    {
      message: /^web-db: allow\.0\.from: is an empty selector/,
    },
  );
  await t.rejects(r.policies.apply(json({ ...OPEN_WEB, kind: "Workload" })), {
    code: "CAPSULE_INVALID_ARGUMENT",
  });
  await t.rejects(r.policies.apply(json(WEB_DB, WEB_DB)), {
    message: /^manifests_json\.1: policy web-db is given twice/,
  });
  await t.rejects(r.policies.apply([]), { message: /^manifests_json: is empty/ });
  t.same(r.fake.commands, [], "nothing ran");
  t.same(r.repo.list(), [], "nothing stored");
});

t.test("atomicity: nft --check refuses -> store and live table unchanged", async (t) => {
  const r = rig(t);
  await r.policies.apply(json(WEB_DB));
  const rows = r.repo.list();
  const live = r.applier.lastApplied;
  const persisted = readFileSync(join(r.dir, POLICY_FILE), "utf8");
  r.reject.check = true;
  await t.rejects(
    r.policies.apply(
      json({
        ...OPEN_WEB,
        name: "zz",
        allow: [{ from: { workload: "api" }, to: { workload: "db" }, ports: ["6379/tcp"] }],
      }),
    ),
    {
      message:
        /^nft refused the policy ruleset; nothing changed: nft --check -f -: exit 1: Error: syntax error/,
    },
  );
  t.same(r.repo.list(), rows, "store unchanged");
  t.same(
    r.policies.list().map((p) => p.name),
    ["web-db"],
  );
  t.equal(r.applier.lastApplied, live, "the live ruleset is the old one");
  t.equal(readFileSync(join(r.dir, POLICY_FILE), "utf8"), persisted, "and so is the boot copy");
  t.equal(r.fake.commands.filter((c) => c === "nft -f -").length, 1, "nft -f never ran for it");
});

t.test("atomicity: nft -f fails -> the store is rolled back", async (t) => {
  const r = rig(t);
  await r.policies.apply(json(WEB_DB));
  const rows = r.repo.list();
  r.reject.apply = true;
  const wider = { ...WEB_DB, allow: [{ ...WEB_DB.allow[0], ports: ["5432-5433/tcp"] }] };
  await t.rejects(
    r.policies.apply(
      json(wider, {
        ...OPEN_WEB,
        name: "other",
        tests: [],
        allow: [{ from: { workload: "api" }, to: { workload: "db" }, ports: ["1/udp"] }],
      }),
    ),
    {
      message: /Could not process rule/,
    },
  );
  t.same(r.repo.list(), rows, "web-db back to its old document, other gone");
  t.same(
    r.policies.list().map((p) => p.name),
    ["web-db"],
  );
  await t.rejects(r.policies.delete("web-db"), /Could not process rule/);
  t.same(r.repo.list(), rows, "a refused delete keeps the policy");
  r.reject.apply = false;
  t.equal(await r.policies.delete("web-db"), true);
  t.equal(await r.policies.delete("web-db"), false, "delete is idempotent");
  t.same(r.repo.list(), []);
  t.notMatch(r.loaded().at(-1), /100\.64\.2\.2 \. 100\.64\.2\.3 \. 5432/, "what it allowed is denied again");
});

t.test(
  "tests naming workloads not in the mesh are skipped; workloads sent along make them run",
  async (t) => {
    const r = rig(t);
    const cache = {
      kind: "Policy",
      name: "cache",
      allow: [{ from: { workload: "web" }, to: { workload: "cache" }, ports: ["6379/tcp"] }],
      tests: [{ from: "web", to: "cache", port: "6379/tcp", expect: "allow" }],
    };
    const a = await r.policies.apply(json(cache));
    t.match(a.tests[0], {
      skipped: true,
      passed: true,
      message: /workload cache is not in the mesh inventory/,
    });
    t.match(a.warnings[0], { policy: "cache", index: 1, side: "to", message: /no workload named cache/ });
    // With the workload applied along (capsulectl apply -f sends policies first), the test runs.
    const wl = JSON.stringify({ kind: "Workload", name: "cache", container: { image: "demo/redis:1" } });
    const failing = { ...cache, tests: [{ from: "web", to: "cache", port: "6379/tcp", expect: "deny" }] };
    await t.rejects(r.policies.apply(json(failing), false, [wl]), {
      message:
        /^policy cache test 1 \(web -> cache 6379\/tcp\): expected deny, got allow by policy cache rule 1/,
    });
    const ok = await r.policies.apply(json(cache), true, [wl]);
    t.match(ok.tests[0], { skipped: false, passed: true, got: "allow" });
    await t.rejects(r.policies.apply(json(cache), false, ["{}"]), { message: /kind/ });
  },
);

t.test("changed(): debounced, one recompile per burst, the new inventory enforced", async (t) => {
  const r = rig(t);
  await r.policies.apply(json(WEB_DB));
  const before = r.loaded().length;
  // A new local workload labelled app=db appears (fabric.reserve -> onChange).
  r.mesh.workloads.push({ name: "db2", address: "100.64.2.4", labels: { app: "db" }, capsule: "homea" });
  const t0 = Date.now();
  for (let i = 0; i < 10; i++) r.policies.changed();
  for (let i = 0; i < 100 && r.loaded().length === before; i++)
    await new Promise((res) => setTimeout(res, 5));
  const took = Date.now() - t0;
  t.equal(r.loaded().length, before + 1, "one recompile for ten changes");
  t.ok(took < 500, `enforced ${took} ms after the change`);
  t.match(r.loaded().at(-1), /100\.64\.2\.2 \. 100\.64\.2\.4 \. 5432/, "the new db is reachable from web");
  await new Promise((res) => setTimeout(res, 60));
  t.equal(r.loaded().length, before + 1, "and no more");
  r.policies.changed();
  await new Promise((res) => setTimeout(res, 60));
  t.equal(r.loaded().length, before + 1, "an unchanged mesh loads nothing");
});

t.test("show, explain, test", async (t) => {
  const r = rig(t);
  await r.policies.apply(
    json(WEB_DB, {
      ...OPEN_WEB,
      name: "api-web",
      allow: [{ from: { capsule: "homeb" }, to: { workload: "web" }, ports: ["8080/tcp", "icmp"] }],
    }),
  );
  const show = await r.policies.show();
  t.same(show.workloads, [
    {
      name: "db",
      address: "100.64.2.3",
      drops: "0",
      allow: [
        {
          origin: "policy web-db",
          policy: "web-db",
          index: 1,
          from: "{workload: web}",
          sources: ["web (100.64.2.2)"],
          ports: ["5432/tcp"],
        },
      ],
    },
    {
      name: "web",
      address: "100.64.2.2",
      drops: "0",
      allow: [
        {
          origin: "policy api-web",
          policy: "api-web",
          index: 1,
          from: "{capsule: homeb}",
          sources: ["capsule homeb (100.64.3.1)", "api@homeb (100.64.3.2)"],
          ports: ["8080/tcp", "icmp"],
        },
      ],
    },
  ]);
  t.same(show.warnings, []);
  t.equal(show.enforced, true);

  t.match(r.policies.explain("web", "db", "5432/tcp"), {
    allowed: true,
    rule: "policy web-db rule 1",
    text: "allowed by policy web-db rule 1: from {workload: web} to {labels: {app: db}} 5432/tcp",
    srcAddress: "100.64.2.2",
    dstAddress: "100.64.2.3",
  });
  t.match(r.policies.explain("db", "100.64.2.2", "8080/tcp"), {
    allowed: false,
    rule: "",
    text: "denied: no rule",
  });
  t.match(r.policies.explain("web", "api", "8080/tcp"), { allowed: false, text: /judged by capsule homeb/ });
  t.throws(() => r.policies.explain("web", "db", "5432"), {
    code: "CAPSULE_INVALID_ARGUMENT",
    message: /^port: /,
  });
  t.throws(() => r.policies.explain("nope", "db", "5432/tcp"), { message: /^src: nope is not a workload/ });

  const tr = r.policies.test(
    json({ ...OPEN_WEB, tests: [{ from: "db", to: "web", port: "8080/tcp", expect: "allow" }] }),
  );
  t.equal(tr.passed, false, "open-web would break web-db's stored test");
  t.same(
    tr.tests.filter((x) => !x.passed).map((x) => `${x.policy} ${x.index}`),
    ["web-db 2"],
  );
  t.same(r.repo.list().length, 2, "test stores nothing");
});

t.test("without a fabric: stored and evaluated, never enforced", async (t) => {
  const r = rig(t, { enforce: false });
  r.mesh = { self: "solo", capsules: [], workloads: [] };
  const a = await r.policies.apply(json(WEB_DB));
  t.equal(a.enforced, false);
  t.match(a.tests[0], { skipped: true });
  await r.policies.reconcile();
  r.policies.changed();
  t.same(r.fake.commands, [], "nft never runs");
  t.same((await r.policies.show()).workloads, []);
  t.equal(await r.policies.delete("web-db"), true);
});

t.test(
  "restart: the stored policies and the persisted mesh are enforced before the fabric starts",
  async (t) => {
    const dir = mkdtempSync(join(tmpdir(), "policy-restart-"));
    t.teardown(() => rmSync(dir, { recursive: true, force: true }));
    const store = Store.open(join(dir, "state.db"));
    t.teardown(() => store.close());
    // What an earlier run left: a pool, a local workload, an enrolled edge peer with a workload.
    const frepo = new FabricRepo(store);
    frepo.setPool(2);
    frepo.putAddress({ name: "db", address: "100.64.2.3", labels: { app: "db" } }, "2026-01-01T00:00:00Z");
    store.tx(() =>
      frepo.upsertPeer({
        capsuleId: "cap-edge",
        name: "edge",
        wgPublicKey: generateWgKey().publicKey,
        endpoint: "192.0.2.10:51820",
        capsuleAddress: "100.64.1.1",
        pool: 1,
        apiPort: 50000,
        apiCertPem: "",
        apiFingerprint: "",
        peerKeyJwk: "{}",
        peerKeyId: "kid-edge",
        relayVia: undefined,
        peers: [],
        inventory: [{ name: "proxy", address: "100.64.1.2", labels: { app: "proxy" } }],
        inventoryGen: 3n,
        edge: true,
        enrolledAt: "2026-01-01T00:00:00Z",
        updatedAt: "2026-01-01T00:00:00Z",
      }),
    );
    new PolicyRepo(store).put({
      name: "proxy-db",
      doc: JSON.stringify({
        kind: "Policy",
        name: "proxy-db",
        allow: [
          { from: { workload: "proxy" }, to: { workload: "db" }, ports: ["5432/tcp"] },
          { from: { edge: "edge" }, to: { workload: "db" }, ports: ["5433/tcp"] },
        ],
        tests: [],
      }),
      updatedAt: "2026-01-01T00:00:00Z",
    });

    // The composition root's order: fabric built (not started), policies applied, then start.
    const dp = new FakeDataplane();
    let policies: Policies | undefined;
    const fabric = new Fabric({
      repo: frepo,
      dataplane: dp,
      net: new FakeHostNet(),
      caller: new FakeCaller(),
      clock: new FakeClock(),
      log,
      stateDir: dir,
      resyncMs: 3_600_000,
      self: {
        capsuleId: "cap-homea",
        name: "homea",
        iface: "capsule0",
        listenPort: 51820,
        endpoint: "",
        apiPort: 50000,
        apiCertPem: "",
        apiFingerprint: "",
        peerKeyJwk: "{}",
      },
      onChange: () => policies?.changed(),
    });
    t.teardown(() => fabric.stop());
    const fake = new FakeRunner().on((argv) => (argv[1] === "-j" ? { exitCode: 1 } : undefined));
    const syncsAtApply: number[] = [];
    const runner = {
      run: (argv: readonly string[], o?: { input?: string }) => {
        if (argv.join(" ") === "nft -f -") syncsAtApply.push(dp.syncs.length);
        return fake.run(argv, o);
      },
    };
    policies = new Policies({
      repo: new PolicyRepo(store),
      applier: new NftPolicyApplier({ runner, stateDir: dir }),
      mesh: () => meshOf(fabric.inventory(), fabric.peerInventories()),
      fabricIface: "capsule0",
      clock: new FakeClock(),
      log,
    });
    t.teardown(() => policies?.stop());
    await policies.reconcile();
    t.same(syncsAtApply, [0], "applied before the fabric touched WireGuard");
    const script = fake.inputs[fake.commands.indexOf("nft -f -")] ?? "";
    t.match(
      script,
      /100\.64\.1\.2 \. 100\.64\.2\.3 \. 5432/,
      "the peer's workload from the persisted inventory",
    );
    t.match(script, /100\.64\.1\.1 \. 100\.64\.2\.3 \. 5433/, "the edge flag persisted with the peer");
    await fabric.start();
    await new Promise((res) => setTimeout(res, 60));
    t.equal(dp.syncs.length, 1, "then the fabric came up");
    t.equal(syncsAtApply.length, 1, "and its recompile found nothing to change");
    t.equal(readFileSync(join(dir, POLICY_FILE), "utf8"), script);

    // The peer restarts without --edge: same generation, the flag alone is taken and enforced.
    const peer = frepo.getPeer("edge")!;
    t.equal(
      await fabric.receiveInventory(peer, { ...fabric.peerInventories()[0]!, edge: false }),
      true,
      "an edge flag change is applied without a newer generation",
    );
    t.equal(fabric.peerInventories()[0]?.edge, false);
    await new Promise((res) => setTimeout(res, 60));
    t.equal(syncsAtApply.length, 2, "recompiled after the inventory change");
    t.notMatch(
      fake.inputs.at(-1),
      /100\.64\.1\.1 \. 100\.64\.2\.3 \. 5433/,
      "no longer an edge: its rule is gone",
    );
    t.equal(
      await fabric.receiveInventory(peer, { ...fabric.peerInventories()[0]!, edge: false }),
      false,
      "the same inventory again is ignored",
    );
  },
);

t.test("meshOf: capsules and workloads sorted; a doubly claimed address kept once", async (t) => {
  const m = meshOf(
    {
      name: "homea",
      capsuleAddress: "100.64.2.1",
      entries: [
        { name: "web", address: "100.64.2.2", labels: { app: "web" } },
        { name: "probe.test", address: "100.64.2.9", labels: {} },
      ],
    },
    [
      {
        name: "zed",
        capsuleAddress: "100.64.9.1",
        entries: [{ name: "dup", address: "100.64.2.2", labels: {} }],
      },
      {
        name: "edge",
        capsuleAddress: "100.64.1.1",
        edge: true,
        entries: [{ name: "proxy", address: "100.64.1.2", labels: {} }],
      },
    ],
  );
  t.same(m, {
    self: "homea",
    capsules: [
      { name: "edge", address: "100.64.1.1", edge: true },
      { name: "homea", address: "100.64.2.1", edge: false },
      { name: "zed", address: "100.64.9.1", edge: false },
    ],
    workloads: [
      { name: "proxy", address: "100.64.1.2", labels: {}, capsule: "edge" },
      { name: "web", address: "100.64.2.2", labels: { app: "web" }, capsule: "homea" },
    ],
  });
});

t.test("capsule_policy_drops_total: per local workload, read at scrape", async (t) => {
  const dir = mkdtempSync(join(tmpdir(), "policy-drops-"));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  let packets = 3;
  const fake = new FakeRunner().on((argv) =>
    argv[1] === "-j"
      ? {
          stdout: JSON.stringify({
            nftables: [
              { counter: { name: "wl_web", packets, bytes: 0 } },
              { counter: { name: "wl_my_db", packets: 1, bytes: 0 } },
              { counter: { name: "unknown_dst", packets: 7, bytes: 0 } },
            ],
          }),
        }
      : undefined,
  );
  const policies = new Policies({
    repo: new PolicyRepo(Store.open(":memory:")),
    applier: new NftPolicyApplier({ runner: fake, stateDir: dir }),
    mesh: baseMesh,
    fabricIface: "capsule0",
    clock: new FakeClock(),
    log,
  });
  const metrics = new Metrics();
  metrics.registerPolicy({ drops: () => policies.drops(), rules: () => policies.ruleCount() });
  let text = await metrics.registry.metrics();
  t.match(text, /capsule_policy_drops_total\{workload="web"\} 3\n/);
  t.match(text, /capsule_policy_drops_total\{workload="my-db"\} 1\n/, "a deleted workload keeps its count");
  t.notMatch(text, /unknown_dst/);
  packets = 5;
  text = await metrics.registry.metrics();
  t.match(text, /capsule_policy_drops_total\{workload="web"\} 5\n/);
  t.match(
    (await policies.show()).workloads.find((w) => w.name === "web"),
    { drops: "5" },
  );
});
