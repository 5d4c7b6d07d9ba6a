// End-to-end: policy commands through the real capsulectl against a real capsuled with
// --no-fabric (no WireGuard, no workloads): policies are validated, tested, stored and survive a
// restart, but are not enforced (nft is never run on the host: there is nothing of ours to
// protect there), and every command says so. `npm run build` first.
import { type ChildProcess, spawn } from "node:child_process";
import { existsSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import t from "tap";
import { CAPSULECTL, type Daemon, removeDir, startDaemon, tempDir } from "../helpers/capsuled.js";

const started: ChildProcess[] = [];

function ctl(dir: string, args: string[]): Promise<{ code: number | null; out: string; err: string }> {
  const env: NodeJS.ProcessEnv = { ...process.env, USER: "e2e", HOME: dir };
  delete env.CAPSULE_CONFIG_DIR;
  delete env.CAPSULE_HOST;
  const p = spawn(process.execPath, [CAPSULECTL, "--config-dir", dir, ...args], {
    stdio: ["ignore", "pipe", "pipe"],
    env,
  });
  started.push(p);
  let out = "";
  let err = "";
  p.stdout?.on("data", (d) => (out += String(d)));
  p.stderr?.on("data", (d) => (err += String(d)));
  return new Promise((resolve) => {
    const kill = setTimeout(() => p.kill("SIGKILL"), 30_000);
    p.once("close", (code) => {
      clearTimeout(kill);
      resolve({ code, out, err });
    });
  });
}

const POLICY = `kind: Policy
name: web-db
allow:
  - from: { workload: web }
    to: { labels: { app: db } }
    ports: ["5432/tcp"]
tests:
  - { from: web, to: db, port: 5432/tcp, expect: allow }
`;

t.test("policy commands on a capsule without a fabric", async (t) => {
  const dir = tempDir("capsule-e2e-policy-");
  t.teardown(() => removeDir(dir));
  let d: Daemon = await startDaemon({ name: "solo" });
  started.push(d.proc);
  t.teardown(async () => {
    await d.kill();
    removeDir(d.stateDir);
  });
  t.equal((await ctl(dir, ["adopt", d.address, "--name", "solo", "--yes"])).code, 0);
  const file = join(dir, "p.yaml");
  writeFileSync(file, POLICY);

  const a = await ctl(dir, ["policy", "apply", "-f", file]);
  t.equal(a.code, 0, a.err);
  t.equal(a.out, "policy/web-db created\n");
  t.match(
    a.err,
    /note: policy web-db test 1 skipped: web -> db 5432\/tcp: workload web is not in the mesh inventory/,
  );
  t.match(a.err, /note: solo has no fabric: its policies are stored, not enforced/);
  t.match(a.err, /warning: policy web-db rule 1 from: \{workload: web\} matches nothing/);
  t.equal((await ctl(dir, ["policy", "apply", "-f", file])).out, "policy/web-db unchanged\n", "idempotent");

  const bad = await ctl(dir, ["policy", "apply", "-f", file.replace("p.yaml", "bad.yaml")]);
  t.equal(bad.code, 1);
  writeFileSync(join(dir, "bad.yaml"), POLICY.replace("{ workload: web }", "{ workload: web, capsule: x }"));
  const bad2 = await ctl(dir, ["policy", "apply", "-f", join(dir, "bad.yaml")]);
  t.equal(bad2.code, 1);
  t.match(
    bad2.err,
    /^error: .*web-db: allow\.0\.from: has 2 keys \(workload, capsule\); a selector has exactly one\n/,
  );

  const list = await ctl(dir, ["policy", "list", "-o", "json"]);
  t.match(JSON.parse(list.out), { policies: [{ name: "web-db", rules: 1, tests: 1 }] });
  const show = await ctl(dir, ["policy", "show"]);
  t.equal(show.code, 0, show.err);
  t.equal(show.out, "WORKLOAD   ADDRESS   FROM   PORTS   ORIGIN\n", "no workloads here");
  const ex = await ctl(dir, ["policy", "explain", "100.64.2.2", "100.64.2.3", "5432/tcp"]);
  t.equal(ex.code, 0, ex.err);
  t.match(
    ex.out,
    /^deny 100\.64\.2\.2 -> 100\.64\.2\.3 5432\/tcp\ndenied: no rule \(100\.64\.2\.3 is not a workload in the mesh inventory\)\n/,
  );
  const unknown = await ctl(dir, ["policy", "explain", "web", "db", "5432/tcp"]);
  t.equal(unknown.code, 1);
  t.match(unknown.err, /error: src: web is not a workload, capsule or IPv4 address in the mesh/);

  // Stored: a restart keeps the policy; still nothing enforced, nothing written for boot.
  await d.kill();
  d = await startDaemon({ name: "solo", stateDir: d.stateDir, port: d.port });
  started.push(d.proc);
  t.match((await ctl(dir, ["policy", "list"])).out, /web-db\s+1\s+1/);
  t.notOk(existsSync(join(d.stateDir, "policy.nft")), "no ruleset for boot without a fabric");

  const tested = await ctl(dir, ["policy", "test", "-f", file]);
  t.equal(tested.code, 0, tested.err);
  t.match(tested.out, /web-db\s+1\s+web\s+db\s+5432\/tcp\s+allow\s+<none>\s+skip/);

  t.equal((await ctl(dir, ["policy", "delete", "web-db"])).out, "policy/web-db deleted\n");
  t.equal((await ctl(dir, ["policy", "delete", "web-db"])).out, "policy/web-db not found\n");
});

t.test("nothing is left running", async (t) => {
  t.same(
    started.filter((p) => p.exitCode === null && p.signalCode === null).map((p) => p.pid),
    [],
  );
});
