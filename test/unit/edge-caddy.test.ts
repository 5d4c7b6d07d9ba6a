// The Caddy supervisor and applier over fakes: layout, bootstrap config, ensure's decisions
// (adopt, start, report one that dies at start), watch restarting a dead Caddy, and apply
// (the static plan: load once, skip while Caddy runs it, load again after a Caddy restart; a
// rejected load keeps the old config).
import { mkdtempSync, readFileSync, rmSync, writeFileSync, mkdirSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import t, { type Test } from "tap";
import { CaddyEdge, CaddySupervisor, caddyPaths, renderBootstrapConfig } from "../../src/edge/caddy.js";
import { FakeCaddyAdmin } from "../../src/edge/fakes.js";
import { planCaddyConfig } from "../../src/edge/plan.js";
import { isCapsuleError } from "../../src/errors.js";
import { type Clock, FakeClock } from "../../src/node/host/clock.js";
import { FakeRunner } from "../../src/node/host/runner.js";
import { FakeSpawner } from "../../src/node/host/spawner.js";

class InstantClock implements Clock {
  t = 0;
  now() {
    return this.t;
  }
  async sleep(ms: number) {
    this.t += ms;
  }
}

function stateDir(t: Test): string {
  const d = mkdtempSync(join(tmpdir(), "capsule-edge-"));
  t.teardown(() => rmSync(d, { recursive: true, force: true }));
  return d;
}

/** setup: a runner whose `cat /proc/PID/cmdline` shows a caddy running our bootstrap config. */
function setup(t: Test, clock: Clock = new InstantClock()) {
  const dir = stateDir(t);
  const p = caddyPaths(dir);
  const runner = new FakeRunner().on((argv) =>
    argv[0] === "cat" && argv[1]?.startsWith("/proc/")
      ? { stdout: ["caddy", "run", "--config", p.bootstrap, ""].join("\0") }
      : undefined,
  );
  const spawner = new FakeSpawner();
  const admin = new FakeCaddyAdmin();
  admin.up = false;
  // The fake Caddy answers once it is "started".
  const spawn = spawner.spawnDetached.bind(spawner);
  spawner.spawnDetached = async (argv, opts) => {
    const pid = await spawn(argv, opts);
    admin.up = true;
    admin.current = renderBootstrapConfig(p);
    return pid;
  };
  const sup = new CaddySupervisor({ runner, spawner, clock, admin: () => admin, timeoutMs: 1_000 });
  return { dir, p, runner, spawner, admin, sup };
}

t.test("caddyPaths and the bootstrap config", async (t) => {
  const p = caddyPaths("/var/lib/capsule");
  t.same(p, {
    dir: "/var/lib/capsule/caddy",
    bootstrap: "/var/lib/capsule/caddy/bootstrap.json",
    storage: "/var/lib/capsule/caddy/storage",
    log: "/var/lib/capsule/caddy/caddy.log",
    pidFile: "/var/lib/capsule/caddy/caddy.pid",
    adminSocket: "/var/lib/capsule/caddy/admin.sock",
    socketDir: undefined,
    rootCert: "/var/lib/capsule/caddy/storage/pki/authorities/local/root.crt",
  });
  t.same(renderBootstrapConfig(p), {
    admin: { listen: "unix//var/lib/capsule/caddy/admin.sock", config: { persist: false } },
    storage: { module: "file_system", root: "/var/lib/capsule/caddy/storage" },
  });
  const long = caddyPaths(`/${"d".repeat(100)}`);
  t.match(long.adminSocket, /^\/run\/capsule-[0-9a-f]{12}\/caddy-admin\.sock$/);
  t.equal(long.socketDir, long.adminSocket.replace("/caddy-admin.sock", ""));
});

t.test("ensure starts a detached Caddy when none answers, then adopts it", async (t) => {
  const { dir, p, spawner, sup } = setup(t);
  const s = await sup.ensure({ stateDir: dir });
  t.equal(s.adopted, false);
  t.equal(s.pid, 1000);
  t.same(spawner.lines, [
    `spawn HOME=${p.dir} XDG_CONFIG_HOME=${p.dir}/config XDG_DATA_HOME=${p.dir}/data caddy run --config ${p.bootstrap}`,
  ]);
  t.equal(spawner.calls[0]?.logFile, p.log);
  t.equal(readFileSync(p.pidFile, "utf8"), "1000\n");
  t.same(JSON.parse(readFileSync(p.bootstrap, "utf8")), renderBootstrapConfig(p));

  const again = await sup.ensure({ stateDir: dir });
  t.equal(again.adopted, true);
  t.equal(again.pid, 1000);
  t.equal(spawner.calls.length, 1, "no second Caddy");
});

t.test("ensure adopts a Caddy that answers (pid from the pid file)", async (t) => {
  const { dir, p, spawner, admin, sup } = setup(t);
  mkdirSync(p.dir, { recursive: true });
  const pid = await spawner.spawnDetached(["caddy"], { logFile: "/dev/null" }); // someone else's start
  writeFileSync(p.pidFile, `${pid}\n`);
  admin.current = { apps: { http: {} } };
  const s = await sup.ensure({ stateDir: dir });
  t.same({ adopted: s.adopted, pid: s.pid }, { adopted: true, pid });
  t.equal(spawner.calls.length, 1);
  t.same(admin.loads, [], "an adopted Caddy's config is untouched");
});

t.test("ensure reports a Caddy that exits at start", async (t) => {
  const { dir, p, spawner, admin, sup } = setup(t);
  spawner.spawnDetached = async (argv, opts) => {
    const pid = await FakeSpawner.prototype.spawnDetached.call(spawner, argv, opts);
    spawner.kill(pid);
    return pid;
  };
  mkdirSync(p.dir, { recursive: true });
  writeFileSync(p.log, "Error: loading initial config: address already in use\n");
  admin.up = false;
  await t.rejects(sup.ensure({ stateDir: dir }), {
    code: "CAPSULE_COMMAND_FAILED",
    message: "caddy exited at start",
    hint: /address already in use/,
  });
});

t.test("ensure times out on a Caddy that never answers", async (t) => {
  const { dir, spawner, admin, sup } = setup(t);
  spawner.spawnDetached = (argv, opts) => FakeSpawner.prototype.spawnDetached.call(spawner, argv, opts);
  admin.up = false;
  await t.rejects(sup.ensure({ stateDir: dir }), { code: "CAPSULE_TIMEOUT" });
});

t.test("stop kills our Caddy and removes the pid file; idempotent", async (t) => {
  const { dir, p, runner, spawner, sup } = setup(t);
  await sup.ensure({ stateDir: dir });
  runner.on((argv) => {
    if (argv[0] === "kill") spawner.kill(Number(argv[2]));
    return undefined;
  });
  t.equal(await sup.stop({ stateDir: dir }), true);
  t.ok(runner.commands.includes("kill -TERM 1000"));
  t.throws(() => readFileSync(p.pidFile));
  t.equal(await sup.stop({ stateDir: dir }), false);
});

// Real file I/O (the pid file) happens between fake-clock steps: give it real time to finish.
const flush = async () => {
  for (let i = 0; i < 10; i++) await new Promise((r) => setTimeout(r, 3));
};

t.test("watch restarts a dead Caddy and calls onRestart; backs off on failure", async (t) => {
  const clock = new FakeClock();
  const { dir, spawner, admin, sup } = setup(t, clock);
  const first = sup.ensure({ stateDir: dir });
  await flush();
  const s = await first;
  t.equal(s.pid, 1000);

  const ac = new AbortController();
  const restarts: (number | undefined)[] = [];
  const watching = sup.watch({
    stateDir: dir,
    signal: ac.signal,
    intervalMs: 3_000,
    onRestart: async (st) => {
      restarts.push(st.pid);
    },
  });
  clock.advance(3_000);
  await flush();
  t.same(restarts, [], "alive: nothing done");

  spawner.kill(1000);
  admin.up = false;
  clock.advance(3_000);
  await flush();
  t.same(restarts, [1001], "restarted once");
  t.equal(spawner.calls.length, 2);

  // A restart that fails (Caddy dies at once) backs off 1 s, then 2 s.
  const spawnOk = spawner.spawnDetached;
  spawner.spawnDetached = async (argv, opts) => {
    const pid = await FakeSpawner.prototype.spawnDetached.call(spawner, argv, opts);
    spawner.kill(pid);
    return pid;
  };
  spawner.kill(1001);
  admin.up = false;
  clock.advance(3_000);
  await flush();
  t.equal(spawner.calls.length, 3, "tried again");
  clock.advance(999);
  await flush();
  t.equal(spawner.calls.length, 3, "waits the 1 s backoff");
  spawner.spawnDetached = spawnOk;
  clock.advance(1);
  await flush();
  t.equal(spawner.calls.length, 4);
  t.same(restarts, [1001, 1003]);

  ac.abort();
  clock.advance(3_000);
  await watching;
});

const sortKeys = (v: unknown): unknown =>
  Array.isArray(v)
    ? v.map(sortKeys)
    : v && typeof v === "object"
      ? Object.fromEntries(
          Object.keys(v)
            .sort()
            .map((k) => [k, sortKeys((v as Record<string, unknown>)[k])]),
        )
      : v;

const PLAN = {
  adminSocket: "/s/caddy/admin.sock",
  storageDir: "/s/caddy/storage",
  acmeCa: "internal",
  httpPort: 80,
  httpsPort: 443,
  router: { proxy: "127.0.44.3:8081", ask: "http://127.0.44.3:8082/ask" },
};

t.test("apply loads the static plan once, then skips while Caddy runs it", async (t) => {
  const admin = new FakeCaddyAdmin();
  const edge = new CaddyEdge({ admin, plan: PLAN });
  const a = await edge.apply();
  t.equal(a.changed, true);
  t.equal(admin.loads.length, 1);
  t.same(admin.current, a.config);
  t.same(a.config, planCaddyConfig(PLAN), "the config loaded is the plan");

  const again = await edge.apply();
  t.equal(again.changed, false, "unchanged: skipped");
  t.same(again.config, a.config);
  t.equal(admin.attempts, 1, "the second apply loads nothing");

  // Caddy reports keys sorted (Go maps); still equal.
  admin.current = sortKeys(admin.current);
  t.equal((await edge.apply()).changed, false);
  t.equal(admin.attempts, 1);

  // A second applier with the same options (a restarted capsuled) loads nothing either.
  const other = new CaddyEdge({ admin, plan: { ...PLAN, router: { ...PLAN.router } } });
  t.equal((await other.apply()).changed, false);
  t.equal(admin.attempts, 1);

  // A restarted Caddy is back on its bootstrap config: the next apply loads the plan again.
  admin.current = renderBootstrapConfig(caddyPaths("/s"));
  const r = await edge.apply();
  t.equal(r.changed, true);
  t.equal(admin.loads.length, 2);
  t.same(admin.current, a.config);

  // Concurrent calls run one at a time: only the first loads.
  admin.current = null;
  const both = await Promise.all([edge.apply(), edge.apply()]);
  t.strictSame(
    both.map((x) => x.changed),
    [true, false],
  );
  t.equal(admin.loads.length, 3);
});

t.test("apply: a rejected load throws and the old config stays", async (t) => {
  const admin = new FakeCaddyAdmin();
  const first = await new CaddyEdge({ admin, plan: PLAN }).apply();
  // Another plan (other port) that Caddy rejects.
  const edge = new CaddyEdge({ admin, plan: { ...PLAN, httpsPort: 8443 } });
  admin.rejectWhen(() => "loading http app module: listen tcp :8443: bind: address already in use");
  await t.rejects(edge.apply(), {
    code: "CAPSULE_INVALID_CONFIG",
    message: /^caddy rejected the config: loading http app module/,
  });
  t.same(admin.current, first.config, "old config still serving");
  t.equal(admin.loads.length, 1);
  t.equal(admin.attempts, 2);

  // The queue survives a failure: once Caddy accepts, the same applier loads.
  admin.rejectWhen(undefined);
  const ok = await edge.apply();
  t.equal(ok.changed, true);
  t.same(admin.current, planCaddyConfig({ ...PLAN, httpsPort: 8443 }));

  // An invalid plan never reaches Caddy.
  const attempts = admin.attempts;
  const bad = new CaddyEdge({ admin, plan: { ...PLAN, router: { ...PLAN.router, proxy: "nope" } } });
  try {
    await bad.apply();
    t.fail("accepted");
  } catch (e) {
    t.ok(isCapsuleError(e, "CAPSULE_INVALID_ARGUMENT"));
    t.match((e as Error).message, /^router\.proxy: /);
  }
  t.equal(admin.attempts, attempts);
});
