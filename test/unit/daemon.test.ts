// The shared detached-daemon lifecycle over fakes: adopt one that answers, start one when none
// does (prepare, spawn, pid file), wait for a starting one of ours, replace a hung one, ignore a
// reused pid, report one that exits at start or stays silent, stop with TERM then KILL, and run
// calls one at a time.
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import t, { type Test } from "tap";
import { FakeClock } from "../../src/node/host/clock.js";
import { DaemonSupervisor, type DaemonSpec } from "../../src/node/host/daemon.js";
import { FakeRunner } from "../../src/node/host/runner.js";
import { FakeSpawner } from "../../src/node/host/spawner.js";

/** rig: a daemon "d" over fakes; `live` is whether it answers, `cmdline` what /proc shows for any pid. */
function rig(t: Test) {
  const dir = mkdtempSync(join(tmpdir(), "daemon-unit-"));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const state = { live: false, probes: 0, prepared: 0, cmdline: "" };
  const runner = new FakeRunner().on((argv) =>
    argv[0] === "cat" && argv[1]?.startsWith("/proc/")
      ? state.cmdline
        ? { stdout: state.cmdline }
        : { exitCode: 1 }
      : undefined,
  );
  const spawner = new FakeSpawner();
  const clock = new FakeClock(0);
  // Time moves only while the daemon sleeps between polls, so waits end at the timeout exactly.
  const tick = clock.sleep.bind(clock);
  clock.sleep = (ms) => {
    const p = tick(ms);
    clock.advance(ms);
    return p;
  };
  const conf = join(dir, "d.conf");
  const spec: DaemonSpec = {
    name: "d",
    address: join(dir, "d.sock"),
    pidFile: join(dir, "d.pid"),
    logFile: join(dir, "d.log"),
    argv: ["d", "--config", conf],
    env: { HOME: dir },
    answers: async () => {
      state.probes++;
      return state.live;
    },
    matches: (cmdline) => cmdline.includes(conf),
    prepare: async () => {
      state.prepared++;
    },
  };
  const sup = new DaemonSupervisor({ runner, spawner, clock, timeoutMs: 1_000 });
  /** ours makes pid 1000 a running "d" of ours, recorded in the pid file. */
  const ours = async () => {
    await spawner.spawnDetached(["d"], { logFile: "/dev/null" });
    writeFileSync(spec.pidFile, "1000\n");
    state.cmdline = ["d", "--config", conf, ""].join("\0");
  };
  return { dir, conf, state, runner, spawner, clock, spec, sup, ours };
}

t.test("ensure adopts one that answers, touching nothing", async (t) => {
  const r = rig(t);
  r.state.live = true;
  t.same(await r.sup.ensure(r.spec), { pid: undefined, adopted: true });
  await r.ours();
  t.same(await r.sup.ensure(r.spec), { pid: 1000, adopted: true }, "pid from the pid file");
  t.equal(r.state.prepared, 0);
  t.equal(r.spawner.calls.length, 1, "only the test's own spawn");
});

t.test("ensure starts one when none answers: prepare, spawn detached, pid file, wait", async (t) => {
  const r = rig(t);
  r.spec.answers = async () => ++r.state.probes >= 3;
  t.same(await r.sup.ensure(r.spec), { pid: 1000, adopted: false });
  t.equal(r.state.prepared, 1);
  t.same(r.spawner.lines, [`spawn HOME=${r.dir} d --config ${r.conf}`]);
  t.equal(r.spawner.calls[0]!.logFile, r.spec.logFile);
  t.equal(readFileSync(r.spec.pidFile, "utf8"), "1000\n");
  t.same(r.runner.commands, [], "nothing to kill, no pid to check");
});

t.test("ensure without env spawns with none added", async (t) => {
  const r = rig(t);
  delete r.spec.env;
  r.spec.answers = async () => r.spawner.calls.length > 0;
  await r.sup.ensure(r.spec);
  t.same(r.spawner.calls[0]!.env, {});
});

t.test("ensure: one that exits at start is CAPSULE_COMMAND_FAILED with its log's tail", async (t) => {
  const r = rig(t);
  r.spec.answers = async () => {
    if (r.spawner.calls.length) r.spawner.kill(1000);
    return false;
  };
  writeFileSync(r.spec.logFile, ["1", "2", "3", "4", "5", "6 fatal: boom", ""].join("\n"));
  await t.rejects(r.sup.ensure(r.spec), {
    code: "CAPSULE_COMMAND_FAILED",
    message: "d exited at start",
    hint: `see ${r.spec.logFile}:\n2\n3\n4\n5\n6 fatal: boom`,
    details: { pid: 1000 },
  });
  t.equal(r.clock.now(), 0, "no waiting once it died");

  const q = rig(t);
  q.spec.answers = async () => {
    if (q.spawner.calls.length) q.spawner.kill(1000);
    return false;
  };
  await t.rejects(
    q.sup.ensure(q.spec),
    { code: "CAPSULE_COMMAND_FAILED", hint: `see ${q.spec.logFile}` },
    "no log, no tail",
  );
});

t.test("ensure: one that stays silent is CAPSULE_TIMEOUT after exactly the timeout", async (t) => {
  const r = rig(t);
  await t.rejects(r.sup.ensure(r.spec), {
    code: "CAPSULE_TIMEOUT",
    message: `d (pid 1000) did not answer on ${r.spec.address} within 1000 ms`,
    hint: `see ${r.spec.logFile}`,
    details: { pid: 1000 },
  });
  t.equal(r.clock.now(), 1_000);
});

t.test("ensure waits for a starting one of ours", async (t) => {
  const r = rig(t);
  await r.ours();
  r.spec.answers = async () => ++r.state.probes >= 3;
  t.same(await r.sup.ensure(r.spec), { pid: 1000, adopted: true });
  t.equal(r.spawner.calls.length, 1, "no second daemon");
  t.equal(r.state.prepared, 0);
  t.same(r.runner.commands, ["cat /proc/1000/cmdline"]);
});

t.test("ensure kills a hung one of ours and starts another", async (t) => {
  const r = rig(t);
  await r.ours();
  r.runner.on((argv) => {
    if (argv.join(" ") === "kill -KILL 1000") r.spawner.kill(1000);
    return undefined;
  });
  r.spec.answers = async () => r.spawner.calls.length > 1;
  t.same(await r.sup.ensure(r.spec), { pid: 1001, adopted: false });
  t.same(r.runner.commands, ["cat /proc/1000/cmdline", "kill -KILL 1000"]);
  t.equal(readFileSync(r.spec.pidFile, "utf8"), "1001\n");
});

t.test("ensure: a hung one that survives SIGKILL is CAPSULE_TIMEOUT, nothing started", async (t) => {
  const r = rig(t);
  await r.ours();
  await t.rejects(r.sup.ensure(r.spec), {
    code: "CAPSULE_TIMEOUT",
    message: "d (pid 1000) survived SIGKILL",
    details: { pid: 1000 },
  });
  t.equal(r.spawner.calls.length, 1);
  t.equal(r.state.prepared, 0);
});

t.test("ourPid: a missing, garbage, dead or reused pid is not ours", async (t) => {
  const r = rig(t);
  t.equal(await r.sup.ourPid(r.spec), undefined, "no pid file");
  writeFileSync(r.spec.pidFile, "garbage\n");
  t.equal(await r.sup.ourPid(r.spec), undefined, "garbage");
  writeFileSync(r.spec.pidFile, "1000\n");
  t.equal(await r.sup.ourPid(r.spec), undefined, "dead");
  await r.spawner.spawnDetached(["sleep"], { logFile: "/dev/null" });
  r.state.cmdline = "sleep\0";
  t.equal(await r.sup.ourPid(r.spec), undefined, "someone else's process");
  r.state.cmdline = "";
  t.equal(await r.sup.ourPid(r.spec), undefined, "cmdline unreadable");
  r.state.cmdline = `d\0--config\0${r.conf}\0`;
  t.equal(await r.sup.ourPid(r.spec), 1000, "ours");

  // A reused pid is never signalled: ensure starts a new daemon beside it.
  r.state.cmdline = "sleep\0";
  r.spec.answers = async () => r.spawner.calls.length > 1;
  t.same(await r.sup.ensure(r.spec), { pid: 1001, adopted: false });
  t.notOk(
    r.runner.commands.some((c) => c.startsWith("kill")),
    "nothing killed",
  );
});

t.test("stop: SIGTERM, SIGKILL when ignored, pid file removed; idempotent", async (t) => {
  const r = rig(t);
  await r.ours();
  r.runner.on((argv) => {
    if (argv.join(" ") === "kill -KILL 1000") r.spawner.kill(1000);
    return undefined;
  });
  t.equal(await r.sup.stop(r.spec), true);
  t.same(
    r.runner.commands.filter((c) => c.startsWith("kill")),
    ["kill -TERM 1000", "kill -KILL 1000"],
  );
  t.equal(r.clock.now(), 1_000, "SIGKILL after the timeout");
  t.throws(() => readFileSync(r.spec.pidFile), "pid file removed");
  t.equal(await r.sup.stop(r.spec), false);

  const q = rig(t);
  await q.ours();
  q.runner.on((argv) => {
    if (argv[0] === "kill") q.spawner.kill(1000);
    return undefined;
  });
  t.equal(await q.sup.stop(q.spec), true);
  t.same(
    q.runner.commands.filter((c) => c.startsWith("kill")),
    ["kill -TERM 1000"],
    "SIGTERM obeyed",
  );
  t.equal(q.clock.now(), 0);

  const k = rig(t);
  await k.ours();
  await t.rejects(k.sup.stop(k.spec), {
    code: "CAPSULE_TIMEOUT",
    message: "d (pid 1000) survived SIGKILL",
  });
});

t.test("exclusive runs calls one at a time, past failures", async (t) => {
  const r = rig(t);
  const order: string[] = [];
  let release!: () => void;
  const gate = new Promise<void>((resolve) => (release = resolve));
  const a = r.sup.exclusive(async () => {
    order.push("a start");
    await gate;
    order.push("a end");
    throw new Error("a failed");
  });
  const b = r.sup.exclusive(async () => {
    order.push("b");
    return 2;
  });
  await Promise.resolve();
  t.same(order, ["a start"], "b waits for a");
  release();
  await t.rejects(a, { message: "a failed" });
  t.equal(await b, 2, "b runs after a failed");
  t.same(order, ["a start", "a end", "b"]);

  // Two ensures racing past "nothing answers" start one daemon.
  r.spec.answers = async () => r.spawner.calls.length > 0;
  const [x, y] = await Promise.all([
    r.sup.exclusive(() => r.sup.ensure(r.spec)),
    r.sup.exclusive(() => r.sup.ensure(r.spec)),
  ]);
  t.equal(r.spawner.calls.length, 1);
  t.same([x.adopted, y.adopted], [false, true]);
});
