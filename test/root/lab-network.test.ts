// The lab's network as a visitor, a home user and the operator see it: NAT, port forwards,
// the operator's point-to-point links, private /run per capsule, capsuled behind it all.
import t from "tap";
import {
  assertNoLeftovers,
  isRoot,
  ROOT_SKIP,
  startServer,
  tcpConnect,
  tcpRequest,
  withLab,
} from "../helpers/lab.js";

if (!isRoot()) {
  t.plan(0, ROOT_SKIP);
} else {
  const lab = await withLab(t, {
    // homeB forwards WAN tcp/8080 to its capsule's port 80; homeA forwards nothing.
    portForwards: [{ home: "homeB", proto: "tcp", port: 8080, toPort: 80 }],
  });
  const prefix = lab.plan.prefix;
  const homeA = lab.capsule("homeA");
  const homeB = lab.capsule("homeB");
  const edge = lab.capsule("edge");
  const wanA = lab.plan.homes[0]!.routerWan;
  const wanB = lab.plan.homes[1]!.routerWan;

  t.test("every capsuled answers capsule info through capsulectl as the operator", async (t) => {
    const r = await lab.capsulectl(["--all", "capsule", "info", "-o", "json"]);
    t.equal(r.exitCode, 0, r.stderr);
    const rows = JSON.parse(r.stdout) as { capsule: string; name: string; id: string }[];
    t.same(rows.map((x) => x.name).sort(), ["edge", "homeA", "homeB"]);
    for (const row of rows) t.match(row.id, /^cap-/);
    const table = await lab.capsulectl(["--capsule", "homeA", "capsule", "info"]);
    t.equal(table.exitCode, 0, table.stderr);
    t.match(table.stdout, /homeA/);
  });

  t.test(
    "NAT blocks inbound: a home listener is unreachable from the internet, reachable on its LAN",
    async (t) => {
      await startServer(lab, "homeA", "0.0.0.0", 8080, "hello from homeA");
      const lan = await tcpRequest(lab, "homeA-rtr", homeA.lanAddress!, 8080);
      t.same(lan, { ok: true, reply: "hello from homeA", error: "" }, "reachable from the router's LAN side");

      const viaWan = await tcpRequest(lab, "client", wanA, 8080);
      t.notOk(viaWan.ok, `client -> home router WAN ${wanA}:8080 fails (${viaWan.error})`);
      const direct = await tcpRequest(lab, "client", homeA.lanAddress!, 8080);
      t.notOk(direct.ok, `client -> LAN address fails without a route (${direct.error})`);
      const fromEdge = await tcpRequest(lab, "edge", wanA, 8080);
      t.notOk(fromEdge.ok, `edge -> home router WAN fails (${fromEdge.error})`);

      // An attacker on the internet segment who routes the LAN through the router still gets nothing.
      const add = await lab.exec("client", ["ip", "route", "add", "198.51.100.0/27", "via", wanA]);
      t.equal(add.exitCode, 0, add.stderr);
      const routed = await tcpRequest(lab, "client", homeA.lanAddress!, 8080);
      t.notOk(routed.ok, `client -> LAN via the router is dropped (${routed.error})`);
      t.equal(routed.error, "ETIMEDOUT", "dropped by the router's forward policy, not refused");
      await lab.exec("client", ["ip", "route", "del", "198.51.100.0/27"]);
    },
  );

  t.test("a port forward lets exactly that port in, keeping the visitor's address", async (t) => {
    await startServer(lab, "homeB", "0.0.0.0", 80, "@peer");
    const r = await tcpRequest(lab, "client", wanB, 8080);
    t.same(r, { ok: true, reply: "192.0.2.200", error: "" }, "client reaches homeB:80 through WAN :8080");
    const other = await tcpRequest(lab, "client", wanB, 80);
    t.notOk(other.ok, "only the forwarded port is open");
  });

  t.test("capsules reach the internet outbound, NATed behind their router", async (t) => {
    await startServer(lab, "client", "0.0.0.0", 9000, "@peer");
    t.same(
      await tcpRequest(lab, "homeA", "192.0.2.200", 9000),
      { ok: true, reply: wanA, error: "" },
      "homeA as its router",
    );
    t.same(
      await tcpRequest(lab, "homeB", "192.0.2.200", 9000),
      { ok: true, reply: wanB, error: "" },
      "homeB as its router",
    );
    t.same(
      await tcpRequest(lab, "edge", "192.0.2.200", 9000),
      { ok: true, reply: "192.0.2.10", error: "" },
      "edge as itself",
    );
    await startServer(lab, "edge", "192.0.2.10", 9001, "edge");
    t.same(
      await tcpRequest(lab, "homeA", "192.0.2.10", 9001),
      { ok: true, reply: "edge", error: "" },
      "homeA -> edge",
    );
  });

  t.test("the operator reaches every capsule; capsules cannot reach each other through it", async (t) => {
    for (const c of lab.plan.capsules) {
      t.ok(await tcpConnect(lab, "op", c.mgmtAddress, 50000), `op -> ${c.name} API ${c.api}`);
    }
    t.notOk(await tcpConnect(lab, "homeA", homeB.mgmtAddress, 50000), "homeA -> homeB mgmt");
    t.notOk(await tcpConnect(lab, "homeA", edge.mgmtAddress, 50000), "homeA -> edge mgmt");
    t.notOk(await tcpConnect(lab, "edge", homeA.mgmtAddress, 50000), "edge -> homeA mgmt");
    t.notOk(await tcpConnect(lab, "client", homeA.mgmtAddress, 50000), "client -> homeA mgmt");
    // Even a capsule that routes the management range through its link: the operator never forwards.
    const add = await lab.exec("homeA", ["ip", "route", "add", "203.0.113.0/24", "via", homeA.opAddress]);
    t.equal(add.exitCode, 0, add.stderr);
    t.notOk(await tcpConnect(lab, "homeA", homeB.mgmtAddress, 50000), "homeA -> op -> homeB is dropped");
    t.notOk(await tcpConnect(lab, "homeA", edge.mgmtAddress, 50000), "homeA -> op -> edge is dropped");
    await lab.exec("homeA", ["ip", "route", "del", "203.0.113.0/24"]);
    const fwd = await lab.exec("op", ["sysctl", "-n", "net.ipv4.ip_forward"]);
    t.equal(fwd.stdout.trim(), "0");
  });

  t.test("each capsule has a private /run: two wireguard-go with one interface name coexist", async (t) => {
    for (const c of ["homeA", "homeB"]) {
      const r = await lab.exec(c, ["wireguard-go", "labtest0"], { timeoutMs: 10_000 });
      t.equal(r.exitCode, 0, `${c}: wireguard-go labtest0`);
    }
    for (const c of ["homeA", "homeB"]) {
      const wg = await lab.exec(c, ["wg", "show", "labtest0", "listen-port"]);
      t.equal(wg.exitCode, 0, `${c}: wg talks to its own UAPI socket`);
      const ls = await lab.exec(c, ["ls", "/var/run/wireguard"]);
      t.match(ls.stdout, /labtest0\.sock/, `${c}: the socket is in its private /run`);
      const sys = await lab.exec(c, ["ls", "/sys/class/net"]);
      t.same(
        sys.stdout.split("\n").filter(Boolean).sort(),
        ["capsule0", "labtest0", "lan0", "lo", "mgmt0"],
        `${c}: /sys shows its own links`,
      );
      await lab.exec(c, ["ip", "link", "del", "labtest0"]);
    }
    const host = await lab.exec("client", ["ls", "/run/netns"]);
    t.match(host.stdout, new RegExp(`${prefix}-homeA`), "the root /run is untouched");
  });

  t.test("the router rulesets listed back from nft are the planned text", async (t) => {
    for (const h of lab.plan.homes) {
      const node = lab.plan.nodes.find((n) => n.ns === h.routerNs)!;
      const r = await lab.exec(h.routerNs, ["nft", "list", "table", "ip", "capsule_lab"]);
      t.equal(r.stdout.trimEnd(), node.ruleset!.text.trimEnd(), `${h.name} router`);
    }
    const op = lab.plan.nodes.find((n) => n.role === "op")!;
    const r = await lab.exec("op", ["nft", "list", "table", "ip", "capsule_lab"]);
    t.equal(r.stdout.trimEnd(), op.ruleset!.text.trimEnd(), "operator");
  });

  t.test("status shows every capsule up and listening", async (t) => {
    const s = await lab.status();
    t.equal(s.phase, "up");
    for (const c of lab.plan.capsules) {
      const row = s.rows.find((r) => r.name === c.name)!;
      t.ok(row.pid && row.listening, `${c.name} pid ${row.pid} listening`);
      t.equal(row.mgmt, `${c.mgmtAddress}/30`);
    }
  });

  t.test("down leaves nothing behind", async (t) => {
    const r = await lab.down();
    t.same(r.leftovers, []);
    await assertNoLeftovers(t, prefix);
  });
}
