// The policy compiler against the real nft, in throwaway namespaces:
//   peer (100.64.9.2) --fab0|capsule0-- cap (100.64.9.1; wlv 100.64.5.1; wlv2 100.64.6.1) --wlv-- wl (100.64.5.2)
//                                                                                          \--wlv2-- wl2 (100.64.6.2)
// `cap` is the capsule, `wl` a local workload ("web"), `wl2` a workload the inventory does not
// know yet, `peer` a workload on another capsule ("client") arriving through the fabric
// interface. First ~50 generated inputs: nft accepts each script, loads it twice in a row, and
// lists back exactly the IR. Then real TCP through cap's forward path.
import { spawn } from "node:child_process";
import fc from "fast-check";
import t from "tap";
import {
  compilePolicy,
  type PolicyCompileInput,
  type PolicyIR,
  POLICY_TABLE,
  renderPolicyTable,
} from "../../src/fabric/policy/compile.js";
import type { Mesh, Policy } from "../../src/fabric/policy/model.js";
import { normalizeRuleset } from "../../src/node/workloads/nat.js";
import { isRoot, ROOT_SKIP, type Sandbox, sleep, waitFor, withNamespaces } from "../helpers/ns.js";
import { caseArb } from "../helpers/policy-arb.js";

type Json = Record<string, unknown>;

/** listedIR reads the sets, map and counters of `nft -j list table` back into the IR's shape. */
function listedIR(
  json: string,
): Pick<PolicyIR, "tcp" | "udp" | "icmp"> & { drops: string[]; counters: string[] } {
  const items = (JSON.parse(json) as { nftables: Json[] }).nftables;
  const sets = new Map<string, unknown[]>();
  const out = { tcp: [], udp: [], icmp: [], drops: [], counters: [] } as ReturnType<typeof listedIR>;
  for (const it of items) {
    const s = (it["set"] ?? it["map"]) as Json | undefined;
    if (s) sets.set(String(s["name"]), (s["elem"] as unknown[] | undefined) ?? []);
    const c = it["counter"] as Json | undefined;
    if (c) out.counters.push(String(c["name"]));
  }
  const concat = (e: unknown): unknown[] => {
    const v = e as Json;
    const inner = (v["elem"] as Json | undefined)?.["val"] ?? v;
    return (inner as { concat: unknown[] }).concat;
  };
  for (const proto of ["tcp", "udp"] as const)
    for (const e of sets.get(`allow_${proto}`) ?? []) {
      const [src, dst, port] = concat(e) as [string, string, number | { range: [number, number] }];
      const [from, to] = typeof port === "number" ? [port, port] : port.range;
      out[proto].push({ src, dst, from, to });
    }
  for (const e of sets.get("allow_icmp") ?? []) {
    const [src, dst] = concat(e) as [string, string];
    out.icmp.push({ src, dst });
  }
  for (const e of sets.get("drop_counters") ?? []) {
    const [addr, name] = e as [string, string];
    out.drops.push(`${addr}=${name}`);
  }
  return out;
}

const sortBy = <T>(xs: T[]) => [...xs].map((x) => JSON.stringify(x)).sort();

if (!isRoot()) {
  t.plan(0, ROOT_SKIP);
} else {
  const sb: Sandbox = withNamespaces(t);
  const nft = (args: string[], input?: string) =>
    sb.exec("cap", ["nft", ...args], { ...(input === undefined ? {} : { input }), timeoutMs: 10_000 });

  t.before(async () => {
    await sb.node("cap");
  });

  t.test("~50 generated inputs: nft checks, loads twice, and lists back the IR", async (t) => {
    let n = 0;
    await fc.assert(
      fc.asyncProperty(caseArb, async ({ mesh, policies, implicit }) => {
        const { script, ir } = compilePolicy({
          policies,
          implicit,
          mesh,
          fabricIface: "capsule0",
          fabricCidr: "100.64.0.0/10",
        });
        await nft(["--check", "-f", "-"], script);
        await nft(["-f", "-"], script);
        await nft(["-f", "-"], script); // the replace is idempotent and works when the table exists
        const listed = listedIR((await nft(["-j", "list", "table", "inet", POLICY_TABLE])).stdout);
        const want = {
          tcp: sortBy(ir.tcp),
          udp: sortBy(ir.udp),
          icmp: sortBy(ir.icmp),
          drops: ir.local.map((w) => `${w.address}=${w.counter}`).sort(),
          counters: [...ir.local.map((w) => w.counter), "unknown_dst"].sort(),
        };
        const got = {
          tcp: sortBy(listed.tcp),
          udp: sortBy(listed.udp),
          icmp: sortBy(listed.icmp),
          drops: listed.drops.sort(),
          counters: listed.counters.sort(),
        };
        if (JSON.stringify(got) !== JSON.stringify(want))
          throw new Error(`listed ${JSON.stringify(got)}\nwanted ${JSON.stringify(want)}`);
        const text = (await nft(["list", "table", "inet", POLICY_TABLE])).stdout;
        if (normalizeRuleset(text) !== normalizeRuleset(renderPolicyTable(ir)))
          throw new Error(`listing differs from the rendered table:\n${text}\n---\n${renderPolicyTable(ir)}`);
        n++;
      }),
      { numRuns: 50, interruptAfterTimeLimit: 120_000 },
    );
    t.ok(n >= 50, `${n} inputs loaded`);
    await nft(["delete", "table", "inet", POLICY_TABLE]);
  });

  t.test(
    "real packets: allowed port connects, denied does not, a narrowed policy cuts a live flow",
    async (t) => {
      await sb.node("wl");
      await sb.node("wl2");
      await sb.node("peer");
      await sb.link("cap", "capsule0", "100.64.9.1/24", "peer", "fab0", "100.64.9.2/24");
      await sb.link("cap", "wlv", "100.64.5.1/24", "wl", "eth0", "100.64.5.2/24");
      await sb.link("cap", "wlv2", "100.64.6.1/24", "wl2", "eth0", "100.64.6.2/24");
      await sb.exec("wl", ["ip", "route", "add", "default", "via", "100.64.5.1"]);
      await sb.exec("wl2", ["ip", "route", "add", "default", "via", "100.64.6.1"]);
      await sb.exec("peer", ["ip", "route", "add", "100.64.0.0/10", "via", "100.64.9.1"]);
      await sb.exec("cap", ["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
      for (const [node, port] of [
        ["wl", 8080],
        ["wl", 9090],
        ["wl2", 8080],
      ] as const) {
        const n = sb.nodes.get(node)!;
        await n.spawner.spawnDetached(["socat", `TCP-LISTEN:${port},reuseaddr,fork`, "PIPE"], {
          logFile: `${n.stateDir}/socat-${port}.log`,
        });
        t.ok(
          await waitFor(
            async () => (await sb.exec(node, ["ss", "-Hltn", `sport = :${port}`])).stdout.trim() !== "",
            5_000,
          ),
          `listener ${node}:${port} is up`,
        );
      }

      const mesh: Mesh = {
        self: "cap",
        capsules: [
          { name: "cap", address: "100.64.5.1", edge: false },
          { name: "away", address: "100.64.9.3", edge: false },
        ],
        workloads: [
          { name: "web", address: "100.64.5.2", labels: { app: "web" }, capsule: "cap" },
          { name: "client", address: "100.64.9.2", labels: {}, capsule: "away" },
        ],
      };
      const allow: Policy = {
        name: "client-web",
        allow: [
          {
            from: { workload: "client" },
            to: { workload: "web" },
            ports: [{ proto: "tcp", from: 8080, to: 8080 }],
          },
        ],
        tests: [],
      };
      const input = (policies: Policy[]): PolicyCompileInput => ({
        policies,
        implicit: [],
        mesh,
        fabricIface: "capsule0",
        fabricCidr: "100.64.0.0/10",
      });
      const apply = async (policies: Policy[]) => {
        const { script } = compilePolicy(input(policies));
        await nft(["--check", "-f", "-"], script);
        await nft(["-f", "-"], script);
      };
      const counter = async (name: string) => {
        const r = await nft(["-j", "list", "counter", "inet", POLICY_TABLE, name]);
        const c = (JSON.parse(r.stdout) as { nftables: Json[] }).nftables.find((x) => x["counter"]);
        return Number((c?.["counter"] as Json)["packets"]);
      };
      // One request from peer: the echo of "hello", or "" when nothing answered in time.
      const ask = async (addr: string, port: number) =>
        (
          await sb.exec("peer", ["socat", "-T", "2", "-", `TCP:${addr}:${port},connect-timeout=2`], {
            input: "hello\n",
            allowFailure: true,
            timeoutMs: 10_000,
          })
        ).stdout.trim();

      t.equal(await ask("100.64.5.2", 8080), "hello", "no table yet: forwarding is open (the sandbox works)");
      await apply([allow]);
      t.equal(await ask("100.64.5.2", 8080), "hello", "allowed: 8080/tcp from client");
      t.equal(await ask("100.64.5.2", 9090), "", "denied: 9090/tcp is in no rule");
      t.ok((await counter("wl_web")) > 0, "the drop is counted on web's counter");
      t.equal(await ask("100.64.6.2", 8080), "", "denied: a workload the inventory does not know yet");
      t.ok((await counter("unknown_dst")) > 0, "counted as an unknown destination");
      t.equal(
        (
          await sb.exec("cap", ["socat", "-T", "2", "-", "TCP:100.64.5.2:9090,connect-timeout=2"], {
            input: "hi\n",
            timeoutMs: 10_000,
          })
        ).stdout.trim(),
        "hi",
        "the capsule itself reaches its workload on any port (output path, never judged)",
      );

      // A live connection: one line goes through, the policy is narrowed, the next line does not.
      const peer = sb.nodes.get("peer")!;
      const child = spawn(
        "nsenter",
        [`--net=/run/netns/${peer.netns}`, "--", "socat", "-", "TCP:100.64.5.2:8080"],
        {
          stdio: ["pipe", "pipe", "pipe"],
        },
      );
      t.teardown(() => {
        child.kill("SIGKILL");
      });
      let received = "";
      child.stdout.on("data", (d: Buffer) => (received += d.toString()));
      const echoed = (line: string, ms: number) => waitFor(async () => received.includes(line), ms);
      try {
        child.stdin.write("one\n");
        t.ok(await echoed("one\n", 5_000), "the established connection works");
        const before = await counter("wl_web");
        await apply([]);
        child.stdin.write("two\n");
        await sleep(1_500);
        t.notOk(received.includes("two\n"), "after the rule is removed, the next packet is dropped");
        t.ok((await counter("wl_web")) > before, "and counted");
        await apply([allow]);
        t.ok(await echoed("two\n", 8_000), "restored: TCP's retransmission gets through");
      } finally {
        child.kill("SIGKILL");
      }
      await nft(["delete", "table", "inet", POLICY_TABLE]);
    },
  );
}
