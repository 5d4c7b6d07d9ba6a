// Exposing, both sides, against fakes and a real SQLite store: the edge's route table
// (EdgeRoutes over a FakeEdgeDataPlane: conflicts, reserved ports, rollback when the data plane
// refuses, ownership on remove, restart re-applies) and the workload capsule's exposures
// (Exposures over a fake edge link: the implicit rule edge -> workload:port, visitors for TCP,
// one visitor gateway, rollback when the edge refuses, unexpose order), plus the pure pieces:
// the policy compiler's visitor set, planPeers' visitor gateway, the return path and the CLI flags.
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { pino } from "pino";
import t, { type Test } from "tap";
import { parseExpose } from "../../src/cli/commands/expose.js";
import { FakeEdgeDataPlane } from "../../src/edge/fakes.js";
import { desiredOf, EdgeRoutes } from "../../src/edge/manager.js";
import { RouteRepo } from "../../src/edge/repo.js";
import { planPeers } from "../../src/fabric/peers.js";
import { compilePolicy, decideCompiled } from "../../src/fabric/policy/compile.js";
import type { Mesh } from "../../src/fabric/policy/model.js";
import { CapsuleError } from "../../src/errors.js";
import type { EdgeLink, EdgeRouteWire } from "../../src/node/expose/manager.js";
import { Exposures, implicitRulesOf } from "../../src/node/expose/manager.js";
import { ExposureRepo } from "../../src/node/expose/repo.js";
import { planReturnPath, VISITOR_TABLE } from "../../src/node/expose/return-path.js";
import { FakeClock } from "../../src/node/host/clock.js";
import { Store } from "../../src/node/store/store.js";

const log = pino({ level: "silent" });

function openStore(t: Test): Store {
  const dir = mkdtempSync(join(tmpdir(), "capsule-expose-"));
  const store = Store.open(join(dir, "state.db"));
  t.teardown(() => {
    store.close();
    rmSync(dir, { recursive: true, force: true });
  });
  return store;
}

function edgeRoutes(store: Store, dp = new FakeEdgeDataPlane()) {
  const routes = new EdgeRoutes({
    repo: new RouteRepo(store),
    dataplane: dp,
    publicAddress: "192.0.2.10",
    reservedPorts: () => [
      { port: 80, what: "HTTP" },
      { port: 443, what: "HTTPS" },
      { port: 50000, what: "the capsule API" },
    ],
    clock: new FakeClock(),
    log,
  });
  return { routes, dp };
}

const req = (over: Partial<Parameters<EdgeRoutes["add"]>[0]> = {}) => ({
  kind: "https" as const,
  host: "Web.Capsule.Test",
  publicPort: 0,
  upstream: "100.64.3.2:8080",
  workload: "web",
  capsule: "homeb",
  capsuleId: "id-b",
  ...over,
});

t.test("EdgeRoutes: add, idempotent re-add, conflicts and reserved ports change nothing", async (t) => {
  const { routes, dp } = edgeRoutes(openStore(t));
  await routes.start();
  t.ok(dp.started, "data plane started");
  const a = await routes.add(req());
  t.equal(a.action, "created");
  t.equal(a.row.host, "web.capsule.test", "host normalized");
  t.same(dp.current?.http, [
    { host: "web.capsule.test", upstream: "100.64.3.2:8080", workload: "web", capsule: "homeb" },
  ]);
  t.equal((await routes.add(req())).action, "unchanged");
  t.equal((await routes.add(req({ upstream: "100.64.3.2:8081" }))).action, "configured");

  const before = dp.applied.length;
  await t.rejects(routes.add(req({ capsule: "homea", capsuleId: "id-a", workload: "blog" })), {
    code: "CAPSULE_ALREADY_EXISTS",
    message: /host web\.capsule\.test is already exposed at this edge for workload web on homeb/,
  });
  await t.rejects(routes.add(req({ kind: "tcp", host: "", publicPort: 443 })), {
    code: "CAPSULE_ALREADY_EXISTS",
    message: /public port 443 is in use at the edge \(HTTPS\)/,
  });
  await t.rejects(routes.add(req({ host: "not a host" })), {
    code: "CAPSULE_INVALID_ARGUMENT",
    message: /host/,
  });
  await t.rejects(routes.add(req({ upstream: "100.64.3.2" })), {
    code: "CAPSULE_INVALID_ARGUMENT",
    message: /upstream/,
  });
  t.equal(dp.applied.length, before, "refused requests applied nothing");

  await routes.add(req({ kind: "passthrough", host: "tls.capsule.test", upstream: "100.64.3.2:443" }));
  await routes.add(req({ kind: "tcp", host: "", publicPort: 2222, upstream: "100.64.3.2:22" }));
  t.same(
    { http: dp.current?.http.length, passthrough: dp.current?.passthrough.length, tcp: dp.current?.tcp },
    {
      http: 1,
      passthrough: 1,
      tcp: [{ publicPort: 2222, upstream: "100.64.3.2:22", workload: "web", capsule: "homeb" }],
    },
  );
  await t.rejects(
    routes.add(req({ kind: "https", host: "tls.capsule.test", workload: "blog" })),
    {
      code: "CAPSULE_ALREADY_EXISTS",
      message: /host tls\.capsule\.test/,
    },
    "https and passthrough share one host space",
  );
  t.equal(
    (await routes.add(req({ kind: "https", host: "tls.capsule.test", upstream: "100.64.3.2:443" }))).action,
    "configured",
    "the owner may switch a host between passthrough and https",
  );
});

t.test("EdgeRoutes: a data plane refusal restores the old row and re-applies it", async (t) => {
  const { routes, dp } = edgeRoutes(openStore(t));
  await routes.start();
  await routes.add(req());
  dp.failNext("caddy said no");
  await t.rejects(routes.add(req({ upstream: "100.64.3.2:9999" })), { message: /caddy said no/ });
  t.equal(routes.list()[0]?.upstream, "100.64.3.2:8080", "old row kept");
  t.equal(dp.current?.http[0]?.upstream, "100.64.3.2:8080", "old state re-applied");
  dp.failNext("caddy said no again");
  await t.rejects(routes.add(req({ host: "new.capsule.test" })), { message: /again/ });
  t.equal(routes.list().length, 1, "new row removed");
});

t.test("EdgeRoutes: only the owner removes; remove is idempotent; a restart re-applies", async (t) => {
  const store = openStore(t);
  const { routes, dp } = edgeRoutes(store);
  await routes.start();
  await routes.add(req());
  await t.rejects(routes.remove("id-a", "web.capsule.test", 0), { code: "CAPSULE_PERMISSION_DENIED" });
  const again = edgeRoutes(store);
  await again.routes.start();
  t.same(again.dp.current, dp.current, "a new manager on the same store applies the same state");
  t.equal(await routes.remove("id-b", "WEB.capsule.test", 0), true);
  t.equal(await routes.remove("id-b", "web.capsule.test", 0), false, "second remove: nothing to do");
  t.same(dp.current, { http: [], passthrough: [], tcp: [] });
  t.same(desiredOf([]), { http: [], passthrough: [], tcp: [] });
});

class FakeLink implements EdgeLink {
  routes = new Map<string, EdgeRouteWire>();
  calls: string[] = [];
  fail: string | undefined;
  check(edge: string): void {
    if (edge !== "edge" && edge !== "edge2")
      throw new CapsuleError("CAPSULE_NOT_FOUND", `no enrolled capsule is called ${edge}`);
  }
  async addRoute(edge: string, r: EdgeRouteWire) {
    this.calls.push(`add ${edge} ${r.host || r.publicPort}`);
    if (this.fail) throw new CapsuleError("CAPSULE_ALREADY_EXISTS", this.fail);
    this.routes.set(`${edge} ${r.host}|${r.publicPort}`, r);
    return { publicAddress: "192.0.2.10" };
  }
  async removeRoute(edge: string, r: EdgeRouteWire) {
    this.calls.push(`remove ${edge} ${r.host || r.publicPort}`);
    return this.routes.delete(`${edge} ${r.host}|${r.publicPort}`);
  }
  async status(edge: string) {
    return [...this.routes.entries()]
      .filter(([k]) => k.startsWith(`${edge} `))
      .map(([, r]) => ({
        ...r,
        capsule: "homeb",
        edge,
        cert: "valid",
        certDetail: "",
        health: "healthy",
        publicAddress: "192.0.2.10",
      }));
  }
}

function exposures(store: Store, link = new FakeLink()) {
  const events: string[] = [];
  const addresses = new Map([
    ["web", "100.64.3.2"],
    ["ssh", "100.64.3.3"],
  ]);
  const e = new Exposures({
    repo: new ExposureRepo(store),
    address: (w) => addresses.get(w),
    edges: link,
    enforce: async () => {
      events.push(`enforce ${e.implicit().length}`);
    },
    visitorsChanged: async () => {
      events.push(`visitors ${e.visitorGateway() ?? "-"}`);
    },
    clock: new FakeClock(),
    log,
  });
  return { e, link, events, addresses };
}

const ex = (over: Partial<Parameters<Exposures["expose"]>[0]> = {}) => ({
  workload: "web",
  edge: "edge",
  host: "web.capsule.test",
  port: 8080,
  passthrough: false,
  publicPort: 0,
  ...over,
});

t.test("Exposures: the rule is enforced before the edge routes; a refusal undoes it", async (t) => {
  const { e, link, events } = exposures(openStore(t));
  const r = await e.expose(ex());
  t.equal(r.action, "created");
  t.equal(r.row.upstream, "100.64.3.2:8080");
  t.same(events, ["enforce 1"], "rule enforced (before the route: see the link calls)");
  t.same(link.calls, ["add edge web.capsule.test"]);
  t.same(e.implicit(), [
    {
      origin: "expose web https web.capsule.test at edge",
      rule: {
        from: { edge: "edge" },
        to: { workload: "web" },
        ports: [{ proto: "tcp", from: 8080, to: 8080 }],
      },
    },
  ]);
  t.equal((await e.expose(ex())).action, "unchanged");

  link.fail = "host taken";
  await t.rejects(e.expose(ex({ host: "other.capsule.test" })), { message: /host taken/ });
  t.equal(e.list().length, 1, "refused exposure not kept");
  t.equal(events[events.length - 1], "enforce 1", "rules re-enforced without it");
  link.fail = undefined;

  await t.rejects(e.expose(ex({ workload: "nope" })), {
    code: "CAPSULE_NOT_FOUND",
    message: /workload nope does not exist/,
  });
  await t.rejects(e.expose(ex({ edge: "mars" })), { code: "CAPSULE_NOT_FOUND" });
  await t.rejects(e.expose(ex({ port: 0 })), { code: "CAPSULE_INVALID_ARGUMENT", message: /port/ });
  await t.rejects(e.expose(ex({ workload: "ssh" })), {
    code: "CAPSULE_ALREADY_EXISTS",
    message: /already exposed for workload web/,
  });
});

t.test("Exposures: TCP admits visitors, through one edge only; unexpose routes off first", async (t) => {
  const { e, link, events } = exposures(openStore(t));
  await e.expose(ex({ workload: "ssh", host: "", port: 22, publicPort: 2222 }));
  t.equal(e.visitorGateway(), "edge");
  t.same(events, ["enforce 1", "visitors edge"]);
  t.equal(e.implicit()[0]?.visitors, true);
  await t.rejects(e.expose(ex({ workload: "ssh", edge: "edge2", host: "", port: 22, publicPort: 2223 })), {
    code: "CAPSULE_FAILED_PRECONDITION",
    message: /already go through edge edge/,
  });
  const views = await e.views();
  t.same([views[0]?.cert, views[0]?.health, views[0]?.publicAddress], ["valid", "healthy", "192.0.2.10"]);
  t.equal(await e.unexpose("ssh", "edge", "", 2222), true);
  t.same(link.calls.slice(-1), ["remove edge 2222"]);
  t.equal(e.visitorGateway(), undefined);
  t.same(events.slice(-2), ["enforce 0", "visitors -"]);
  t.equal(await e.unexpose("ssh", "edge", "", 2222), false, "idempotent");
  await t.rejects(e.unexpose("ssh", "edge", "web.capsule.test", 2222), { code: "CAPSULE_INVALID_ARGUMENT" });
});

t.test(
  "policy compiler: visitor rules become allow_visitors_tcp, only from the fabric interface",
  async (t) => {
    const mesh: Mesh = {
      self: "homeb",
      capsules: [
        { name: "edge", address: "100.64.1.1", edge: true },
        { name: "homeb", address: "100.64.3.1", edge: false },
      ],
      workloads: [{ name: "ssh", address: "100.64.3.3", labels: {}, capsule: "homeb" }],
    };
    const implicit = implicitRulesOf([
      {
        workload: "ssh",
        edge: "edge",
        kind: "tcp",
        host: "",
        publicPort: 2222,
        port: 22,
        upstream: "100.64.3.3:22",
        createdAt: "",
      },
    ]);
    const c = compilePolicy({
      policies: [],
      implicit,
      mesh,
      fabricIface: "capsule0",
      fabricCidr: "100.64.0.0/10",
    });
    t.match(
      c.script,
      /set allow_visitors_tcp \{\n\t\ttype ipv4_addr \. inet_service\n\t\tflags interval\n\t\telements = \{ 100\.64\.3\.3 \. 22 \}/,
    );
    t.match(
      c.script,
      /iifname "capsule0" ip saddr != 100\.64\.0\.0\/10 ip daddr \. tcp dport @allow_visitors_tcp accept/,
    );
    t.match(
      c.script,
      /100\.64\.1\.1 \. 100\.64\.3\.3 \. 22/,
      "the edge's own address is allowed too (health checks)",
    );
    const pkt = { src: "192.0.2.200", dst: "100.64.3.3", proto: "tcp" as const, port: 22 };
    t.equal(decideCompiled(c.ir, { ...pkt, iif: "fabric" }).allowed, true, "visitor via the fabric");
    t.equal(decideCompiled(c.ir, { ...pkt, iif: "other" }).allowed, false, "same visitor from elsewhere");
    t.equal(decideCompiled(c.ir, { ...pkt, port: 23, iif: "fabric" }).allowed, false, "another port");
    const none = compilePolicy({
      policies: [],
      implicit: [],
      mesh,
      fabricIface: "capsule0",
      fabricCidr: "100.64.0.0/10",
    });
    t.equal(decideCompiled(none.ir, { ...pkt, iif: "fabric" }).allowed, false, "nothing exposed: denied");
  },
);

t.test("planPeers: the visitor gateway alone gets 0.0.0.0/0", async (t) => {
  const peers = [
    {
      capsuleId: "e",
      name: "edge",
      wgPublicKey: "E",
      endpoint: "192.0.2.10:51820",
      capsuleAddress: "100.64.1.1",
      addresses: [],
      relayVia: undefined,
    },
    {
      capsuleId: "a",
      name: "homea",
      wgPublicKey: "A",
      endpoint: undefined,
      capsuleAddress: "100.64.2.1",
      addresses: ["100.64.2.2"],
      relayVia: "e",
    },
  ];
  const plain = planPeers(true, peers);
  t.notOk(plain.peers.some((p) => p.allowedIps.includes("0.0.0.0/0")));
  const gw = planPeers(true, peers, "e");
  t.same(gw.peers.find((p) => p.publicKey === "E")?.allowedIps, [
    "0.0.0.0/0",
    "100.64.1.1/32",
    "100.64.2.1/32",
    "100.64.2.2/32",
  ]);
  t.same(planPeers(true, peers, "a").peers, plain.peers, "a relayed peer cannot be the gateway");
});

t.test("return path and CLI flags", async (t) => {
  const s = planReturnPath("capsule0");
  t.match(
    s,
    /iifname "capsule0" ip saddr != 100\.64\.0\.0\/10 ip daddr 100\.64\.0\.0\/10 ct state new ct mark set ct mark or 0x00100000/,
  );
  t.match(
    s,
    /iifname != "capsule0" ct mark and 0x00100000 == 0x00100000 meta mark set meta mark or 0x00100000/,
  );
  t.match(
    s,
    /^table inet capsule_visitors \{\n\}\ndelete table inet capsule_visitors\n/,
    "whole-table replace",
  );
  t.equal(VISITOR_TABLE, 5163);

  t.same(parseExpose("web", { edge: "edge", host: "a.example.com", port: "8080" }), {
    workload: "web",
    edge: "edge",
    host: "a.example.com",
    port: 8080,
    passthrough: false,
    tcpPublicPort: 0,
  });
  t.same(parseExpose("ssh", { edge: "edge", tcp: "2222:22" }).tcpPublicPort, 2222);
  t.throws(() => parseExpose("ssh", { edge: "edge", tcp: "2222" }), { message: /--tcp/ });
  t.throws(() => parseExpose("ssh", { edge: "edge", tcp: "2222:22", host: "x.example.com" }), {
    message: /--host/,
  });
  t.throws(() => parseExpose("web", { edge: "edge", host: "a.example.com" }), { message: /--port/ });
  t.throws(() => parseExpose("web", { edge: "edge" }), { message: /--host/ });
  t.throws(() => parseExpose("web", { edge: "edge", tcp: "1:2", passthrough: true }), {
    message: /--passthrough/,
  });
});

t.test(
  "Exposures: resync follows a new address, re-sends everything on start, keeps a gone workload",
  async (t) => {
    const { e, link, addresses } = exposures(openStore(t));
    await e.expose(ex());
    link.calls.length = 0;
    await e.resync();
    t.same(link.calls, [], "nothing changed: nothing sent");
    await e.resync(true);
    t.same(link.calls, ["add edge web.capsule.test"], "on start: re-sent");
    addresses.set("web", "100.64.3.9");
    await e.resync();
    t.equal(e.list()[0]?.upstream, "100.64.3.9:8080", "stored upstream follows");
    t.equal([...link.routes.values()][0]?.upstream, "100.64.3.9:8080", "edge told");
    addresses.delete("web");
    link.calls.length = 0;
    await e.resync(true);
    t.same(link.calls, [], "a deleted workload's exposure is left alone");
    t.equal(e.list().length, 1, "and kept until unexposed");
  },
);

t.test("EdgeRoutes.checkHealth logs a route going unhealthy or its certificate failing, once", async (t) => {
  const lines: { msg: string; route: string; health: string; cert: string }[] = [];
  const logger = pino({ level: "info" }, { write: (s: string) => void lines.push(JSON.parse(s)) });
  const dp = new FakeEdgeDataPlane();
  const routes = new EdgeRoutes({
    repo: new RouteRepo(openStore(t)),
    dataplane: dp,
    publicAddress: "192.0.2.10",
    reservedPorts: () => [],
    clock: new FakeClock(),
    log: logger,
  });
  await routes.add(req());
  dp.statuses = [{ kind: "http", key: "web.capsule.test", cert: "valid", certDetail: "", health: "healthy" }];
  await routes.checkHealth();
  dp.statuses = [
    { kind: "http", key: "web.capsule.test", cert: "valid", certDetail: "", health: "unhealthy" },
  ];
  await routes.checkHealth();
  await routes.checkHealth();
  const states = lines
    .filter((l) => l.route === "web.capsule.test" && l.msg.startsWith("edge route ") && l.health)
    .map((l) => `${l.msg} ${l.health}`);
  t.same(states, ["edge route state healthy", "edge route degraded unhealthy"], "one line per change");
  await routes.stop();
});
