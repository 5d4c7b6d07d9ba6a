import t from "tap";
import {
  allocateAddress,
  capsuleAddress,
  inFabric,
  pickPool,
  poolCidr,
  poolConflicts,
  poolOf,
} from "../../src/fabric/ipam.js";
import { generateWgKey, isWgKey, wgPublicKey } from "../../src/fabric/keys.js";
import { chooseHub, planPeers, type PeerState } from "../../src/fabric/peers.js";
import { parseWgDump, renderWgConfig } from "../../src/fabric/wgconf.js";

t.test("ipam: pools, addresses, exhaustion", async (t) => {
  t.equal(poolCidr(1), "100.64.1.0/24");
  t.equal(poolCidr(16383), "100.127.255.0/24");
  t.equal(capsuleAddress(300), "100.65.44.1");
  t.equal(poolOf("100.65.44.9"), 300);
  t.ok(inFabric("100.127.255.254"));
  t.notOk(inFabric("100.128.0.1"));
  t.notOk(inFabric("192.0.2.1"));
  t.equal(allocateAddress(1, new Set()), "100.64.1.2");
  t.equal(allocateAddress(1, new Set(["100.64.1.2", "100.64.1.3"])), "100.64.1.4");
  const full = new Set(Array.from({ length: 253 }, (_, i) => `100.64.1.${i + 2}`));
  t.throws(() => allocateAddress(1, full), { code: "CAPSULE_FAILED_PRECONDITION", message: /full/ });
  t.equal(
    pickPool(new Set(), () => 4),
    5,
    "a random draw, never pool 0",
  );
  const seq = [4, 4, 4];
  let i = 0;
  // Draws of a taken pool are retried; the 64-draw budget then falls back to a scan.
  t.equal(
    pickPool(new Set([5]), () => seq[i++] ?? 9),
    10,
  );
  const all = new Set(Array.from({ length: 16383 }, (_, k) => k + 1));
  t.throws(() => pickPool(all), { code: "CAPSULE_FAILED_PRECONDITION" });
  all.delete(77);
  t.equal(
    pickPool(all, () => 0),
    77,
    "scan finds the last free pool",
  );
});

t.test("ipam: pool conflicts across the two sides of an enrollment", async (t) => {
  const a = [
    { capsuleId: "A", name: "a", pool: 1 },
    { capsuleId: "C", name: "c", pool: 3 },
  ];
  t.same(poolConflicts(a, [{ capsuleId: "B", name: "b", pool: 2 }]), []);
  t.same(
    poolConflicts(a, [{ capsuleId: "C", name: "c", pool: 3 }]),
    [],
    "the same capsule seen from both sides is fine",
  );
  const c = poolConflicts(a, [{ capsuleId: "B", name: "b", pool: 3 }]);
  t.equal(c.length, 1);
  t.same(
    c[0]?.map((x) => x.name),
    ["c", "b"],
  );
});

t.test("keys: X25519 in wg's format", async (t) => {
  const k = generateWgKey();
  t.ok(isWgKey(k.privateKey));
  t.ok(isWgKey(k.publicKey));
  t.equal(wgPublicKey(k.privateKey), k.publicKey);
  // A known vector from `wg pubkey`.
  t.equal(
    wgPublicKey("yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk="),
    "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=",
  );
  t.notOk(isWgKey("abc"));
});

const peer = (over: Partial<PeerState> & { name: string; capsuleId: string }): PeerState => ({
  wgPublicKey: `${over.name.toUpperCase().padEnd(43, "A")}=`,
  endpoint: undefined,
  capsuleAddress: "100.64.9.1",
  addresses: [],
  relayVia: undefined,
  ...over,
});

t.test("planPeers: AllowedIPs are exactly the capsule address plus hosted addresses", async (t) => {
  const edge = peer({
    name: "edge",
    capsuleId: "E",
    endpoint: "192.0.2.10:51820",
    capsuleAddress: "100.64.1.1",
    addresses: ["100.64.1.3", "100.64.1.2"],
  });
  const homeB = peer({
    name: "homeb",
    capsuleId: "B",
    capsuleAddress: "100.64.2.1",
    addresses: ["100.64.2.2"],
    relayVia: "E",
  });
  const plan = planPeers(true, [homeB, edge]);
  t.same(plan.conflicts, []);
  t.same(plan.unroutable, []);
  t.same(
    plan.peers,
    [
      {
        publicKey: edge.wgPublicKey,
        endpoint: "192.0.2.10:51820",
        allowedIps: ["100.64.1.1/32", "100.64.1.2/32", "100.64.1.3/32", "100.64.2.1/32", "100.64.2.2/32"],
        persistentKeepalive: 25,
      },
    ],
    "a relayed peer's addresses ride on its hub; keepalive because we are behind NAT",
  );
  const fromEdge = planPeers(false, [{ ...homeB, relayVia: undefined }]);
  t.equal(
    fromEdge.peers[0]?.persistentKeepalive,
    undefined,
    "a capsule with an endpoint does not keep alive",
  );
  t.equal(fromEdge.peers[0]?.endpoint, undefined, "a NATed peer has no endpoint: it dials us");
});

t.test("planPeers: conflicts and unroutable relays are reported, never both installed", async (t) => {
  const a = peer({ name: "a", capsuleId: "A", capsuleAddress: "100.64.1.1", addresses: ["100.64.5.5"] });
  const b = peer({ name: "b", capsuleId: "B", capsuleAddress: "100.64.2.1", addresses: ["100.64.5.5"] });
  const c = peer({ name: "c", capsuleId: "C", capsuleAddress: "100.64.3.1", relayVia: "GONE" });
  const plan = planPeers(false, [b, a, c]);
  t.same(plan.conflicts, [{ address: "100.64.5.5", keptBy: "a", droppedFrom: "b" }]);
  t.same(plan.unroutable, ["c"]);
  const all = plan.peers.flatMap((p) => p.allowedIps);
  t.equal(all.filter((x) => x === "100.64.5.5/32").length, 1);
});

t.test("chooseHub", async (t) => {
  const hubs = [
    { capsuleId: "E2", name: "edge2", endpoint: "192.0.2.11:51820" },
    { capsuleId: "E1", name: "edge1", endpoint: "192.0.2.10:51820" },
    { capsuleId: "N", name: "nat", endpoint: undefined },
  ];
  t.equal(
    chooseHub(
      { name: "a", endpoint: "192.0.2.5:1", peers: [] },
      { name: "b", endpoint: undefined, peers: [] },
    ),
    undefined,
  );
  t.equal(
    chooseHub(
      { name: "a", endpoint: undefined, peers: hubs },
      { name: "b", endpoint: undefined, peers: hubs },
    )?.name,
    "edge1",
  );
  t.throws(
    () =>
      chooseHub(
        { name: "a", endpoint: undefined, peers: [hubs[2]!] },
        { name: "b", endpoint: undefined, peers: [hubs[2]!] },
      ),
    { code: "CAPSULE_FAILED_PRECONDITION", message: /share no hub/ },
  );
});

t.test("wg config render and dump parse", async (t) => {
  const text = renderWgConfig({
    privateKey: "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=",
    listenPort: 51820,
    peers: [
      {
        publicKey: "P=",
        endpoint: "192.0.2.10:51820",
        allowedIps: ["100.64.1.1/32"],
        persistentKeepalive: 25,
      },
    ],
  });
  t.equal(
    text,
    [
      "[Interface]",
      "PrivateKey = yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=",
      "ListenPort = 51820",
      "",
      "[Peer]",
      "PublicKey = P=",
      "Endpoint = 192.0.2.10:51820",
      "AllowedIPs = 100.64.1.1/32",
      "PersistentKeepalive = 25",
      "",
    ].join("\n"),
  );
  const dump = parseWgDump(
    "PRIV\tPUB\t51820\toff\nPEER1\t(none)\t192.0.2.10:51820\t100.64.1.1/32,100.64.1.2/32\t1795000000\t100\t200\t25\nPEER2\t(none)\t(none)\t(none)\t0\t0\t0\toff\n",
  );
  t.equal(dump.publicKey, "PUB");
  t.equal(dump.listenPort, 51820);
  t.same(dump.peers[0], {
    publicKey: "PEER1",
    endpoint: "192.0.2.10:51820",
    allowedIps: ["100.64.1.1/32", "100.64.1.2/32"],
    latestHandshake: 1795000000,
    rxBytes: 100,
    txBytes: 200,
    persistentKeepalive: 25,
  });
  t.same(dump.peers[1]?.allowedIps, []);
  t.equal(dump.peers[1]?.endpoint, undefined);
});
