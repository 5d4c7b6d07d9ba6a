// NftPortForwarder against the real nft in throwaway namespaces:
//   out (198.51.100.2) --up-- cap (198.51.100.1; wlv 100.64.5.1; capsule0 100.64.9.1) --wlv-- wl (100.64.5.2)
//                                                             \--capsule0-- fab (100.64.9.2)
// `cap` is the capsule, `wl` stands in for a workload, `out` for the internet, `fab` for a fabric peer
// (reached through the interface named like the fabric one). Listeners answer with the peer
// address they saw, which shows both DNAT (the answer arrives) and masquerade (which address).
import { join } from "node:path";
import t from "tap";
import {
  compileNat,
  NAT_TABLE,
  NftPortForwarder,
  normalizeRuleset,
  renderNatTable,
} from "../../src/node/workloads/nat.js";
import type { HostPortForward } from "../../src/node/workloads/ports.js";
import { isRoot, RecordingRunner, ROOT_SKIP, type Sandbox, waitFor, withNamespaces } from "../helpers/ns.js";

const WL = "100.64.5.2";
const FWD: HostPortForward = { protocol: "tcp", hostPort: 18080, address: WL, port: 8080, workload: "web" };

if (!isRoot()) {
  t.plan(0, ROOT_SKIP);
} else {
  const sb: Sandbox = withNamespaces(t);
  let cap: Awaited<ReturnType<Sandbox["node"]>>;

  // A listener that prints the address of whoever connects, forever (killed with the namespace).
  const echoPeer = async (node: string, port: number) => {
    const n = sb.nodes.get(node)!;
    await n.spawner.spawnDetached(
      ["socat", `TCP-LISTEN:${port},reuseaddr,fork`, "SYSTEM:echo $SOCAT_PEERADDR"],
      { logFile: join(n.stateDir, `socat-${port}.log`) },
    );
    t.ok(
      await waitFor(
        async () => (await sb.exec(node, ["ss", "-Hltn", `sport = :${port}`])).stdout.trim() !== "",
        5_000,
      ),
      `listener ${node}:${port} is up`,
    );
  };
  // Connect from `node` to addr:port and return what the listener said ("" when nothing answered).
  const ask = async (node: string, addr: string, port: number) => {
    const r = await sb.exec(node, ["socat", "-T", "3", "-", `TCP:${addr}:${port},connect-timeout=2`], {
      input: "",
      allowFailure: true,
      timeoutMs: 10_000,
    });
    return r.stdout.trim();
  };

  t.before(async () => {
    cap = await sb.node("cap");
    await sb.node("wl");
    await sb.node("out");
    await sb.node("fab");
    await sb.link("cap", "up0", "198.51.100.1/24", "out", "up1", "198.51.100.2/24");
    await sb.link("cap", "wlv", "100.64.5.1/24", "wl", "eth0", `${WL}/24`);
    await sb.link("cap", "capsule0", "100.64.9.1/24", "fab", "fab0", "100.64.9.2/24");
    await sb.exec("wl", ["ip", "route", "add", "default", "via", "100.64.5.1"]);
    await sb.exec("fab", ["ip", "route", "add", "100.64.5.0/24", "via", "100.64.9.1"]);
    // `out` can route back to the workload, so an unmasqueraded packet would show its own address.
    await sb.exec("out", ["ip", "route", "add", "100.64.5.0/24", "via", "198.51.100.1"]);
    await sb.exec("cap", ["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    await echoPeer("wl", 8080);
    await echoPeer("out", 9000);
    await echoPeer("fab", 9000);
  });

  const fwd = () => new NftPortForwarder({ runner: cap.runner, fabricIface: "capsule0" });

  t.test("set applies the table; the listing parses back to the same ruleset", async (t) => {
    const f = fwd();
    await f.set([WL], [FWD]);
    const listed = (await cap.runner.run(["nft", "list", "table", "ip", NAT_TABLE])).stdout;
    const want = renderNatTable({
      workloadAddresses: [WL],
      forwards: [FWD],
      fabricIface: "capsule0",
      fabricCidr: "100.64.0.0/10",
    });
    t.equal(normalizeRuleset(listed), normalizeRuleset(want), "nft list equals the golden text");
    // The listing is itself valid input: nft accepts it back.
    await cap.runner.run(["nft", "--check", "-f", "-"], { input: `delete table ip ${NAT_TABLE}\n${listed}` });
  });

  t.test("re-applying the same state is a no-op, also for a fresh forwarder (restart)", async (t) => {
    const rec = new RecordingRunner(cap.runner);
    const f = new NftPortForwarder({ runner: rec, fabricIface: "capsule0" });
    await f.set([WL], [FWD]);
    t.same(rec.commands, [`nft list table ip ${NAT_TABLE}`], "a new forwarder only reads the table");
    await f.set([WL], [FWD]);
    t.same(rec.commands, [`nft list table ip ${NAT_TABLE}`], "the same forwarder runs nothing");
  });

  t.test("a host-port forward reaches the workload, from outside and from the capsule itself", async (t) => {
    t.equal(
      await ask("out", "198.51.100.1", 18080),
      "198.51.100.2",
      "DNAT from outside; the workload sees the client",
    );
    t.equal(
      await ask("cap", "198.51.100.1", 18080),
      "198.51.100.1",
      "DNAT in output for the capsule's own connections",
    );
    t.equal(await ask("out", "198.51.100.1", 18081), "", "an unforwarded port does not answer");
  });

  t.test("masquerade applies to non-fabric destinations only", async (t) => {
    t.equal(await ask("wl", "198.51.100.2", 9000), "198.51.100.1", "egress to the internet is masqueraded");
    t.equal(await ask("wl", "100.64.9.2", 9000), WL, "fabric traffic keeps the workload address");
  });

  t.test("replacing the table is atomic and works whether or not it exists", async (t) => {
    const f = fwd();
    const other: HostPortForward = { ...FWD, hostPort: 18081 };
    await f.set([WL], [other]);
    t.equal(await ask("out", "198.51.100.1", 18081), "198.51.100.2", "the new forward works");
    t.equal(await ask("out", "198.51.100.1", 18080), "", "the old one is gone");
    await f.set([], []);
    t.equal(
      await ask("wl", "198.51.100.2", 9000),
      WL,
      "no workload addresses: no masquerade (the peer sees the workload)",
    );
    await cap.runner.run(["nft", "delete", "table", "ip", NAT_TABLE]);
    const cold = fwd();
    await cold.set([WL], [FWD]);
    t.equal(await ask("out", "198.51.100.1", 18080), "198.51.100.2", "applied with no table present");
    // Bad input never reaches the kernel: the old table stays.
    await t.rejects(cold.set([WL], [FWD, { ...FWD, address: "100.64.5.3" }]), {
      code: "CAPSULE_INVALID_ARGUMENT",
    });
    t.equal(await ask("out", "198.51.100.1", 18080), "198.51.100.2", "still forwarding after a refused set");
    t.match(
      compileNat({
        workloadAddresses: [],
        forwards: [],
        fabricIface: "capsule0",
        fabricCidr: "100.64.0.0/10",
      }),
      /delete table/,
    );
  });

  t.test(
    "golden text with many elements: nft lists it back in our order, so a restart is a no-op",
    async (t) => {
      const many: HostPortForward[] = [];
      for (let i = 0; i < 60; i++)
        many.push({
          protocol: i % 3 ? "tcp" : "udp",
          hostPort: 1000 + ((i * 7919) % 5000),
          address: `100.64.${i % 7}.${((i * 13) % 250) + 1}`,
          port: 80 + i,
          workload: `w${i}`,
        });
      const addrs = many.map((f) => f.address).reverse();
      await fwd().set(addrs, many);
      const listed = (await cap.runner.run(["nft", "list", "table", "ip", NAT_TABLE])).stdout;
      const want = renderNatTable({
        workloadAddresses: addrs,
        forwards: many,
        fabricIface: "capsule0",
        fabricCidr: "100.64.0.0/10",
      });
      t.equal(normalizeRuleset(listed), normalizeRuleset(want), "listing equals the golden text");
      const rec = new RecordingRunner(cap.runner);
      await new NftPortForwarder({ runner: rec, fabricIface: "capsule0" }).set(addrs, many);
      t.same(rec.commands, [`nft list table ip ${NAT_TABLE}`], "a fresh forwarder applies nothing");
      await fwd().set([WL], [FWD]);
    },
  );

  t.test("portInUse sees bound sockets, not our DNAT", async (t) => {
    const f = fwd();
    await sb.nodes
      .get("cap")!
      .spawner.spawnDetached(["socat", "TCP-LISTEN:18500,reuseaddr,fork", "SYSTEM:true"], {
        logFile: join(cap.stateDir, "socat-18500.log"),
      });
    t.ok(await waitFor(() => f.portInUse("tcp", 18500), 5_000), "a listening socket is in use");
    t.equal(await f.portInUse("tcp", 18080), false, "a DNAT forward binds nothing");
    t.equal(await f.portInUse("udp", 18500), false, "udp is separate");
  });

  t.test("cleanup: deleting the namespace takes the table with it", async (t) => {
    const r = await cap.runner.run(["nft", "list", "tables"]);
    t.match(r.stdout, /table ip capsule_nat/, "only our table is there");
    t.notMatch(r.stdout.replace(/table ip capsule_nat\n?/, ""), /table/, "no other table was made");
  });
}
