// The Fabric manager against fakes: several capsules in memory, wired so that a peer call on
// one lands in the other's manager, with the rendered WireGuard configs diffed as text.
import { mkdtempSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { pino } from "pino";
import t, { type Test } from "tap";
import { generateSigner } from "../../src/api/token.js";
import { Fabric, type Inventory, type SelfInfo } from "../../src/fabric/fabric.js";
import { FakeCaller, FakeDataplane, FakeHostNet } from "../../src/fabric/fakes.js";
import { FabricRepo } from "../../src/fabric/repo.js";
import { FakeClock } from "../../src/node/host/clock.js";
import { Store } from "../../src/node/store/store.js";

interface Node {
  name: string;
  fabric: Fabric;
  dp: FakeDataplane;
  net: FakeHostNet;
  caller: FakeCaller;
  repo: FabricRepo;
  dir: string;
}

async function makeNode(
  t: Test,
  name: string,
  endpoint: string,
  pool: number,
  mesh: Map<string, Node>,
): Promise<Node> {
  const dir = mkdtempSync(join(tmpdir(), "fabric-unit-"));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const store = Store.open(":memory:");
  const repo = new FabricRepo(store);
  repo.setPool(pool);
  const dp = new FakeDataplane();
  const net = new FakeHostNet();
  const caller = new FakeCaller();
  const { signer } = await generateSigner();
  const { execFileSync } = await import("node:child_process");
  const certPem = execFileSync("openssl", [
    "req",
    "-x509",
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:P-256",
    "-nodes",
    "-keyout",
    "/dev/null",
    "-subj",
    `/CN=${name}`,
    "-days",
    "1",
  ]).toString();
  const { spkiFingerprint } = await import("../../src/api/fingerprint.js");
  const fabric = new Fabric({
    repo,
    dataplane: dp,
    net,
    caller,
    clock: new FakeClock(),
    log: pino({ level: "silent" }),
    stateDir: dir,
    resyncMs: 3_600_000,
    keySwitchGraceMs: 0,
    self: {
      capsuleId: `cap-${name}`,
      name,
      iface: "capsule0",
      listenPort: 51820,
      endpoint,
      apiPort: 50000,
      apiCertPem: certPem,
      apiFingerprint: spkiFingerprint(certPem),
      peerKeyJwk: JSON.stringify(signer.publicJwk),
    },
  });
  const node = { name, fabric, dp, net, caller, repo, dir };
  // A peer call from this node lands in the target node's manager, as the API would route it.
  caller.handler = async (peer, method, req) => {
    const target = mesh.get(peer.name)!;
    const from = target.repo.getPeer(`cap-${name}`)!;
    if (method === "Fabric/PushInventory")
      return { applied: await target.fabric.receiveInventory(from, req as Inventory) };
    if (method === "Fabric/PeerKeyChanged")
      return target.fabric.peerKeyChanged(from, (req as { wgPublicKey: string }).wgPublicKey);
    throw new Error(`unexpected ${method}`);
  };
  mesh.set(name, node);
  await fabric.start();
  t.teardown(() => fabric.stop());
  return node;
}

/** enroll does what `capsulectl fabric enroll A B` does: both Selfs, then tell each about the other. */
async function enroll(a: Node, b: Node) {
  const sa: SelfInfo = a.fabric.selfInfo();
  const sb: SelfInfo = b.fabric.selfInfo();
  return [await a.fabric.enroll(sb), await b.fabric.enroll(sa)];
}

t.test("start: address, forwarding, key file private", async (t) => {
  const mesh = new Map<string, Node>();
  const a = await makeNode(t, "edge", "192.0.2.10:51820", 1, mesh);
  t.same(a.net.lines, [
    "ip addr add 100.64.1.1/10 dev capsule0",
    "ip link set capsule0 up",
    "sysctl net.ipv4.ip_forward=1",
  ]);
  t.equal(statSync(join(a.dir, "wg.key")).mode & 0o777, 0o600);
  t.equal(a.dp.syncs.length, 1);
  t.equal(a.fabric.address, "100.64.1.1");
});

t.test("enroll: direct, idempotent, AllowedIPs follow reservations, unenroll", async (t) => {
  const mesh = new Map<string, Node>();
  const edge = await makeNode(t, "edge", "192.0.2.10:51820", 1, mesh);
  const home = await makeNode(t, "homea", "", 2, mesh);
  const [r1, r2] = await enroll(edge, home);
  t.same(r1, { relayVia: "", changed: true });
  t.same(r2, { relayVia: "", changed: true });
  t.match(
    home.dp.syncs.at(-1),
    /Endpoint = 192\.0\.2\.10:51820\nAllowedIPs = 100\.64\.1\.1\/32\nPersistentKeepalive = 25/,
  );
  t.match(edge.dp.syncs.at(-1), /AllowedIPs = 100\.64\.2\.1\/32\n/);
  t.notMatch(edge.dp.syncs.at(-1), /Endpoint/, "the edge waits for the NATed home to dial");

  const before = edge.dp.syncs.length;
  const again = await enroll(edge, home);
  t.same(
    again.map((r) => r.changed),
    [false, false],
    "re-running enroll is harmless",
  );
  t.equal(edge.dp.syncs.length, before, "and does not touch WireGuard");

  const w = await home.fabric.reserve("web", { app: "web" });
  t.equal(w.address, "100.64.2.2");
  t.same(await home.fabric.reserve("web", { app: "web" }), w, "reserve is idempotent by name");
  await home.fabric.pushAll();
  t.match(edge.dp.syncs.at(-1), /AllowedIPs = 100\.64\.2\.1\/32, 100\.64\.2\.2\/32\n/);
  t.same(edge.fabric.peerInventories()[0]?.entries, [
    { name: "web", address: "100.64.2.2", labels: { app: "web" } },
  ]);

  // An old push is ignored (generation), a release is pushed.
  t.equal(
    await edge.fabric.receiveInventory(edge.repo.getPeer("homea")!, {
      ...home.fabric.inventory(),
      generation: "1",
      entries: [],
    }),
    false,
  );
  await home.fabric.release("web");
  await home.fabric.pushAll();
  t.match(edge.dp.syncs.at(-1), /AllowedIPs = 100\.64\.2\.1\/32\n/);

  t.equal(await edge.fabric.unenroll("homea"), true);
  t.equal(await edge.fabric.unenroll("homea"), false, "idempotent");
  t.notMatch(edge.dp.syncs.at(-1), /\[Peer\]/, "no stale peer");
});

t.test("enroll: two NATed homes relay through their common hub", async (t) => {
  const mesh = new Map<string, Node>();
  const edge = await makeNode(t, "edge", "192.0.2.10:51820", 1, mesh);
  const a = await makeNode(t, "homea", "", 2, mesh);
  const b = await makeNode(t, "homeb", "", 3, mesh);
  await enroll(edge, a);
  await enroll(edge, b);
  const [ra, rb] = await enroll(a, b);
  t.equal(ra?.relayVia, "edge");
  t.equal(rb?.relayVia, "edge");
  t.match(
    a.dp.syncs.at(-1),
    /AllowedIPs = 100\.64\.1\.1\/32, 100\.64\.3\.1\/32\n/,
    "homeB rides on the edge's peer entry",
  );
  t.equal((a.dp.syncs.at(-1)?.match(/\[Peer\]/g) ?? []).length, 1);
  const st = await a.fabric.status();
  t.same(
    st.peers.map((p) => [p.name, p.relayVia]),
    [
      ["edge", ""],
      ["homeb", "edge"],
    ],
  );
  await b.fabric.reserve("db", {});
  await b.fabric.pushAll();
  t.match(a.dp.syncs.at(-1), /100\.64\.3\.2\/32/);

  // Two NATed capsules with no common hub are refused with the way out.
  const c = await makeNode(t, "homec", "", 4, mesh);
  await t.rejects(enroll(a, c), { code: "CAPSULE_FAILED_PRECONDITION", message: /share no hub/ });
});

t.test("enroll: a pool conflict is refused and repool is the way out", async (t) => {
  const mesh = new Map<string, Node>();
  const a = await makeNode(t, "edge", "192.0.2.10:51820", 7, mesh);
  const b = await makeNode(t, "homea", "", 7, mesh);
  const syncs = a.dp.syncs.length;
  await t.rejects(enroll(a, b), {
    code: "CAPSULE_FAILED_PRECONDITION",
    message: /100\.64\.7\.0\/24 is claimed by both edge and homea/,
  });
  t.equal(a.dp.syncs.length, syncs, "nothing changed");
  t.same(a.repo.listPeers(), []);
  const moved = await b.fabric.repool([7]);
  t.not(moved.pool, 7);
  t.match(
    b.net.lines.join("\n"),
    /ip addr del 100\.64\.7\.1\/10 dev capsule0\nip addr add 100\.\d+\.\d+\.1\/10 dev capsule0/,
  );
  await enroll(a, b);
  await b.fabric.reserve("x", {});
  await t.rejects(
    b.fabric.repool([]),
    { code: "CAPSULE_FAILED_PRECONDITION" },
    "not once something depends on it",
  );
});

t.test("bad peer input is refused naming the field", async (t) => {
  const mesh = new Map<string, Node>();
  const a = await makeNode(t, "edge", "192.0.2.10:51820", 1, mesh);
  const b = await makeNode(t, "homea", "", 2, mesh);
  const good = b.fabric.selfInfo();
  await t.rejects(a.fabric.enroll({ ...good, wgPublicKey: "nope" }), { message: /^peer\.wgPublicKey/ });
  await t.rejects(a.fabric.enroll({ ...good, capsuleAddress: "100.64.9.1" }), {
    message: /^peer\.capsuleAddress/,
  });
  await t.rejects(a.fabric.enroll({ ...good, apiFingerprint: "SHA256:x" }), {
    message: /^peer: bad credentials/,
  });
  await t.rejects(a.fabric.enroll(a.fabric.selfInfo()), { message: /itself/ });
  t.same(a.repo.listPeers(), []);
});

t.test("rotate-key: peers learn the new key before the switch", async (t) => {
  const mesh = new Map<string, Node>();
  const edge = await makeNode(t, "edge", "192.0.2.10:51820", 1, mesh);
  const a = await makeNode(t, "homea", "", 2, mesh);
  const b = await makeNode(t, "homeb", "", 3, mesh);
  await enroll(edge, a);
  await enroll(edge, b);
  await enroll(a, b);
  const old = a.fabric.publicKey();
  const r = await a.fabric.rotateKey();
  t.not(r.publicKey, old);
  t.equal(a.fabric.publicKey(), r.publicKey);
  t.same(
    a.caller.calls.filter((c) => c.method === "Fabric/PeerKeyChanged").map((c) => c.peer),
    ["homeb", "edge"],
    "relayed peer first",
  );
  t.match(edge.dp.syncs.at(-1), new RegExp(`PublicKey = ${r.publicKey.replace(/[+/]/g, "\\$&")}`));
  t.equal(edge.repo.getPeer("homea")?.wgPublicKey, r.publicKey);
});

t.test(
  "start: a step that hangs fails the start with CAPSULE_TIMEOUT naming it; step timings logged",
  async (t) => {
    const dir = mkdtempSync(join(tmpdir(), "fabric-unit-"));
    t.teardown(() => rmSync(dir, { recursive: true, force: true }));
    const lines: Record<string, unknown>[] = [];
    const log = pino({ level: "debug" }, { write: (l: string) => void lines.push(JSON.parse(l)) });
    const mk = (dataplane: FakeDataplane) =>
      new Fabric({
        repo: new FabricRepo(Store.open(":memory:")),
        dataplane,
        net: new FakeHostNet(),
        caller: new FakeCaller(),
        clock: new FakeClock(),
        log,
        stateDir: dir,
        resyncMs: 3_600_000,
        startStepTimeoutMs: 300,
        self: {
          capsuleId: "cap-x",
          name: "x",
          iface: "capsule0",
          listenPort: 51820,
          endpoint: "",
          apiPort: 50000,
          apiCertPem: "",
          apiFingerprint: "",
          peerKeyJwk: "{}",
        },
      });
    const hung = new FakeDataplane();
    hung.ensureInterface = () => new Promise(() => {});
    const f = mk(hung);
    const t0 = Date.now();
    await t.rejects(f.start(), {
      code: "CAPSULE_TIMEOUT",
      message: "fabric start: interface did not finish within 300 ms",
    });
    t.ok(Date.now() - t0 < 3_000, "bounded");
    t.equal(f.isStarted(), false);
    t.ok(
      lines.some((l) => l["msg"] === "fabric start: step is slow" && l["step"] === "interface"),
      "the slow step is logged while it runs",
    );

    const ok = mk(new FakeDataplane());
    await ok.start();
    t.teardown(() => ok.stop());
    const up = lines.find((l) => l["msg"] === "fabric up") as { steps: Record<string, number>; ms: number };
    t.same(Object.keys(up.steps), ["key", "interface", "address", "link up", "forwarding", "peers"]);
    t.type(up.ms, "number");
  },
);
