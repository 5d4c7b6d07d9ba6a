// WorkloadNet against the real tools, in a simulated capsule (network namespace + private /run):
// workload namespaces on routed veths, reachability capsule <-> workload and workload <-> workload
// through the capsule, anti-spoofing, repair of half-made plumbing, idempotent teardown.
import t from "tap";
import { IpNetlink } from "../../src/node/host/netlink.js";
import { WorkloadNet, workloadNetNames } from "../../src/node/runtime/netns.js";
import { isRoot, type NsNode, RecordingRunner, ROOT_SKIP, withNamespaces } from "../helpers/ns.js";

if (!isRoot()) {
  t.plan(0, ROOT_SKIP);
} else {
  const sb = withNamespaces(t);
  let node: NsNode | undefined;
  // Teardowns run last-in first-out: this one runs before the sandbox's. Workload namespaces
  // live in the capsule's private /run; nothing runs in them but our short commands.
  t.teardown(async () => {
    if (!node) return;
    for (const w of ["a", "b"])
      await node.runner.run(["ip", "netns", "del", `cw-${w}`], { allowFailure: true });
  });
  // A throw outside a subtest must not end the process before the teardowns run.
  try {
    node = await sb.node("cap");
    await node.runner.run(["ip", "addr", "add", "100.64.1.1/32", "dev", "lo"]);
    await node.runner.run(["sysctl", "-w", "net.ipv4.ip_forward=1"]);
    await scenario(node);
  } catch (e) {
    t.fail(`scenario aborted: ${e instanceof Error ? e.stack : String(e)}`);
  }
}

async function scenario(n: NsNode) {
  const net = new WorkloadNet({ runner: n.runner, netlink: new IpNetlink(n.runner) });
  const inNs = (workload: string, argv: string[]) =>
    n.runner.run(["ip", "netns", "exec", `cw-${workload}`, ...argv], {
      allowFailure: true,
      timeoutMs: 10_000,
    });
  const ping = async (from: string | undefined, to: string, extra: string[] = []) => {
    const argv = ["busybox", "ping", "-c", "1", "-W", "1", ...extra, to];
    const r = from ? await inNs(from, argv) : await n.runner.run(argv, { allowFailure: true });
    return r.exitCode === 0;
  };

  await t.test("ensure builds the plumbing; a second ensure only reads", async (t) => {
    const a = await net.ensure({ workload: "a", address: "100.64.7.2", hostSrc: "100.64.1.1" });
    t.match(a, { netns: "cw-a", netnsPath: "/run/netns/cw-a", changed: true });
    const rec = new RecordingRunner(n.runner);
    const again = new WorkloadNet({ runner: rec, netlink: new IpNetlink(rec) });
    t.equal(
      (await again.ensure({ workload: "a", address: "100.64.7.2", hostSrc: "100.64.1.1" })).changed,
      false,
    );
    const writes = rec.commands.filter((c) => !/^ip (-n \S+ )?-json |^ip netns list$|^sysctl -n /.test(c));
    t.same(writes, [], "no writes");
    const h = workloadNetNames("a").hostIface;
    const route = await n.runner.run(["ip", "-4", "route", "show", "100.64.7.2"]);
    t.equal(route.stdout.trim(), `100.64.7.2 dev ${h} scope link src 100.64.1.1`);
    const inside = await inNs("a", ["ip", "-4", "route"]);
    t.equal(inside.stdout, "default via 169.254.1.1 dev eth0 \n169.254.1.1 dev eth0 scope link \n");
  });

  await t.test("capsule and workload reach each other; two workloads through the capsule", async (t) => {
    await net.ensure({ workload: "b", address: "100.64.7.3" });
    t.ok(await ping(undefined, "100.64.7.2"), "capsule -> a");
    t.ok(await ping("a", "100.64.1.1"), "a -> capsule");
    t.ok(await ping("a", "100.64.7.3"), "a -> b (routed by the capsule)");
    t.ok(await ping("b", "100.64.7.2"), "b -> a");
  });

  await t.test("a workload cannot spoof another source address", async (t) => {
    // The kernel counts reverse-path drops per namespace (TcpExt IPReversePathFilter).
    const rpDrops = async () => {
      const lines = (await n.runner.run(["cat", "/proc/net/netstat"])).stdout.split("\n");
      const i = lines.findIndex((l) => l.startsWith("TcpExt:"));
      const keys = lines[i]!.split(/\s+/);
      const vals = lines[i + 1]!.split(/\s+/);
      return Number(vals[keys.indexOf("IPReversePathFilter")]);
    };
    // a claims b's address: the capsule's route to it points at b's veth, not a's.
    await inNs("a", ["ip", "addr", "add", "100.64.7.3/32", "dev", "eth0"]);
    const before = await rpDrops();
    t.notOk(await ping("a", "100.64.1.1", ["-I", "100.64.7.3"]), "no answer");
    t.ok((await rpDrops()) > before, "dropped by the capsule's reverse-path filter");
    t.equal(
      (await net.ensure({ workload: "a", address: "100.64.7.2" })).changed,
      true,
      "the stray address is removed",
    );
    const addrs = await inNs("a", ["ip", "-4", "-o", "addr", "show", "dev", "eth0"]);
    t.notMatch(addrs.stdout, /100\.64\.7\.3/);
  });

  await t.test("half-made plumbing is repaired", async (t) => {
    const h = workloadNetNames("b").hostIface;
    await n.runner.run(["ip", "route", "del", "100.64.7.3/32"]);
    t.equal((await net.ensure({ workload: "b", address: "100.64.7.3" })).changed, true, "route restored");
    t.ok(await ping("a", "100.64.7.3"));
    // The namespace deleted under the pair (as `ip netns del` with a process still in it leaves it).
    await n.runner.run(["ip", "netns", "del", "cw-b"]);
    t.equal(await net.exists("b"), false);
    t.equal((await net.ensure({ workload: "b", address: "100.64.7.3" })).changed, true, "rebuilt");
    t.ok(await ping(undefined, "100.64.7.3"), "capsule -> b again");
    t.equal((await n.runner.run(["ip", "-o", "link", "show", "dev", h])).exitCode, 0);
  });

  await t.test("teardown removes link, route and namespace; idempotent", async (t) => {
    for (const w of ["a", "b"]) {
      t.equal(await net.teardown(w), true);
      t.equal(await net.teardown(w), false);
      t.equal(await net.exists(w), false);
      const link = await n.runner.run(["ip", "link", "show", "dev", workloadNetNames(w).hostIface], {
        allowFailure: true,
      });
      t.not(link.exitCode, 0, "host veth gone");
    }
    t.equal((await n.runner.run(["ip", "-4", "route", "show", "100.64.7.2"])).stdout, "", "route gone");
    t.same(await net.list(), []);
  });
}
