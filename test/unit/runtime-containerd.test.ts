// The containerd supervisor over fakes: its layout under the state dir (and the socket fallback),
// its config, and ensure's decisions: adopt, start, wait for a starting one, replace a hung one,
// report one that dies at start; and stop.
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import t, { type Test } from "tap";
import type { Clock } from "../../src/node/host/clock.js";
import { FakeRunner } from "../../src/node/host/runner.js";
import { FakeSpawner } from "../../src/node/host/spawner.js";
import {
  Containerd,
  type ContainerdOptions,
  containerdPaths,
  renderContainerdConfig,
  SOCKET_PATH_MAX,
} from "../../src/node/runtime/containerd.js";

class InstantClock implements Clock {
  t = 0;
  now() {
    return this.t;
  }
  async sleep(ms: number) {
    this.t += ms;
  }
}

t.test("containerdPaths: everything under the state dir; a socket too long moves to /run", async (t) => {
  const p = containerdPaths("/var/lib/capsule");
  t.same(p, {
    dir: "/var/lib/capsule/containerd",
    config: "/var/lib/capsule/containerd/config.toml",
    root: "/var/lib/capsule/containerd/root",
    state: "/var/lib/capsule/containerd/state",
    log: "/var/lib/capsule/containerd/containerd.log",
    pidFile: "/var/lib/capsule/containerd/containerd.pid",
    fifoDir: "/var/lib/capsule/containerd/fifo",
    address: "/var/lib/capsule/containerd/containerd.sock",
    socketDir: undefined,
  });
  // The longest state dir that keeps the socket: "<dir>/containerd/containerd.sock.ttrpc" fits in 107 bytes.
  const room = SOCKET_PATH_MAX - "/containerd/containerd.sock.ttrpc".length;
  const fits = `/${"a".repeat(room - 1)}`;
  t.equal(containerdPaths(fits).socketDir, undefined, `${fits.length} characters still fit`);
  const long = `${fits}b`;
  const q = containerdPaths(long);
  t.match(q.socketDir, /^\/run\/capsule-[0-9a-f]{12}$/);
  t.equal(q.address, `${q.socketDir}/containerd.sock`);
  t.equal(q.root, `${long}/containerd/root`, "only the socket moves");
  t.equal(containerdPaths(long).address, q.address, "stable for a state dir");
  t.not(containerdPaths(`${long}c`).address, q.address, "distinct between state dirs");
});

t.test("renderContainerdConfig (golden)", async (t) => {
  t.equal(
    renderContainerdConfig(containerdPaths("/st")),
    `# Written by capsuled at each containerd start it makes; edits are lost.
version = 2
root = "/st/containerd/root"
state = "/st/containerd/state"
disabled_plugins = [
  "io.containerd.grpc.v1.cri",
  "io.containerd.internal.v1.opt",
  "io.containerd.internal.v1.restart",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
]

[grpc]
  address = "/st/containerd/containerd.sock"

[debug]
  level = "info"
`,
  );
  t.match(
    renderContainerdConfig(containerdPaths('/a "quoted" dir')),
    /root = "\/a \\"quoted\\" dir\/containerd\/root"/,
  );
});

const PLUGINS =
  "TYPE                            ID                       PLATFORMS      STATUS    \n" +
  "io.containerd.snapshotter.v1    native                   linux/amd64    ok        \n" +
  "io.containerd.snapshotter.v1    overlayfs                linux/amd64    ok        \n";
const PLUGINS_NO_OVERLAY = PLUGINS.replace(/overlayfs( +linux\/amd64 +)ok/, "overlayfs$1skip");

/** rig: a state dir and a Containerd over fakes; `live` is whether a containerd answers on the socket. */
function rig(t: Test, opts: Partial<ContainerdOptions> = {}) {
  const dir = mkdtempSync(join(tmpdir(), "ctrd-unit-"));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const p = containerdPaths(dir);
  mkdirSync(p.dir);
  const state = { live: false, plugins: PLUGINS, cmdline: "" };
  const runner = new FakeRunner();
  runner.on((argv) => {
    const c = argv.join(" ");
    if (c === `test -S ${p.address}`) return state.live ? {} : { exitCode: 1 };
    if (c === `ctr -a ${p.address} --connect-timeout 1s version`) return state.live ? {} : { exitCode: 1 };
    if (c === `ctr -a ${p.address} plugins ls`) return { stdout: state.plugins };
    if (c.startsWith("cat /proc/")) return state.cmdline ? { stdout: state.cmdline } : { exitCode: 1 };
    return undefined;
  });
  const spawner = new FakeSpawner();
  const clock = new InstantClock();
  const cd = new Containerd({ runner, spawner, clock, timeoutMs: 1_000, ...opts });
  return { dir, p, state, runner, spawner, clock, cd };
}

t.test("ensure adopts a containerd that answers, touching nothing", async (t) => {
  const r = rig(t);
  r.state.live = true;
  const s = await r.cd.ensure({ stateDir: r.dir });
  t.same(s.endpoint, { address: r.p.address, namespace: "capsule", snapshotter: "overlayfs" });
  t.equal(s.adopted, true);
  t.equal(s.pid, undefined, "no pid file: pid unknown");
  t.same(r.spawner.calls, []);
  t.same(r.runner.commands, [
    `test -S ${r.p.address}`,
    `ctr -a ${r.p.address} --connect-timeout 1s version`,
    `ctr -a ${r.p.address} plugins ls`,
  ]);
});

t.test("ensure starts containerd detached, waits for it, writes config and pid file", async (t) => {
  const r = rig(t, { namespace: "other" });
  // The socket answers on the third probe.
  let probes = 0;
  r.runner.on((argv) => {
    if (argv[0] === "test" && ++probes >= 3) r.state.live = true;
    return undefined;
  });
  r.state.plugins = PLUGINS_NO_OVERLAY;
  const s = await r.cd.ensure({ stateDir: r.dir });
  t.same(r.spawner.lines, [`spawn containerd --config ${r.p.config}`]);
  t.equal(r.spawner.calls[0]!.logFile, r.p.log);
  t.same(s, {
    endpoint: { address: r.p.address, namespace: "other", snapshotter: "native" },
    paths: r.p,
    pid: 1000,
    adopted: false,
  });
  t.equal(readFileSync(r.p.pidFile, "utf8"), "1000\n");
  t.equal(readFileSync(r.p.config, "utf8"), renderContainerdConfig(r.p));
});

t.test(
  "ensure: one that exits at start is CAPSULE_COMMAND_FAILED with its log; a silent one CAPSULE_TIMEOUT",
  async (t) => {
    const r = rig(t);
    r.runner.on((argv) => {
      if (argv[0] === "test") r.spawner.kill(1000);
      return undefined;
    });
    writeFileSync(r.p.log, 'level=fatal msg="boom"\n');
    await t.rejects(r.cd.ensure({ stateDir: r.dir }), {
      code: "CAPSULE_COMMAND_FAILED",
      message: "containerd exited at start",
      hint: /boom/,
    });
    const q = rig(t);
    await t.rejects(q.cd.ensure({ stateDir: q.dir }), { code: "CAPSULE_TIMEOUT" });
    t.ok(q.clock.now() >= 1_000, "waited the whole timeout, no longer");
  },
);

t.test("ensure waits for a starting containerd of ours, and replaces a hung one", async (t) => {
  const r = rig(t);
  writeFileSync(r.p.pidFile, "1000\n");
  await r.spawner.spawnDetached(["containerd"], { logFile: "/dev/null" }); // pid 1000 alive
  r.state.cmdline = `containerd\0--config\0${r.p.config}\0`;
  let probes = 0;
  r.runner.on((argv) => {
    if (argv[0] === "test" && ++probes >= 2) r.state.live = true;
    return undefined;
  });
  const s = await r.cd.ensure({ stateDir: r.dir });
  t.match(s, { adopted: true, pid: 1000 });
  t.equal(r.spawner.calls.length, 1, "no second containerd");

  const h = rig(t);
  writeFileSync(h.p.pidFile, "1000\n");
  await h.spawner.spawnDetached(["containerd"], { logFile: "/dev/null" });
  h.state.cmdline = `containerd\0--config\0${h.p.config}\0`;
  let spawned = false;
  h.runner.on((argv) => {
    if (argv.join(" ") === "kill -KILL 1000") h.spawner.kill(1000);
    if (argv[0] === "test" && spawned) h.state.live = true;
    return undefined;
  });
  const orig = h.spawner.spawnDetached.bind(h.spawner);
  h.spawner.spawnDetached = async (argv, o) => {
    spawned = true;
    return orig(argv, o);
  };
  const s2 = await h.cd.ensure({ stateDir: h.dir });
  t.ok(h.runner.commands.includes("kill -KILL 1000"), "the hung one is killed");
  t.match(s2, { adopted: false, pid: 1001 });
});

t.test("concurrent ensures start one containerd", async (t) => {
  const r = rig(t);
  r.runner.on((argv) => {
    if (argv[0] === "test" && r.spawner.calls.length > 0) r.state.live = true;
    return undefined;
  });
  const [a, b] = await Promise.all([r.cd.ensure({ stateDir: r.dir }), r.cd.ensure({ stateDir: r.dir })]);
  t.equal(r.spawner.calls.length, 1);
  t.equal(a.adopted, false);
  t.equal(b.adopted, true);
});

t.test("a pid file naming someone else's process is ignored", async (t) => {
  const r = rig(t);
  writeFileSync(r.p.pidFile, "1000\n");
  await r.spawner.spawnDetached(["sleep"], { logFile: "/dev/null" });
  r.state.cmdline = "sleep\0";
  r.runner.on((argv) => {
    if (argv[0] === "test" && r.spawner.calls.length > 1) r.state.live = true;
    return undefined;
  });
  const s = await r.cd.ensure({ stateDir: r.dir });
  t.match(s, { adopted: false, pid: 1001 });
  t.notOk(
    r.runner.commands.some((c) => c.startsWith("kill")),
    "nothing killed",
  );
});

t.test("stop: SIGTERM, SIGKILL when ignored; idempotent", async (t) => {
  const r = rig(t);
  writeFileSync(r.p.pidFile, "1000\n");
  await r.spawner.spawnDetached(["containerd"], { logFile: "/dev/null" });
  r.state.cmdline = `containerd\0--config\0${r.p.config}\0`;
  r.runner.on((argv) => {
    if (argv.join(" ") === "kill -KILL 1000") r.spawner.kill(1000);
    return undefined;
  });
  t.equal(await r.cd.stop({ stateDir: r.dir }), true);
  t.same(
    r.runner.commands.filter((c) => c.startsWith("kill")),
    ["kill -TERM 1000", "kill -KILL 1000"],
  );
  t.equal(await r.cd.stop({ stateDir: r.dir }), false);
  t.equal(await r.cd.healthy(r.dir), false);
});
