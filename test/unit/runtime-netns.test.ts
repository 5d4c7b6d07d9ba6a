// WorkloadNet over a FakeRunner and a FakeNetlink: names, the ip lines of a first ensure (golden),
// a second ensure that only reads, repair of half a veth pair, and teardown.
import t from "tap";
import { FakeNetlink } from "../../src/node/host/netlink.js";
import { FakeRunner } from "../../src/node/host/runner.js";
import {
  GATEWAY,
  HOST_MAC,
  parseNetnsList,
  vethAddArgv,
  WorkloadNet,
  workloadNetNames,
  workloadSideBatch,
} from "../../src/node/runtime/netns.js";

t.test("names: cw-<workload>, host veth cw + 11 hex (<= 15 characters)", async (t) => {
  const n = workloadNetNames("web");
  t.same(n, { netns: "cw-web", netnsPath: "/run/netns/cw-web", hostIface: n.hostIface });
  t.match(n.hostIface, /^cw[0-9a-f]{11}$/);
  t.equal(workloadNetNames("web").hostIface, n.hostIface, "stable");
  t.not(workloadNetNames("web2").hostIface, n.hostIface);
  t.ok(workloadNetNames("x".repeat(63)).hostIface.length <= 15);
  for (const bad of ["", "Web", "a.b", "-a", "a-", "x".repeat(64)])
    t.throws(() => workloadNetNames(bad), { code: "CAPSULE_INVALID_ARGUMENT" }, bad);
  t.equal(
    vethAddArgv(n).join(" "),
    `ip link add dev ${n.hostIface} address ee:ee:ee:ee:ee:ee type veth peer name eth0 netns cw-web`,
  );
  t.same(parseNetnsList("cw-web (id: 3)\nother\n\n"), ["cw-web", "other"]);
});

const EMPTY_SIDE = {
  addrs: JSON.stringify([
    { ifname: "lo", flags: ["LOOPBACK"], addr_info: [] },
    { ifname: "eth0", flags: ["BROADCAST", "MULTICAST"], addr_info: [] },
  ]),
  routes: "[]",
  neigh: "[]",
};
const DONE_SIDE = {
  addrs: JSON.stringify([
    {
      ifname: "lo",
      flags: ["LOOPBACK", "UP"],
      addr_info: [{ family: "inet", local: "127.0.0.1", prefixlen: 8 }],
    },
    {
      ifname: "eth0",
      flags: ["BROADCAST", "MULTICAST", "UP", "LOWER_UP"],
      addr_info: [
        { family: "inet", local: "100.64.7.2", prefixlen: 32 },
        { family: "inet6", local: "fe80::1", prefixlen: 64 },
      ],
    },
  ]),
  routes: JSON.stringify([
    { dst: "default", gateway: GATEWAY, dev: "eth0", flags: [] },
    { dst: GATEWAY, dev: "eth0", scope: "link", flags: [] },
  ]),
  neigh: JSON.stringify([{ dst: GATEWAY, dev: "eth0", lladdr: HOST_MAC, state: ["PERMANENT"] }]),
};
const FULL_BATCH = [
  "link set dev lo up",
  "link set dev eth0 up",
  "addr add 100.64.7.2/32 dev eth0",
  "route replace 169.254.1.1/32 dev eth0 scope link",
  "route replace default via 169.254.1.1 dev eth0",
  "neigh replace 169.254.1.1 lladdr ee:ee:ee:ee:ee:ee dev eth0 nud permanent",
];

t.test(
  "workloadSideBatch: everything for a fresh namespace, nothing for a done one, fixes for drift",
  async (t) => {
    t.same(workloadSideBatch(EMPTY_SIDE, "100.64.7.2"), FULL_BATCH);
    t.same(workloadSideBatch(DONE_SIDE, "100.64.7.2"), []);
    t.same(workloadSideBatch(DONE_SIDE, "100.64.7.9"), [
      "addr del 100.64.7.2/32 dev eth0",
      "addr add 100.64.7.9/32 dev eth0",
    ]);
    const stale = {
      ...DONE_SIDE,
      neigh: JSON.stringify([
        { dst: GATEWAY, dev: "eth0", lladdr: "aa:bb:cc:dd:ee:ff", state: ["REACHABLE"] },
      ]),
      routes: JSON.stringify([{ dst: "default", gateway: "10.0.0.1", dev: "eth0" }]),
    };
    t.same(workloadSideBatch(stale, "100.64.7.2"), FULL_BATCH.slice(3));
    t.same(
      workloadSideBatch({ addrs: "", routes: "", neigh: "" }, "100.64.7.2"),
      FULL_BATCH,
      "empty output reads as nothing",
    );
  },
);

/** fake: the capsule side in a FakeNetlink, the workload side scripted through the runner. */
function fake() {
  const nl = new FakeNetlink();
  const runner = new FakeRunner();
  const st = { netns: [] as string[], eth0: false, side: EMPTY_SIDE };
  const host = workloadNetNames("web").hostIface;
  runner.on((argv) => {
    const c = argv.join(" ");
    if (c === "ip netns list") return { stdout: st.netns.map((n) => `${n}\n`).join("") };
    if (c === "ip netns add cw-web") st.netns.push("cw-web");
    if (c === "ip netns del cw-web") st.netns = [];
    if (c === "ip -n cw-web -json link show dev eth0")
      return st.eth0 ? { stdout: "[]" } : { exitCode: 1, stderr: 'Device "eth0" does not exist.\n' };
    if (c.startsWith("ip link add dev")) {
      nl.addLink(host);
      st.eth0 = true;
    }
    if (c === `ip link del dev ${host}`) {
      nl.deleteLink(host);
      st.eth0 = false;
    }
    if (c === "ip -n cw-web -json addr show") return { stdout: st.side.addrs };
    if (c === "ip -n cw-web -json -4 route show table main") return { stdout: st.side.routes };
    if (c === "ip -n cw-web -json -4 neigh show dev eth0") return { stdout: st.side.neigh };
    if (c === "ip -n cw-web -batch -") st.side = DONE_SIDE;
    return undefined;
  });
  return { nl, runner, st, host, net: new WorkloadNet({ runner, netlink: nl }) };
}

const READS = [
  "ip netns list",
  "ip -n cw-web -json link show dev eth0",
  "ip -n cw-web -json addr show",
  "ip -n cw-web -json -4 route show table main",
  "ip -n cw-web -json -4 neigh show dev eth0",
];

t.test("ensure: golden lines the first time, reads only the second", async (t) => {
  const f = fake();
  const r = await f.net.ensure({ workload: "web", address: "100.64.7.2", hostSrc: "100.64.1.1" });
  t.same(r, { ...workloadNetNames("web"), changed: true });
  t.same(f.runner.commands, [
    "ip netns list",
    "ip netns add cw-web",
    "ip -n cw-web -json link show dev eth0",
    vethAddArgv(workloadNetNames("web")).join(" "),
    "ip -n cw-web -json addr show",
    "ip -n cw-web -json -4 route show table main",
    "ip -n cw-web -json -4 neigh show dev eth0",
    "ip -n cw-web -batch -",
  ]);
  t.equal(f.runner.inputs.at(-1), `${FULL_BATCH.join("\n")}\n`);
  t.same(f.nl.lines, [
    `sysctl -w net.ipv4.conf.${f.host}.rp_filter=1`,
    `ip link set dev ${f.host} up`,
    `ip route replace 100.64.7.2/32 dev ${f.host} src 100.64.1.1`,
  ]);

  f.runner.commands.length = 0;
  f.nl.lines.length = 0;
  t.equal(
    (await f.net.ensure({ workload: "web", address: "100.64.7.2/32", hostSrc: "100.64.1.1" })).changed,
    false,
  );
  t.same(f.runner.commands, READS, "reads only");
  t.same(f.nl.lines, [], "nothing changed on the capsule side");
});

t.test("ensure rebuilds a pair whose other half is gone", async (t) => {
  const f = fake();
  await f.net.ensure({ workload: "web", address: "100.64.7.2" });
  // The namespace was deleted and made again: the host end remains, its peer does not.
  f.st.eth0 = false;
  f.runner.commands.length = 0;
  t.equal((await f.net.ensure({ workload: "web", address: "100.64.7.2" })).changed, true);
  t.same(f.runner.commands.slice(1, 4), [
    "ip -n cw-web -json link show dev eth0",
    `ip link del dev ${f.host}`,
    vethAddArgv(workloadNetNames("web")).join(" "),
  ]);
});

t.test("ensure refuses a bad address before any effect", async (t) => {
  const f = fake();
  await t.rejects(f.net.ensure({ workload: "web", address: "100.64.7.0/24" }), {
    code: "CAPSULE_INVALID_ARGUMENT",
  });
  await t.rejects(f.net.ensure({ workload: "web", address: "nope" }), { code: "CAPSULE_INVALID_ARGUMENT" });
  await t.rejects(f.net.ensure({ workload: "Web", address: "100.64.7.2" }), {
    code: "CAPSULE_INVALID_ARGUMENT",
  });
  t.same(f.runner.commands, []);
});

t.test("teardown, exists, list", async (t) => {
  const f = fake();
  await f.net.ensure({ workload: "web", address: "100.64.7.2" });
  t.equal(await f.net.exists("web"), true);
  t.same(await f.net.list(), ["web"]);
  f.runner.commands.length = 0;
  t.equal(await f.net.teardown("web"), true);
  t.same(f.runner.commands, [`ip link del dev ${f.host}`, "ip netns list", "ip netns del cw-web"]);
  t.equal(await f.net.teardown("web"), false, "idempotent");
  t.equal(await f.net.exists("web"), false);
  t.same(await f.net.list(), []);
});
