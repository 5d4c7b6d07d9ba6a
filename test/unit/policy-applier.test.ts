// NftPolicyApplier with the FakeRunner: check then apply over stdin, skip when unchanged, a
// refused ruleset leaves the previous one (and its persisted copy), counters monotonic across
// replaces; and the systemd units that load the persisted ruleset at boot.
import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import t, { type Test } from "tap";
import { FakeRunner } from "../../src/node/host/runner.js";
import { NftPolicyApplier, parseCounters, POLICY_FILE } from "../../src/node/policy/applier.js";
import { REPO } from "../helpers/capsuled.js";

const A = "table inet capsule_policy {\n}\ndelete table inet capsule_policy\ntable inet capsule_policy { }\n";
const B = `${A}# b\n`;

function dir(t: Test): string {
  const d = mkdtempSync(join(tmpdir(), "capsule-policy-"));
  t.teardown(() => rmSync(d, { recursive: true, force: true }));
  return d;
}

const counters = (c: Record<string, number>) =>
  JSON.stringify({
    nftables: [
      { metainfo: { version: "1.0.6", json_schema_version: 1 } },
      ...Object.entries(c).map(([name, packets], i) => ({
        counter: {
          family: "inet",
          name,
          table: "capsule_policy",
          handle: i + 1,
          packets,
          bytes: packets * 60,
        },
      })),
    ],
  });

t.test("apply: nft --check then nft -f, both over stdin; persisted after success", async (t) => {
  const d = dir(t);
  const fake = new FakeRunner().on((argv) => (argv[1] === "-j" ? { exitCode: 1 } : undefined));
  const a = new NftPolicyApplier({ runner: fake, stateDir: d });
  t.equal(await a.apply(A), true);
  t.same(fake.commands, ["nft --check -f -", "nft -j list counters table inet capsule_policy", "nft -f -"]);
  t.same([fake.inputs[0], fake.inputs[2]], [A, A], "the script goes over stdin");
  t.equal(readFileSync(join(d, POLICY_FILE), "utf8"), A, "persisted for boot");
  t.notOk(existsSync(join(d, `${POLICY_FILE}.tmp`)), "no temp file left");

  fake.commands.length = 0;
  t.equal(await a.apply(A), false, "the same script again changes nothing");
  t.same(fake.commands, [], "and runs nothing");
  t.equal(await a.apply(B), true);
  t.equal(readFileSync(join(d, POLICY_FILE), "utf8"), B);
});

t.test("apply: a rejected ruleset leaves the previous one in force and on disk", async (t) => {
  const d = dir(t);
  let reject = false;
  const fake = new FakeRunner().on((argv) =>
    argv[1] === "--check" && reject ? { exitCode: 1, stderr: "Error: syntax error" } : undefined,
  );
  const a = new NftPolicyApplier({ runner: fake, stateDir: d });
  await a.apply(A);
  reject = true;
  fake.commands.length = 0;
  await t.rejects(a.apply(B), { code: "CAPSULE_COMMAND_FAILED", message: /syntax error/ });
  t.same(fake.commands, ["nft --check -f -"], "never reaches nft -f");
  t.equal(readFileSync(join(d, POLICY_FILE), "utf8"), A, "the old ruleset stays persisted");
  t.equal(a.lastApplied, A);
  reject = false;
  t.equal(await a.apply(B), true, "the next apply retries");
});

t.test("apply: a failed nft -f is not remembered as applied", async (t) => {
  const d = dir(t);
  let fail = true;
  const fake = new FakeRunner().on((argv) =>
    argv[1] === "-f" && fail ? { exitCode: 1, stderr: "Error: Could not process rule" } : undefined,
  );
  const a = new NftPolicyApplier({ runner: fake, stateDir: d });
  await t.rejects(a.apply(A), /Could not process rule/);
  t.notOk(existsSync(join(d, POLICY_FILE)), "nothing persisted");
  fail = false;
  t.equal(await a.apply(A), true, "the same script is tried again");
});

t.test("apply: calls are serialized", async (t) => {
  const d = dir(t);
  const fake = new FakeRunner();
  const a = new NftPolicyApplier({ runner: fake, stateDir: d });
  await Promise.all([a.apply(A), a.apply(B), a.apply(B)]);
  t.equal(fake.commands.filter((c) => c === "nft -f -").length, 2);
  t.equal(readFileSync(join(d, POLICY_FILE), "utf8"), B, "the last one wins");
});

t.test("dropCounters: monotonic across replaces and resets", async (t) => {
  const d = dir(t);
  let live: Record<string, number> = { drop_web: 5 };
  const fake = new FakeRunner().on((argv) => (argv[1] === "-j" ? { stdout: counters(live) } : undefined));
  const a = new NftPolicyApplier({ runner: fake, stateDir: d });
  t.same([...(await a.dropCounters())], [["drop_web", 5n]]);
  live = { drop_web: 7 };
  await a.apply(A); // the old table counted 7; the new one starts at 0
  live = { drop_web: 2, drop_db: 1 };
  t.same(
    Object.fromEntries(await a.dropCounters()),
    { drop_web: 9n, drop_db: 1n },
    "the replaced table's count is kept",
  );
  live = { drop_web: 1 }; // replaced behind our back (a boot load): a reset
  t.same(Object.fromEntries(await a.dropCounters()), { drop_web: 10n, drop_db: 1n }, "never goes back");
});

t.test("parseCounters: nft -j output; garbage is empty", async (t) => {
  t.same([...parseCounters(counters({ drop_a: 3 }))], [["drop_a", 3n]]);
  t.same([...parseCounters("not json")], []);
  t.same([...parseCounters('{"nftables":[{"table":{}}]}')], []);
});

t.test("systemd units: the persisted ruleset is loaded before the network, capsuled after it", async (t) => {
  const unit = readFileSync(join(REPO, "packaging/systemd/capsule-policy.service"), "utf8");
  const lines = unit.split("\n").filter((l) => !l.startsWith("#"));
  const has = (l: string) => t.ok(lines.includes(l), `capsule-policy.service: ${l}`);
  has("DefaultDependencies=no");
  has("Before=network-pre.target");
  has("Wants=network-pre.target");
  has("Type=oneshot");
  has(`ConditionPathExists=/var/lib/capsule/${POLICY_FILE}`);
  has(`ExecStart=/usr/sbin/nft -f /var/lib/capsule/${POLICY_FILE}`);
  has("After=nftables.service");
  const d = readFileSync(join(REPO, "packaging/systemd/capsuled.service"), "utf8");
  t.match(d, /^After=.*\bcapsule-policy\.service\b/m, "capsuled.service starts after the policy load");
  t.match(d, /^Wants=.*\bcapsule-policy\.service\b/m);
  t.match(d, /--state-dir \/var\/lib\/capsule\b/, "the same state dir the policy unit reads");
  t.match(d, /^KillMode=process$/m, "stopping capsuled leaves workloads running");
});
