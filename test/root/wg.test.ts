// WgClient against the real tools: two simulated capsules (network namespace + private /run each),
// a veth "internet" between them, wireguard-go devices, fabric addresses, pings through the tunnel,
// and the restart-safety story: re-apply and a new capsuled adopt without a restart or a new handshake.
import { writeFileSync } from "node:fs";
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import t from "tap";
import { generateWgKey, type WgKeyPair } from "../../src/fabric/keys.js";
import type { WgPeer } from "../../src/fabric/peers.js";
import { WgClient } from "../../src/fabric/wg.js";
import type { WgInterfaceConfig } from "../../src/fabric/wgconf.js";
import { IpNetlink } from "../../src/node/host/netlink.js";
import { ExecaRunner } from "../../src/node/host/runner.js";
import { REPO } from "../helpers/capsuled.js";
import {
  isRoot,
  type NsNode,
  RecordingRunner,
  ROOT_SKIP,
  refClock,
  type Sandbox,
  sleep,
  waitFor,
  withNamespaces,
} from "../helpers/ns.js";

const IFACE = "capsule0";
const host = new ExecaRunner();
const PORT = 51820;

interface Side {
  node: NsNode;
  key: WgKeyPair;
  keyFile: string;
  logFile: string;
  fabric: string;
  rec: RecordingRunner;
  wg: WgClient;
  nl: IpNetlink;
}

if (!isRoot()) {
  t.plan(0, ROOT_SKIP);
} else {
  const sb: Sandbox = withNamespaces(t);
  const side = async (name: string, fabric: string): Promise<Side> => {
    const node = await sb.node(name);
    const key = generateWgKey();
    const keyFile = join(node.stateDir, "wg.key");
    writeFileSync(keyFile, `${key.privateKey}\n`, { mode: 0o600 });
    const rec = new RecordingRunner(node.runner);
    return {
      node,
      key,
      keyFile,
      logFile: join(node.stateDir, "wireguard-go.log"),
      fabric,
      rec,
      wg: client(node, rec),
      nl: new IpNetlink(node.runner),
    };
  };
  const client = (node: NsNode, runner = node.runner) =>
    new WgClient({ iface: IFACE, stateDir: node.stateDir, runner, spawner: node.spawner, clock: refClock });
  const ensure = (s: Side) =>
    s.wg.ensureInterface({ listenPort: PORT, privateKeyFile: s.keyFile, logFile: s.logFile });
  const peerOf = (s: Side, underlay: string): WgPeer => ({
    publicKey: s.key.publicKey,
    endpoint: `${underlay}:${PORT}`,
    allowedIps: [`${s.fabric}/32`],
    persistentKeepalive: undefined,
  });
  const config = (s: Side, peers: WgPeer[]): WgInterfaceConfig => ({
    privateKey: s.key.privateKey,
    listenPort: PORT,
    peers,
  });
  // The wireguard-go processes in a node's network namespace (nsenter exec'd into them, so they are ours).
  const wgPids = async (s: Side) => {
    const out: number[] = [];
    for (const pid of await sb.pids(s.node.name)) {
      const comm = await readFile(`/proc/${pid}/comm`, "utf8").catch(() => "");
      if (comm.trim() === "wireguard-go") out.push(pid);
    }
    return out;
  };
  // iputils ping is not installed everywhere (it is not here); busybox's does the same job.
  const pingArgv =
    (await host.run(["sh", "-c", "command -v ping"], { allowFailure: true })).exitCode === 0
      ? ["ping", "-n"]
      : ["busybox", "ping"];
  const ping = async (from: Side, to: string) => {
    const r = await from.node.runner.run([...pingArgv, "-c", "1", "-W", "1", to], { allowFailure: true });
    return r.exitCode === 0;
  };
  const handshake = async (s: Side, peer: Side) =>
    (await s.wg.dump()).peers.find((p) => p.publicKey === peer.key.publicKey)?.latestHandshake ?? -1;
  const applyFabric = async (s: Side, other: Side) => [
    await s.nl.ensureAddress(IFACE, `${s.fabric}/32`),
    await s.nl.ensureRoute(`${other.fabric}/32`, IFACE, { src: s.fabric }),
  ];

  const a = await side("a", "100.64.1.1");
  const b = await side("b", "100.64.2.1");
  await sb.link("a", "veth0", "192.0.2.1/24", "b", "veth0", "192.0.2.2/24");
  const cfgA = () => config(a, [peerOf(b, "192.0.2.2")]);
  const cfgB = () => config(b, [peerOf(a, "192.0.2.1")]);
  let pidA = 0;
  let pidB = 0;
  let hs = 0;

  t.test("ensureInterface starts wireguard-go in each namespace, one socket per private /run", async (t) => {
    const t0 = Date.now();
    t.same(await ensure(a), { mode: "userspace", adopted: false });
    t.same(await ensure(b), { mode: "userspace", adopted: false });
    t.comment(`two devices up in ${Date.now() - t0} ms`);
    // wireguard-go may need a few polls before it answers: count consecutive repeats once.
    const cmds = a.rec.commands.filter((c, i, all) => c !== all[i - 1]);
    t.same(
      cmds,
      [
        `ip -d -json link show dev ${IFACE}`,
        `ip link add dev ${IFACE} type wireguard`,
        `rm -f /var/run/wireguard/${IFACE}.sock`,
        `wg show ${IFACE} dump`,
        `wg set ${IFACE} listen-port ${PORT} private-key ${a.keyFile}`,
        `ip link set dev ${IFACE} up`,
      ],
      "kernel probed first, then wireguard-go",
    );
    const pa = await wgPids(a);
    const pb = await wgPids(b);
    t.equal(pa.length, 1, "one wireguard-go in a");
    t.equal(pb.length, 1, "one wireguard-go in b");
    pidA = pa[0]!;
    pidB = pb[0]!;
    for (const s of [a, b]) {
      const sock = await s.node.runner.run(["test", "-S", `/run/wireguard/${IFACE}.sock`], {
        allowFailure: true,
      });
      t.equal(sock.exitCode, 0, `${s.node.name}'s socket is in its own /run (${s.node.runDir})`);
      t.equal(await s.wg.publicKey(), s.key.publicKey, `${s.node.name} has its key`);
      t.equal((await s.wg.dump()).listenPort, PORT);
    }
  });

  t.test("sync and fabric addresses carry a ping through the tunnel", async (t) => {
    t.same(await a.wg.sync(cfgA()), { changed: true, added: [b.key.publicKey], removed: [], updated: [] });
    t.same(await b.wg.sync(cfgB()), { changed: true, added: [a.key.publicKey], removed: [], updated: [] });
    t.same(await applyFabric(a, b), [true, true]);
    t.same(await applyFabric(b, a), [true, true]);
    t.same(await a.nl.listAddresses(IFACE), ["100.64.1.1/32"]);
    const t0 = Date.now();
    t.ok(await waitFor(() => ping(a, b.fabric), 10_000), "a -> b over the fabric");
    t.comment(`first ping (with handshake) after ${Date.now() - t0} ms`);
    t.ok(await ping(b, a.fabric), "b -> a over the fabric");
    hs = await handshake(a, b);
    t.ok(hs > 0, "a handshake happened");
  });

  t.test("re-applying the same configuration changes nothing: same process, same session", async (t) => {
    await sleep(1_100); // handshake times have one-second resolution
    a.rec.commands.length = 0;
    t.same(await ensure(a), { mode: "userspace", adopted: true });
    t.same(await a.wg.sync(cfgA()), { changed: false, added: [], removed: [], updated: [] });
    t.same(await ensure(b), { mode: "userspace", adopted: true });
    t.same(await b.wg.sync(cfgB()), { changed: false, added: [], removed: [], updated: [] });
    t.same(
      a.rec.commands,
      [`ip -d -json link show dev ${IFACE}`, `wg show ${IFACE} dump`, `wg show ${IFACE} dump`],
      "only reads",
    );
    t.same(await applyFabric(a, b), [false, false], "addresses and routes unchanged");
    t.same(await wgPids(a), [pidA], "same wireguard-go in a");
    t.same(await wgPids(b), [pidB], "same wireguard-go in b");
    t.ok(await ping(a, b.fabric), "traffic flows");
    t.equal(await handshake(a, b), hs, "no new handshake");
  });

  t.test("a new capsuled (new client objects) adopts the running devices", async (t) => {
    a.wg = client(a.node);
    b.wg = client(b.node);
    t.same(await ensure(a), { mode: "userspace", adopted: true });
    t.same(await ensure(b), { mode: "userspace", adopted: true });
    t.equal((await a.wg.sync(cfgA())).changed, false);
    t.equal((await b.wg.sync(cfgB())).changed, false);
    t.same(await wgPids(a), [pidA], "same pid");
    t.same(await wgPids(b), [pidB], "same pid");
    t.ok(await ping(a, b.fabric), "traffic still flows");
    t.equal(await handshake(a, b), hs, "same session");
  });

  t.test("sync removes a peer that left the configuration and keeps the others' sessions", async (t) => {
    const c = generateWgKey();
    const extra: WgPeer = {
      publicKey: c.publicKey,
      endpoint: undefined,
      allowedIps: ["100.64.3.1/32"],
      persistentKeepalive: 25,
    };
    const withC = config(a, [peerOf(b, "192.0.2.2"), extra]);
    t.same(await a.wg.sync(withC), { changed: true, added: [c.publicKey], removed: [], updated: [] });
    const peers = async () =>
      (await a.node.runner.run(["wg", "show", IFACE, "peers"])).stdout.trim().split("\n").sort();
    t.same(await peers(), [b.key.publicKey, c.publicKey].sort());
    t.same(await a.wg.sync(cfgA()), { changed: true, added: [], removed: [c.publicKey], updated: [] });
    t.same(await peers(), [b.key.publicKey], "the removed peer is gone from wg show");
    t.ok(await ping(a, b.fabric), "b still reachable");
    t.equal(await handshake(a, b), hs, "b's session survived the sync");
  });

  t.test("a stale socket left by a killed wireguard-go is cleaned and the device restarted", async (t) => {
    process.kill(pidB, "SIGKILL");
    t.ok(await waitFor(async () => (await wgPids(b)).length === 0, 5_000), "wireguard-go gone");
    const sock = await b.node.runner.run(["test", "-S", `/run/wireguard/${IFACE}.sock`], {
      allowFailure: true,
    });
    t.equal(sock.exitCode, 0, "SIGKILL leaves the socket file behind");
    b.wg = client(b.node);
    t.same(await ensure(b), { mode: "userspace", adopted: false });
    const pids = await wgPids(b);
    t.equal(pids.length, 1);
    t.not(pids[0], pidB, "a new process");
    pidB = pids[0]!;
    t.same(await applyFabric(b, a), [true, true], "the new tun needs its address and route again");
    t.equal((await b.wg.sync(cfgB())).changed, true);
    t.ok(await waitFor(() => ping(b, a.fabric), 10_000), "traffic flows again");
  });

  // The child runs the TypeScript source with the loader tap gave this process.
  const loader = process.execArgv.find((x) => x.includes("@tapjs/typescript"));
  const rtOpts = { skip: loader ? false : "needs tap's TypeScript loader to run the source in a child" };
  t.test("RtNetlink (capsuled's in-process netlink) acts on the namespace it runs in", rtOpts, async (t) => {
    const forwardBefore = (await readFile("/proc/sys/net/ipv4/ip_forward", "utf8")).trim();
    const code = `
      import { RtNetlink } from ${JSON.stringify(join(REPO, "src/node/host/netlink.ts"))};
      const nl = new RtNetlink();
      const out = {
        add: [await nl.ensureAddress("${IFACE}", "100.64.1.9/32"), await nl.ensureAddress("${IFACE}", "100.64.1.9/32")],
        route: [await nl.ensureRoute("100.64.9.0/24", "${IFACE}", { src: "100.64.1.1" }), await nl.ensureRoute("100.64.9.0/24", "${IFACE}", { src: "100.64.1.1" })],
        sysctl: [await nl.setSysctl("net.ipv4.ip_forward", "1"), await nl.setSysctl("net.ipv4.ip_forward", "1")],
        up: await nl.setLinkUp("${IFACE}"),
        exists: [await nl.linkExists("${IFACE}"), await nl.linkExists("nope0")],
        addrs: await nl.listAddresses("${IFACE}"),
      };
      out.routeDel = [await nl.removeRoute("100.64.9.0/24", "${IFACE}"), await nl.removeRoute("100.64.9.0/24", "${IFACE}")];
      out.addrDel = [await nl.removeAddress("${IFACE}", "100.64.1.9/32"), await nl.removeAddress("${IFACE}", "100.64.1.9/32")];
      await nl.close();
      console.log(JSON.stringify(out));
    `;
    const r = await a.node.runner.run(["node", loader!, "--input-type=module", "-e", code], {
      env: { NODE_OPTIONS: "" },
      timeoutMs: 60_000,
    });
    const out = JSON.parse(r.stdout.trim().split("\n").pop() ?? "{}");
    t.same(out, {
      add: [true, false],
      route: [true, false],
      sysctl: [true, false],
      up: false,
      exists: [true, false],
      addrs: ["100.64.1.1/32", "100.64.1.9/32"],
      routeDel: [true, false],
      addrDel: [true, false],
    });
    t.equal(
      (await a.node.runner.run(["sysctl", "-n", "net.ipv4.ip_forward"])).stdout.trim(),
      "1",
      "set in a",
    );
    t.equal(
      (await readFile("/proc/sys/net/ipv4/ip_forward", "utf8")).trim(),
      forwardBefore,
      "the root namespace is untouched",
    );
    t.same(await a.nl.listAddresses(IFACE), ["100.64.1.1/32"], "ip sees the same end state");
  });

  t.test("remove deletes the devices and stops wireguard-go", async (t) => {
    for (const s of [a, b]) {
      t.equal(await s.wg.remove(), true);
      t.ok(
        await waitFor(async () => (await wgPids(s)).length === 0, 5_000),
        `${s.node.name}: wireguard-go exited`,
      );
      const sock = await s.node.runner.run(["test", "-e", `/run/wireguard/${IFACE}.sock`], {
        allowFailure: true,
      });
      t.not(sock.exitCode, 0, "socket removed");
      t.equal(await s.nl.linkExists(IFACE), false);
      t.equal(await s.wg.remove(), false, "idempotent");
    }
  });
}
