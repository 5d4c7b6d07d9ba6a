// The lab planner and appliers without root: pure plans, golden command lists on a FakeRunner.
import t from "tap";
import { FakeClock } from "../../src/node/host/clock.js";
import { FakeRunner } from "../../src/node/host/runner.js";
import { mountNsCommands, parseMounts, startCommand, waitListening } from "../../lab/capsules.js";
import { capsulectlArgv, formatStatus, labExecArgv } from "../../lab/lab.js";
import {
  applyNetwork,
  type NsState,
  type ObservedNetwork,
  parseLinks,
  parseNftHash,
  parseRoutes,
  reconcileNetwork,
} from "../../lab/network.js";
import { type LabPlan, parsePortForward, planLab } from "../../lab/plan.js";
import { CGROUP_PROCS, CGROUP_RMDIR, escapeRegex, parsePids, teardownLab } from "../../lab/teardown.js";
import { containerdPaths } from "../../src/node/runtime/containerd.js";
import { defaultCgroupParent } from "../../src/node/runtime/containers.js";

const BASE = { repoDir: "/repo", nodeBin: "/usr/bin/node" };

function small(): LabPlan {
  return planLab({
    ...BASE,
    prefix: "t",
    homes: 1,
    portForwards: [{ home: "homeA", proto: "tcp", port: 8080, toPort: 80 }],
  });
}

/** applied is the state a namespace would be in once the plan is applied. */
function applied(plan: LabPlan): ObservedNetwork {
  const out: ObservedNetwork = {};
  for (const n of plan.nodes) {
    const s: NsState = {
      links: { lo: { up: true, master: undefined, addresses: ["127.0.0.1/8"] } },
      routes: {},
      sysctls: { ...n.sysctls },
      nftHash: n.ruleset?.hash,
    };
    for (const br of n.bridges) s.links[br] = { up: true, master: undefined, addresses: [] };
    for (const v of plan.veths) {
      if (v.a.ns === n.ns) s.links[v.a.ifname] = { up: true, master: v.master, addresses: [] };
      if (v.b.ns === n.ns) s.links[v.b.ifname] = { up: true, master: undefined, addresses: [] };
    }
    for (const a of n.addresses) s.links[a.ifname]?.addresses.push(a.cidr);
    for (const r of n.routes) s.routes[r.dst] = r.via;
    out[n.ns] = s;
  }
  return out;
}

/** kernel answers the network observation commands from an ObservedNetwork. */
function kernel(runner: FakeRunner, observed: ObservedNetwork): FakeRunner {
  return runner.on((argv) => {
    const cmd = argv.join(" ");
    if (cmd === "ip -j netns list")
      return { stdout: JSON.stringify(Object.keys(observed).map((name) => ({ name }))) };
    const ns = argv[2] ?? "";
    const s = observed[argv[1] === "-n" ? ns : (argv[3] ?? "")];
    if (!s) return undefined;
    if (argv[1] === "-n" && argv[4] === "addr") {
      const rows = Object.entries(s.links).map(([ifname, l]) => ({
        ifname,
        flags: l.up ? ["UP"] : [],
        ...(l.master ? { master: l.master } : {}),
        addr_info: l.addresses.map((c) => ({
          family: "inet",
          local: c.split("/")[0],
          prefixlen: Number(c.split("/")[1]),
        })),
      }));
      return { stdout: JSON.stringify(rows) };
    }
    if (argv[1] === "-n" && argv[4] === "route") {
      return { stdout: JSON.stringify(Object.entries(s.routes).map(([dst, gateway]) => ({ dst, gateway }))) };
    }
    if (argv[4] === "sysctl")
      return {
        stdout: `${argv
          .slice(6)
          .map((k) => s.sysctls[k] ?? "?")
          .join("\n")}\n`,
      };
    if (argv[4] === "nft" && argv[5] === "list") {
      return s.nftHash
        ? { stdout: `table ip capsule_lab {\n\tcomment "lab:${s.nftHash}"\n}\n` }
        : { exitCode: 1 };
    }
    return undefined;
  });
}

t.test("planLab: default lab is an edge, two homes behind NAT, a client and the operator", async (t) => {
  const plan = planLab(BASE);
  t.same(
    plan.nodes.map((n) => n.ns),
    [
      "cl-inet",
      "cl-op",
      "cl-client",
      "cl-ca",
      "cl-edge",
      "cl-homeA-rtr",
      "cl-homeA",
      "cl-homeB-rtr",
      "cl-homeB",
    ],
  );
  t.equal(plan.labDir, "/tmp/capsule-lab-cl");
  t.same(
    plan.capsules.map((c) => [c.name, c.role, c.api, c.lanAddress, c.wanAddress]),
    [
      ["edge", "edge", "203.0.113.2:50000", undefined, "192.0.2.10"],
      ["homeA", "home", "203.0.113.6:50000", "198.51.100.10", undefined],
      ["homeB", "home", "203.0.113.34:50000", "198.51.100.42", undefined],
    ],
  );
  t.same(
    plan.homes.map((h) => [h.name, h.lanCidr, h.routerLan, h.routerWan]),
    [
      ["homeA", "198.51.100.0/27", "198.51.100.1", "192.0.2.101"],
      ["homeB", "198.51.100.32/27", "198.51.100.33", "192.0.2.102"],
    ],
  );
  const edge = plan.capsules[0]!;
  t.same(edge.argv, [
    "/usr/bin/node",
    "--optimize-for-size",
    "--max-semi-space-size=1",
    "/repo/dist/src/node/main.js",
    "--name",
    "edge",
    "--state-dir",
    "/tmp/capsule-lab-cl/edge/state",
    "--listen",
    "203.0.113.2:50000",
    "--fabric-iface",
    "capsule0",
    "--fabric-port",
    "51820",
    "--endpoint",
    "192.0.2.10:51820",
    "--edge",
    "--acme-ca",
    "https://acme.capsule.test/acme/local/directory",
    "--acme-ca-root",
    "/tmp/capsule-lab-cl/ca/root.crt",
    "--public-address",
    "192.0.2.10",
  ]);
  t.notOk(plan.capsules[1]!.argv.includes("--endpoint"), "home capsules are behind NAT: no endpoint");
  t.same(plan.nodes.find((n) => n.ns === "cl-homeA")!.routes, [{ dst: "default", via: "198.51.100.1" }]);
  t.same(plan.nodes.find((n) => n.ns === "cl-edge")!.routes, [], "the edge needs no route beyond its /24");
  t.same(plan.nodes.find((n) => n.ns === "cl-op")!.routes, [], "the operator routes nothing");
  for (const v of plan.veths) {
    t.ok(v.a.ifname.length <= 15 && v.b.ifname.length <= 15, `${v.a.ifname}/${v.b.ifname} fit IFNAMSIZ`);
    t.ok(v.a.ns.startsWith("cl-") && v.b.ns.startsWith("cl-"), "veths live only in lab namespaces");
  }
  const cidrs = plan.nodes.flatMap((n) => n.addresses.map((a) => a.cidr));
  for (const c of cidrs)
    t.match(c, /^(192\.0\.2|198\.51\.100|203\.0\.113)\./, `${c} is a documentation address`);
  t.equal(new Set(cidrs.map((c) => c.split("/")[0])).size, cidrs.length, "no address is used twice");
});

t.test(
  "planLab: eight homes with several capsules still fit; addresses are stable across re-plans",
  async (t) => {
    const plan = planLab({ ...BASE, homes: 8, capsulesPerHome: 3, edge: false });
    t.equal(plan.capsules.length, 24);
    t.same(
      plan.capsules.filter((c) => c.home === "homeH").map((c) => [c.name, c.lanAddress]),
      [
        ["homeH", "198.51.100.234"],
        ["homeH2", "198.51.100.235"],
        ["homeH3", "198.51.100.236"],
      ],
    );
    t.equal(plan.capsules.at(-1)!.mgmtAddress, "203.0.113.210", "slot 1 + 7*7 + 2");
    t.equal(plan.homes.at(-1)!.lanCidr, "198.51.100.224/27");
    const max = planLab({ ...BASE, homes: 8, capsulesPerHome: 7 });
    t.equal(max.capsules.length, 57);
    t.equal(new Set(max.capsules.map((c) => c.mgmtAddress)).size, 57, "every capsule has its own /30");
    const byName = (p: LabPlan) =>
      Object.fromEntries(p.capsules.map((c) => [c.name, [c.mgmtAddress, c.lanAddress]]));
    const big = byName(max);
    for (const [name, addrs] of Object.entries(byName(planLab(BASE)))) {
      t.same(big[name], addrs, `${name} keeps its addresses in a bigger lab`);
    }
    t.equal(plan.daemon, "capsuled");
    const sp = planLab({ ...BASE, homes: 1, daemon: "stand-in" });
    t.equal(sp.capsules[0]!.argv[1], "-e", "the stand-in is a node one-liner");
    t.ok(
      sp.capsules[0]!.argv.includes("--state-dir"),
      "the stand-in carries its state dir so down can find it",
    );
  },
);

t.test("planLab: validates before anything happens", async (t) => {
  t.throws(() => planLab({ ...BASE, prefix: "c-l" }), {
    code: "CAPSULE_INVALID_ARGUMENT",
    message: /prefix/,
  });
  t.throws(() => planLab({ ...BASE, prefix: "toolongprefix" }), { code: "CAPSULE_INVALID_ARGUMENT" });
  t.throws(() => planLab({ ...BASE, homes: 9 }), { message: /homes: 9 is out of range/ });
  t.throws(() => planLab({ ...BASE, capsulesPerHome: 8 }), { message: /capsulesPerHome: 8 is out of range/ });
  t.throws(() => planLab({ ...BASE, homes: 0, edge: false }), { message: /at least one capsule/ });
  t.throws(() => planLab({ ...BASE, labDir: "relative" }), { message: /labDir/ });
  t.throws(() => planLab({ ...BASE, portForwards: [{ home: "homeC", proto: "tcp", port: 1 }] }), {
    message: /homeC/,
  });
  t.throws(
    () => planLab({ ...BASE, portForwards: [{ home: "homeA", proto: "tcp", port: 1, to: "homeB" }] }),
    {
      message: /not a capsule in homeA/,
    },
  );
});

t.test("routerRuleset: masquerade out, drop unsolicited in, DNAT only when asked", async (t) => {
  const plan = small();
  const rtr = plan.nodes.find((n) => n.short === "homeA-rtr")!;
  t.equal(
    rtr.ruleset!.text,
    `table ip capsule_lab {
\tcomment "lab:${rtr.ruleset!.hash}"
\tchain prerouting {
\t\ttype nat hook prerouting priority dstnat; policy accept;
\t\tiifname "wan0" tcp dport 8080 dnat to 198.51.100.10:80
\t}

\tchain postrouting {
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\toifname "wan0" ip saddr 198.51.100.0/27 masquerade
\t}

\tchain forward {
\t\ttype filter hook forward priority filter; policy drop;
\t\tct state established,related accept
\t\tct state invalid drop
\t\tiifname "lan0" oifname "wan0" accept
\t\tiifname "wan0" oifname "lan0" ct status dnat accept
\t}

\tchain input {
\t\ttype filter hook input priority filter; policy accept;
\t\tiifname "wan0" ct state established,related accept
\t\tiifname "wan0" icmp type echo-request accept
\t\tiifname "wan0" drop
\t}
}
`,
  );
  const plain = planLab({ ...BASE, prefix: "t", homes: 1 }).nodes.find((n) => n.short === "homeA-rtr")!;
  t.notMatch(plain.ruleset!.text, /dnat to/, "no port forwarding by default");
  t.not(plain.ruleset!.hash, rtr.ruleset!.hash, "the hash follows the rules");
  const op = plan.nodes.find((n) => n.short === "op")!;
  t.equal(
    op.ruleset!.text,
    `table ip capsule_lab {\n\tcomment "lab:${op.ruleset!.hash}"\n\tchain forward {\n\t\ttype filter hook forward priority filter; policy drop;\n\t}\n}\n`,
  );
  t.equal(op.sysctls["net.ipv4.ip_forward"], "0");
});

t.test("reconcileNetwork: golden commands for a fresh lab", async (t) => {
  const plan = small();
  const cmds = reconcileNetwork(plan, {});
  t.same(
    cmds.map((c) => c.argv.join(" ")),
    [
      "ip netns add t-inet",
      "ip netns add t-op",
      "ip netns add t-client",
      "ip netns add t-ca",
      "ip netns add t-edge",
      "ip netns add t-homeA-rtr",
      "ip netns add t-homeA",
      "ip -n t-inet link set lo up",
      "ip netns exec t-inet sysctl -q -w net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1 net.ipv4.ip_forward=0",
      "ip -n t-op link set lo up",
      "ip netns exec t-op sysctl -q -w net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1 net.ipv4.ip_forward=0",
      "ip -n t-client link set lo up",
      "ip netns exec t-client sysctl -q -w net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1",
      "ip -n t-ca link set lo up",
      "ip netns exec t-ca sysctl -q -w net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1",
      "ip -n t-edge link set lo up",
      "ip netns exec t-edge sysctl -q -w net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1",
      "ip -n t-homeA-rtr link set lo up",
      "ip netns exec t-homeA-rtr sysctl -q -w net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1 net.ipv4.ip_forward=1",
      "ip -n t-homeA link set lo up",
      "ip netns exec t-homeA sysctl -q -w net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1",
      "ip -n t-inet link add br0 type bridge",
      "ip -n t-homeA-rtr link add lan0 type bridge",
      "ip -n t-inet link add ca type veth peer name wan0 netns t-ca",
      "ip -n t-inet link add edge type veth peer name wan0 netns t-edge",
      "ip -n t-op link add edge type veth peer name mgmt0 netns t-edge",
      "ip -n t-inet link add homeA-rtr type veth peer name wan0 netns t-homeA-rtr",
      "ip -n t-homeA-rtr link add homeA type veth peer name lan0 netns t-homeA",
      "ip -n t-op link add homeA type veth peer name mgmt0 netns t-homeA",
      "ip -n t-inet link add client type veth peer name wan0 netns t-client",
      "ip -n t-inet link set ca master br0",
      "ip -n t-inet link set edge master br0",
      "ip -n t-inet link set homeA-rtr master br0",
      "ip -n t-homeA-rtr link set homeA master lan0",
      "ip -n t-inet link set client master br0",
      "ip -n t-op addr add 203.0.113.1/30 dev edge",
      "ip -n t-op addr add 203.0.113.5/30 dev homeA",
      "ip -n t-client addr add 192.0.2.200/24 dev wan0",
      "ip -n t-ca addr add 192.0.2.53/24 dev wan0",
      "ip -n t-edge addr add 192.0.2.10/24 dev wan0",
      "ip -n t-edge addr add 203.0.113.2/30 dev mgmt0",
      "ip -n t-homeA-rtr addr add 198.51.100.1/27 dev lan0",
      "ip -n t-homeA-rtr addr add 192.0.2.101/24 dev wan0",
      "ip -n t-homeA addr add 198.51.100.10/27 dev lan0",
      "ip -n t-homeA addr add 203.0.113.6/30 dev mgmt0",
      "ip -n t-inet link set br0 up",
      "ip -n t-inet link set ca up",
      "ip -n t-inet link set edge up",
      "ip -n t-inet link set homeA-rtr up",
      "ip -n t-inet link set client up",
      "ip -n t-op link set edge up",
      "ip -n t-op link set homeA up",
      "ip -n t-client link set wan0 up",
      "ip -n t-ca link set wan0 up",
      "ip -n t-edge link set wan0 up",
      "ip -n t-edge link set mgmt0 up",
      "ip -n t-homeA-rtr link set lan0 up",
      "ip -n t-homeA-rtr link set wan0 up",
      "ip -n t-homeA-rtr link set homeA up",
      "ip -n t-homeA link set lan0 up",
      "ip -n t-homeA link set mgmt0 up",
      "ip -n t-homeA route replace default via 198.51.100.1",
      "ip netns exec t-op nft --check -f -",
      "ip netns exec t-op nft -f -",
      "ip netns exec t-homeA-rtr nft --check -f -",
      "ip netns exec t-homeA-rtr nft -f -",
    ],
  );
  const nft = cmds.at(-1)!;
  t.match(
    nft.input,
    /^table ip capsule_lab\ndelete table ip capsule_lab\ntable ip capsule_lab \{\n/,
    "whole-table replace",
  );
  t.equal(cmds.at(-2)!.input, nft.input, "the applied script is the checked one");
});

t.test("reconcileNetwork: an applied lab needs nothing; drift is repaired and nothing else", async (t) => {
  const plan = small();
  t.same(reconcileNetwork(plan, applied(plan)), [], "idempotent");

  const drift = applied(plan);
  drift["t-homeA"]!.links["lan0"]!.addresses = ["198.51.100.99/27"];
  drift["t-homeA"]!.links["capsule0"] = { up: true, master: undefined, addresses: ["100.64.0.1/10"] };
  drift["t-homeA"]!.routes = {};
  drift["t-homeA-rtr"]!.nftHash = "stale";
  drift["t-homeA-rtr"]!.sysctls["net.ipv4.ip_forward"] = "0";
  delete drift["t-client"]!.links["wan0"];
  t.same(
    reconcileNetwork(plan, drift).map((c) => c.argv.join(" ")),
    [
      "ip netns exec t-homeA-rtr sysctl -q -w net.ipv4.ip_forward=1",
      "ip -n t-inet link del client",
      "ip -n t-inet link add client type veth peer name wan0 netns t-client",
      "ip -n t-inet link set client master br0",
      "ip -n t-client addr add 192.0.2.200/24 dev wan0",
      "ip -n t-homeA addr del 198.51.100.99/27 dev lan0",
      "ip -n t-homeA addr add 198.51.100.10/27 dev lan0",
      "ip -n t-inet link set client up",
      "ip -n t-client link set wan0 up",
      "ip -n t-homeA route replace default via 198.51.100.1",
      "ip netns exec t-homeA-rtr nft --check -f -",
      "ip netns exec t-homeA-rtr nft -f -",
    ],
    "capsule0, which capsuled owns, is left alone",
  );
});

t.test("applyNetwork: observes, then runs only the difference", async (t) => {
  const plan = small();
  const fresh = kernel(new FakeRunner(), {});
  const ran = await applyNetwork(fresh, plan);
  t.equal(ran.length, 66);
  t.same(fresh.commands.slice(0, 1), ["ip -j netns list"], "a fresh lab is observed with one command");
  t.same(
    fresh.commands.slice(1),
    ran.map((c) => c.argv.join(" ")),
  );

  const done = kernel(new FakeRunner(), applied(plan));
  t.same(await applyNetwork(done, plan), [], "second apply changes nothing");
  t.ok(
    done.commands.every((c) => / -j | sysctl -n | nft list table /.test(c)),
    "only read commands ran",
  );
  t.ok(done.commands.includes("ip netns exec t-homeA-rtr nft list table ip capsule_lab"));
  t.ok(
    done.commands.includes(
      "ip netns exec t-homeA-rtr sysctl -n net.ipv6.conf.all.disable_ipv6 net.ipv6.conf.default.disable_ipv6 net.ipv4.ip_forward",
    ),
  );
});

t.test("capsule processes: mount namespace pin, detached start, exec, capsulectl", async (t) => {
  const plan = small();
  const home = plan.capsules.find((c) => c.name === "homeA")!;
  t.same(
    mountNsCommands(home).map((c) => c.argv),
    [
      ["touch", "/tmp/capsule-lab-t/mnt/homeA.mnt"],
      [
        "nsenter",
        "--net=/run/netns/t-homeA",
        "unshare",
        "--mount=/tmp/capsule-lab-t/mnt/homeA.mnt",
        "--propagation",
        "private",
        "sh",
        "-c",
        mountNsCommands(home)[1]!.argv[8]!,
        "capsule-lab",
        "/tmp/capsule-lab-t/homeA/run",
        "/etc/netns/t-homeA/resolv.conf",
      ],
    ],
  );
  const script = mountNsCommands(home)[1]!.argv[8]!;
  t.match(script, /mount --bind "\$1" \/run/, "the private /run");
  t.ok(
    script.indexOf('mount --bind "$2" /etc/resolv.conf') < script.indexOf('mount --bind "$1" /run'),
    "the lab resolv.conf, bound before /run is replaced",
  );
  t.match(script, /mount -t sysfs sysfs \/sys/, "a sysfs of this netns");
  t.match(script, /mount -t "\$t" -o "\$o"/, "the host's cgroup hierarchies mounted again for runc");
  t.ok(
    script.indexOf("cg=$(") < script.indexOf("mount -t sysfs"),
    "cgroup mounts noted before sysfs hides them",
  );
  t.same(startCommand(home).argv.slice(0, 14), [
    "nsenter",
    "--net=/run/netns/t-homeA",
    "--mount=/tmp/capsule-lab-t/mnt/homeA.mnt",
    "--",
    "setsid",
    "-f",
    "sh",
    "-c",
    'exec >>"$2" 2>&1 </dev/null; echo $$ >"$1"; shift 2; exec "$@"',
    "capsule-lab",
    "/tmp/capsule-lab-t/homeA/capsuled.pid",
    "/tmp/capsule-lab-t/homeA/capsuled.log",
    "env",
    "-u",
  ]);
  t.same(startCommand(home).argv.slice(15), home.argv);
  t.same(labExecArgv(plan, "homeA", ["ip", "addr"]), [
    "nsenter",
    "--net=/run/netns/t-homeA",
    "--mount=/tmp/capsule-lab-t/mnt/homeA.mnt",
    "--",
    "ip",
    "addr",
  ]);
  t.same(labExecArgv(plan, "homeA-rtr", ["nft", "list", "ruleset"]), [
    "ip",
    "netns",
    "exec",
    "t-homeA-rtr",
    "nft",
    "list",
    "ruleset",
  ]);
  t.same(labExecArgv(plan, "t-client", ["true"]).slice(0, 4), ["ip", "netns", "exec", "t-client"]);
  t.throws(() => labExecArgv(plan, "nope", ["true"]), { code: "CAPSULE_NOT_FOUND" });
  t.same(capsulectlArgv(plan, ["--all", "capsule", "info"]), [
    "ip",
    "netns",
    "exec",
    "t-op",
    "env",
    "-u",
    "NODE_OPTIONS",
    "-u",
    "CAPSULE_CONFIG_DIR",
    "-u",
    "CAPSULE_HOST",
    "/usr/bin/node",
    "/repo/dist/src/cli/main.js",
    "--config-dir",
    "/tmp/capsule-lab-t/operator",
    "--all",
    "capsule",
    "info",
  ]);
});

t.test(
  "waitListening: a capsuled that dies is reported with its log, without waiting out the timeout",
  async (t) => {
    const plan = small();
    const home = plan.capsules.find((c) => c.name === "homeA")!;
    const r = new FakeRunner().on((argv) => {
      if (argv.includes("timeout")) return { exitCode: 1 };
      if (argv[0] === "cat") return { stdout: "4242\n" };
      if (argv.join(" ") === "ip netns identify 4242") return { stdout: "\n" };
      if (argv[0] === "tail") return { stdout: "error: --listen: bad address\n" };
      return undefined;
    });
    await t.rejects(waitListening(r, new FakeClock(), plan, home, 20_000), {
      code: "CAPSULE_TIMEOUT",
      message: "homeA: capsuled exited before listening",
      hint: "see /tmp/capsule-lab-t/homeA/capsuled.log:\nerror: --listen: bad address",
    });
    t.same(r.commands, [
      'ip netns exec t-op timeout 2 bash -c exec 3<>"/dev/tcp/$0/$1" 203.0.113.6 50000',
      "cat /tmp/capsule-lab-t/homeA/capsuled.pid",
      "ip netns identify 4242",
      "tail -n 15 /tmp/capsule-lab-t/homeA/capsuled.log",
    ]);
  },
);

t.test(
  "teardownLab: finds everything by prefix, kills groups, unmounts, deletes, removes the dir",
  async (t) => {
    const clock = new FakeClock();
    let alive = true;
    let resolvers = true;
    const r = new FakeRunner().on((argv) => {
      const cmd = argv.join(" ");
      if (cmd === "ip -j netns list") {
        return {
          stdout: JSON.stringify([
            { name: "t-inet" },
            { name: "t-homeA" },
            { name: "tx-homeA" },
            { name: "other" },
          ]),
        };
      }
      if (cmd === "ip netns pids t-homeA") return { stdout: alive ? "4242\n4250\n" : "" };
      if (argv[0] === "pgrep") return { exitCode: 1 };
      if (cmd.startsWith("find /etc/netns"))
        return { stdout: resolvers ? "/etc/netns/t-homeA\n" : "", exitCode: resolvers ? 0 : 1 };
      if (argv[0] === "find") return { stdout: "/tmp/capsule-lab-t/homeA/state\n" };
      // A workload process: in the capsule's container cgroup, in no lab namespace.
      if (argv[3] === "cgroup-procs") return { stdout: alive ? "5000\n" : "" };
      if (argv[0] === "losetup" && argv[1] === "-n")
        return {
          stdout: "/dev/loop3 /tmp/capsule-lab-t/homeA/state/volumes/data.img\n/dev/loop4 /srv/other.img\n",
        };
      if (argv[0] === "ps") return { stdout: " 4242  4242\n 4250  4242\n 5000  4990\n" };
      if (argv[0] === "rmdir") resolvers = false;
      if (argv[0] === "kill") alive = false;
      if (argv[0] === "findmnt") {
        return {
          stdout: "/\n/tmp/capsule-lab-t/mnt\n/tmp/capsule-lab-t/mnt/homeA.mnt\n/tmp/capsule-lab-tx/mnt\n",
        };
      }
      return undefined;
    });
    const res = await teardownLab(r, clock, { prefix: "t", labDir: "/tmp/capsule-lab-t" });
    t.same(res.killed, [4242, 4250, 5000]);
    const parent = defaultCgroupParent({
      address: containerdPaths("/tmp/capsule-lab-t/homeA/state").address,
      namespace: "capsule",
      snapshotter: "overlayfs",
    });
    t.same(res.namespaces, ["t-inet", "t-homeA"], "another lab's tx-* namespaces are not ours");
    t.same(res.resolvers, ["t-homeA"], "the lab's /etc/netns entries are removed");
    t.same(res.unmounted, ["/tmp/capsule-lab-t/mnt/homeA.mnt", "/tmp/capsule-lab-t/mnt"]);
    t.ok(res.removedDir);
    t.same(
      r.commands.filter((c) => !/^(ip -j netns list|findmnt|test -e)/.test(c)),
      [
        "ip netns pids t-inet",
        "ip netns pids t-homeA",
        "pgrep -f -- (--state-dir |--config |--conf-file=)/tmp/capsule-lab-t/",
        "find /tmp/capsule-lab-t -mindepth 2 -maxdepth 2 -type d -name state",
        `sh -c ${CGROUP_PROCS} cgroup-procs ${parent}`,
        "ps -o pid=,pgid= -p 4242,4250,5000",
        "kill -s TERM -- -4242 4242 4250 5000",
        "ip netns pids t-inet",
        "ip netns pids t-homeA",
        "pgrep -f -- (--state-dir |--config |--conf-file=)/tmp/capsule-lab-t/",
        "find /tmp/capsule-lab-t -mindepth 2 -maxdepth 2 -type d -name state",
        `sh -c ${CGROUP_PROCS} cgroup-procs ${parent}`,
        "umount /tmp/capsule-lab-t/mnt/homeA.mnt",
        "umount /tmp/capsule-lab-t/mnt",
        "ip netns del t-inet",
        "ip netns del t-homeA",
        "find /etc/netns -mindepth 1 -maxdepth 1 -name t-*",
        "rm -f /etc/netns/t-homeA/resolv.conf",
        "rmdir --ignore-fail-on-non-empty /etc/netns/t-homeA",
        "find /tmp/capsule-lab-t -mindepth 2 -maxdepth 2 -type d -name state",
        `sh -c ${CGROUP_RMDIR} cgroup-rmdir ${parent}`,
        "losetup -n -l -O NAME,BACK-FILE",
        "losetup -d /dev/loop3",
        "rm -rf --one-file-system /tmp/capsule-lab-t",
        "find /etc/netns -mindepth 1 -maxdepth 1 -name t-*",
      ],
    );
  },
);

t.test("parsers", async (t) => {
  t.same(
    parseLinks(
      '[{"ifname":"lo","flags":["LOOPBACK","UP"],"addr_info":[{"family":"inet","local":"127.0.0.1","prefixlen":8}]},' +
        '{"ifname":"edge","flags":["BROADCAST"],"master":"br0","addr_info":[{"family":"inet6","local":"fe80::1","prefixlen":64}]}]',
    ),
    {
      lo: { up: true, master: undefined, addresses: ["127.0.0.1/8"] },
      edge: { up: false, master: "br0", addresses: [] },
    },
  );
  t.same(parseLinks(""), {});
  t.same(
    parseRoutes(
      '[{"dst":"default","gateway":"198.51.100.1","dev":"lan0"},{"dst":"198.51.100.0/27","dev":"lan0"}]',
    ),
    {
      default: "198.51.100.1",
      "198.51.100.0/27": "",
    },
  );
  t.equal(parseNftHash('table ip capsule_lab {\n\tcomment "lab:0123abcd"\n'), "0123abcd");
  t.equal(parseNftHash("table ip capsule_lab {\n"), undefined);
  t.same([...parseMounts("/\n/tmp/a\\x20b\n")], ["/", "/tmp/a b"]);
  t.same(parsePids(" 12\n1\nx 34 "), [12, 34]);
  t.equal(escapeRegex("/tmp/capsule-lab-cl.x"), "/tmp/capsule-lab-cl\\.x");
  t.same(parsePortForward("homeA:tcp:8080:homeA:80"), [
    { home: "homeA", proto: "tcp", port: 8080, to: "homeA", toPort: 80 },
  ]);
  t.same(parsePortForward("homeB:udp:51820", [{ home: "homeA", proto: "tcp", port: 1 }]).length, 2);
  t.throws(() => parsePortForward("homeA:icmp:1"), { code: "CAPSULE_INVALID_ARGUMENT" });
});

t.test("formatStatus renders one row per node", async (t) => {
  const out = formatStatus({
    prefix: "t",
    labDir: "/tmp/capsule-lab-t",
    found: true,
    phase: "up",
    strayNamespaces: [],
    rows: [
      {
        name: "homeA",
        role: "home",
        namespace: "t-homeA",
        lan: "198.51.100.10/27",
        wan: "-",
        mgmt: "203.0.113.6/30",
        pid: 42,
        listening: true,
        namespaceExists: true,
        log: "/tmp/capsule-lab-t/homeA/capsuled.log",
      },
    ],
  });
  t.equal(
    out,
    "lab t (up) in /tmp/capsule-lab-t\n" +
      "NAME   ROLE  NAMESPACE  LAN               WAN  MGMT            PROCESS            LOG\n" +
      "homeA  home  t-homeA    198.51.100.10/27  -    203.0.113.6/30  pid 42, listening  /tmp/capsule-lab-t/homeA/capsuled.log\n",
  );
  t.match(
    formatStatus({
      prefix: "t",
      labDir: "/x",
      found: false,
      phase: "unknown",
      rows: [],
      strayNamespaces: [],
    }),
    /no lab/,
  );
});
