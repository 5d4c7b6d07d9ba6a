// TapNet over a FakeRunner (scripted `ip -json -d link show`) and FakeNetlink: a missing TAP is
// made (tuntap add, MAC, rp_filter, up, route), a correct one is left alone, a container's veth
// under the same name goes with its namespace first, teardown only deletes a TAP; linkKind.
import t from "tap";
import { FakeNetlink } from "../../src/node/host/netlink.js";
import { FakeRunner } from "../../src/node/host/runner.js";
import { HOST_MAC, workloadNetNames } from "../../src/node/runtime/netns.js";
import { linkKind, TapNet, tapAddArgv } from "../../src/node/runtime/tap.js";

const TAP = workloadNetNames("web").hostIface;
const SHOW = `ip -json -d link show dev ${TAP}`;

const linkJson = (kind: string, mac: string) =>
  JSON.stringify([
    {
      ifindex: 7,
      ifname: TAP,
      flags: ["BROADCAST", "MULTICAST"],
      mtu: 1500,
      operstate: "DOWN",
      link_type: "ether",
      address: mac,
      broadcast: "ff:ff:ff:ff:ff:ff",
      linkinfo: { info_kind: kind, info_data: kind === "tun" ? { type: "tap", pi: false } : {} },
    },
  ]);

/**
 * rig: `ip link show` answers from `dev` (undefined = no such device, as ip says it); `ip tuntap
 * add` makes a tun with a random MAC, `ip link set address` sets it, `ip link del` removes it.
 * The netlink fake learns of the TAP when it is made (setLinkUp needs it).
 */
function rig(dev: { kind: string; mac: string } | undefined) {
  const runner = new FakeRunner();
  const netlink = new FakeNetlink();
  const state = { dev };
  if (dev) netlink.addLink(TAP);
  runner.on((argv) => {
    const cmd = argv.join(" ");
    if (cmd === SHOW)
      return state.dev
        ? { stdout: linkJson(state.dev.kind, state.dev.mac) }
        : { exitCode: 1, stderr: `Device "${TAP}" does not exist.\n` };
    if (cmd === tapAddArgv(TAP).join(" ")) {
      state.dev = { kind: "tun", mac: "4a:1b:2c:3d:4e:5f" };
      netlink.addLink(TAP);
      return {};
    }
    if (cmd === `ip link set dev ${TAP} address ${HOST_MAC}` && state.dev) {
      state.dev.mac = HOST_MAC;
      return {};
    }
    if (cmd === `ip link del dev ${TAP}`) {
      state.dev = undefined;
      netlink.deleteLink(TAP);
      return {};
    }
    return undefined;
  });
  const taps = new TapNet({ runner, netlink });
  return { runner, netlink, taps, state };
}

t.test("linkKind", async (t) => {
  t.same(
    linkKind(linkJson("tun", "EE:EE:EE:EE:EE:EE")),
    { kind: "tun", mac: "ee:ee:ee:ee:ee:ee" },
    "MAC lowercased",
  );
  t.same(linkKind(linkJson("veth", "02:00:00:00:00:01")), { kind: "veth", mac: "02:00:00:00:00:01" });
  t.same(
    linkKind('[{"ifname":"lo","address":"00:00:00:00:00:00"}]'),
    { kind: "", mac: "00:00:00:00:00:00" },
    "no linkinfo: plain device",
  );
  t.same(linkKind('[{"ifname":"x"}]'), { kind: "", mac: "" });
  t.equal(linkKind(""), undefined);
  t.equal(linkKind("  \n"), undefined);
  t.equal(linkKind("[]"), undefined);
  t.throws(() => linkKind("{not json"));
});

t.test("tapAddArgv", async (t) => {
  t.same(tapAddArgv("cwabc"), ["ip", "tuntap", "add", "dev", "cwabc", "mode", "tap"]);
});

t.test("ensure: a missing TAP is created, then MAC, rp_filter, up and route", async (t) => {
  const { runner, netlink, taps } = rig(undefined);
  const r = await taps.ensure({ workload: "web", address: "100.64.7.2", hostSrc: "100.64.7.1" });
  t.same(r, { tap: TAP, changed: true });
  t.same(runner.commands, [
    SHOW,
    `ip tuntap add dev ${TAP} mode tap`,
    `ip link set dev ${TAP} address ee:ee:ee:ee:ee:ee`,
  ]);
  t.same(netlink.lines, [
    `sysctl -w net.ipv4.conf.${TAP}.rp_filter=1`,
    `ip link set dev ${TAP} up`,
    `ip route replace 100.64.7.2/32 dev ${TAP} src 100.64.7.1`,
  ]);
  t.same(netlink.routeTable(), [`100.64.7.2/32 dev ${TAP} src 100.64.7.1`]);

  // Again: all there, nothing changes.
  const again = await taps.ensure({ workload: "web", address: "100.64.7.2/32", hostSrc: "100.64.7.1" });
  t.same(again, { tap: TAP, changed: false });
  t.same(runner.commands.slice(3), [SHOW], "only the look");
  t.equal(netlink.lines.length, 3);
});

t.test("ensure: an existing tun with the right MAC is not recreated", async (t) => {
  const { runner, netlink, taps } = rig({ kind: "tun", mac: "EE:EE:EE:EE:EE:EE" });
  netlink.lines.length = 0;
  await netlink.setSysctl(`net.ipv4.conf.${TAP}.rp_filter`, "1");
  await netlink.setLinkUp(TAP);
  await netlink.ensureRoute("100.64.7.2/32", TAP);
  netlink.lines.length = 0;
  t.same(await taps.ensure({ workload: "web", address: "100.64.7.2" }), { tap: TAP, changed: false });
  t.same(runner.commands, [SHOW], "no tuntap add, no address set");
  t.same(netlink.lines, []);
  // A new address moves the route: changed.
  t.same(await taps.ensure({ workload: "web", address: "100.64.7.9" }), { tap: TAP, changed: true });
  t.same(netlink.lines, [`ip route replace 100.64.7.9/32 dev ${TAP}`]);
  t.notMatch(runner.commands.join("\n"), /tuntap/);
});

t.test("ensure: a tun with another MAC gets the host MAC, not recreated", async (t) => {
  const { runner, taps } = rig({ kind: "tun", mac: "4a:00:00:00:00:01" });
  t.same(await taps.ensure({ workload: "web", address: "100.64.7.2" }), { tap: TAP, changed: true });
  t.same(runner.commands.slice(0, 2), [SHOW, `ip link set dev ${TAP} address ${HOST_MAC}`]);
  t.notMatch(runner.commands.join("\n"), /tuntap|link del/);
});

t.test("ensure: a container's veth goes, with its namespace, before the TAP is made", async (t) => {
  const { runner, taps, state } = rig({ kind: "veth", mac: HOST_MAC });
  t.same(await taps.ensure({ workload: "web", address: "100.64.7.2" }), { tap: TAP, changed: true });
  t.same(runner.commands, [
    SHOW,
    `ip link del dev ${TAP}`,
    "ip netns del cw-web",
    `ip tuntap add dev ${TAP} mode tap`,
    `ip link set dev ${TAP} address ${HOST_MAC}`,
  ]);
  t.same(state.dev, { kind: "tun", mac: HOST_MAC });
});

t.test("ensure: a missing namespace does not stop the veth's replacement", async (t) => {
  const { runner, taps } = rig({ kind: "veth", mac: HOST_MAC });
  runner.on((argv) =>
    argv.join(" ") === "ip netns del cw-web"
      ? { exitCode: 1, stderr: 'Cannot remove namespace file "/run/netns/cw-web": No such file or directory' }
      : undefined,
  );
  t.same(await taps.ensure({ workload: "web", address: "100.64.7.2" }), { tap: TAP, changed: true });
  t.match(runner.commands, [SHOW, /link del/, /netns del/, /tuntap add/]);
});

t.test("ensure: bad input and ip failures", async (t) => {
  const { runner, taps } = rig(undefined);
  await t.rejects(taps.ensure({ workload: "web", address: "100.64.7.0/24" }), {
    code: "CAPSULE_INVALID_ARGUMENT",
    message: /not a single address/,
  });
  await t.rejects(taps.ensure({ workload: "Bad_Name", address: "100.64.7.2" }), {
    code: "CAPSULE_INVALID_ARGUMENT",
  });
  t.same(runner.commands, [], "nothing run for bad input");
  runner.on((argv) =>
    argv.join(" ") === SHOW
      ? { exitCode: 255, stderr: "RTNETLINK answers: Operation not permitted" }
      : undefined,
  );
  await t.rejects(taps.ensure({ workload: "web", address: "100.64.7.2" }), {
    message: /Operation not permitted/,
  });
  t.same(runner.commands, [SHOW], "an unknown failure of show is not 'missing'");
});

t.test("teardown: deletes a tun only", async (t) => {
  const tun = rig({ kind: "tun", mac: HOST_MAC });
  t.equal(await tun.taps.teardown("web"), true);
  t.same(tun.runner.commands, [SHOW, `ip link del dev ${TAP}`]);
  t.equal(await tun.taps.teardown("web"), false, "gone: false");
  t.same(tun.runner.commands.slice(2), [SHOW]);

  const veth = rig({ kind: "veth", mac: HOST_MAC });
  t.equal(await veth.taps.teardown("web"), false, "a veth is WorkloadNet's");
  t.same(veth.runner.commands, [SHOW]);

  const none = rig(undefined);
  t.equal(await none.taps.teardown("web"), false);
  t.same(none.runner.commands, [SHOW]);

  // `Cannot find device` is how older ip says it.
  const old = rig(undefined);
  old.runner.on((argv) =>
    argv.join(" ") === SHOW ? { exitCode: 1, stderr: `Cannot find device "${TAP}"` } : undefined,
  );
  t.equal(await old.taps.teardown("web"), false);
});
