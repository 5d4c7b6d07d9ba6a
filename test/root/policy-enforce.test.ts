// The policy manager and NftPolicyApplier against the real nft, in throwaway namespaces:
//   fab (100.64.9.2, a fabric peer) --capsule0-- cap (100.64.9.1) --wlv-- wl (100.64.5.2, workload "web")
// Default deny at first apply, a policy opens exactly its port, drops are counted per workload
// and survive replaces, a ruleset nft refuses changes nothing, a delete closes again, and the
// persisted boot copy loads in a fresh namespace where the fabric interface does not exist.
import { join } from "node:path";
import { readFileSync } from "node:fs";
import { pino } from "pino";
import t from "tap";
import type { Mesh } from "../../src/fabric/policy/model.js";
import { FakeClock } from "../../src/node/host/clock.js";
import { NftPolicyApplier, POLICY_FILE } from "../../src/node/policy/applier.js";
import { Policies } from "../../src/node/policy/manager.js";
import { PolicyRepo } from "../../src/node/policy/repo.js";
import { Store } from "../../src/node/store/store.js";
import { isRoot, ROOT_SKIP, type Sandbox, waitFor, withNamespaces } from "../helpers/ns.js";

const WL = "100.64.5.2";

if (!isRoot()) {
  t.plan(0, ROOT_SKIP);
} else {
  const sb: Sandbox = withNamespaces(t);

  const ask = async (node: string, addr: string, port: number) => {
    const r = await sb.exec(node, ["socat", "-T", "2", "-", `TCP:${addr}:${port},connect-timeout=1`], {
      input: "",
      allowFailure: true,
      timeoutMs: 10_000,
    });
    return r.stdout.trim();
  };

  t.test("enforce, count, refuse, delete, boot copy", async (t) => {
    const cap = await sb.node("cap");
    await sb.node("wl");
    await sb.node("fab");
    await sb.link("cap", "wlv", "100.64.5.1/24", "wl", "eth0", `${WL}/24`);
    await sb.link("cap", "capsule0", "100.64.9.1/24", "fab", "fab0", "100.64.9.2/24");
    await sb.exec("wl", ["ip", "route", "add", "default", "via", "100.64.5.1"]);
    await sb.exec("fab", ["ip", "route", "add", "100.64.5.0/24", "via", "100.64.9.1"]);
    await sb.exec("cap", ["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    for (const port of [8080, 9090]) {
      const n = sb.nodes.get("wl")!;
      await n.spawner.spawnDetached(
        ["socat", `TCP-LISTEN:${port},reuseaddr,fork`, "SYSTEM:echo $SOCAT_PEERADDR"],
        { logFile: join(n.stateDir, `socat-${port}.log`) },
      );
      t.ok(
        await waitFor(
          async () => (await sb.exec("wl", ["ss", "-Hltn", `sport = :${port}`])).stdout.trim() !== "",
          5_000,
        ),
      );
    }
    t.equal(await ask("fab", WL, 8080), "100.64.9.2", "open before any policy table");

    const mesh: Mesh = {
      self: "cap",
      capsules: [
        { name: "cap", address: "100.64.9.1", edge: false },
        { name: "fab", address: "100.64.9.2", edge: false },
      ],
      workloads: [{ name: "web", address: WL, labels: { app: "web" }, capsule: "cap" }],
    };
    const store = Store.open(":memory:");
    t.teardown(() => store.close());
    const applier = new NftPolicyApplier({ runner: cap.runner, stateDir: cap.stateDir });
    const policies = new Policies({
      repo: new PolicyRepo(store),
      applier,
      mesh: () => mesh,
      fabricIface: "capsule0",
      clock: new FakeClock(),
      log: pino({ level: "silent" }),
    });
    t.teardown(() => policies.stop());

    await policies.reconcile();
    t.equal(await ask("fab", WL, 8080), "", "default deny: the peer no longer reaches the workload");
    t.equal(await ask("cap", WL, 8080), "100.64.5.1", "its own capsule still does");
    const d1 = (await policies.drops()).get("web") ?? 0n;
    t.ok(d1 > 0n, `drops counted for web (${d1})`);

    const open = JSON.stringify({
      kind: "Policy",
      name: "fab-web",
      allow: [{ from: { capsule: "fab" }, to: { workload: "web" }, ports: ["8080/tcp"] }],
    });
    t.same((await policies.apply([open])).results, [{ name: "fab-web", action: "created" }]);
    t.equal(await ask("fab", WL, 8080), "100.64.9.2", "allowed port");
    t.equal(await ask("fab", WL, 9090), "", "another port stays denied");
    const d2 = (await policies.drops()).get("web") ?? 0n;
    t.ok(d2 > d1, `drops monotonic across the replace (${d1} -> ${d2})`);

    // A ruleset nft refuses (a workload address nft cannot take is impossible to write through
    // the compiler, so break the applier's input directly): nothing changes.
    await t.rejects(applier.apply("table inet capsule_policy { chain x { bogus } }\n"));
    t.equal(await ask("fab", WL, 8080), "100.64.9.2", "the previous ruleset stays in force");

    t.equal(await policies.delete("fab-web"), true);
    t.equal(await ask("fab", WL, 8080), "", "denied again after delete");

    // The boot copy loads where capsule0 does not exist (capsule-policy.service runs before it).
    const boot = readFileSync(join(cap.stateDir, POLICY_FILE), "utf8");
    t.equal(boot, applier.lastApplied);
    await sb.node("fresh");
    const r = await sb.exec("fresh", ["nft", "-f", "-"], { input: boot, allowFailure: true });
    t.equal(r.exitCode, 0, `boot copy loads without the fabric interface: ${r.stderr}`);
    t.match(
      (await sb.exec("fresh", ["nft", "list", "chain", "inet", "capsule_policy", "forward"])).stdout,
      /drop/,
    );
  });
}
