// MicroVms without QEMU: the pure helpers (spec hash, guest MAC, TCG command line, the QEMU
// spec), then the runtime over a fake spawner, a fake /proc tree, FakeQmp and FakeGuestAgent:
// create, adopt after a restart, a changed spec, a QEMU that dies at start, a start timeout,
// list, a recycled pid, the three ways to stop, remove, exec, and the serial console log.
import { rmSync } from "node:fs";
import { mkdir, mkdtemp, readdir, readFile, rm, writeFile, appendFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import t, { type Test } from "tap";
import { FakeClock } from "../../src/node/host/clock.js";
import { FakeSpawner, type SpawnOptions } from "../../src/node/host/spawner.js";
import { FakeGuestAgent } from "../../src/node/runtime/guest-agent.js";
import { GATEWAY, HOST_MAC, workloadNetNames } from "../../src/node/runtime/netns.js";
import type { AccelChoice } from "../../src/node/runtime/qemu-accel.js";
import { FakeQmp } from "../../src/node/runtime/qmp.js";
import {
  agentSession,
  BASE_CMDLINE,
  guestMac,
  lastLine,
  MicroVms,
  type MicroVmSpec,
  parseCpuMhz,
  TCG_CMDLINE,
  tcgCmdline,
  vmQemuSpec,
  vmSpecHash,
} from "../../src/node/runtime/vms.js";

const vmSpec = (over: Partial<MicroVmSpec> = {}): MicroVmSpec => ({
  workload: "web",
  generation: 1,
  kernel: "/var/lib/capsule/kernels/vmlinuz",
  initrd: "/var/lib/capsule/kernels/initrd.img",
  cpus: 1,
  memoryMib: 256,
  address: "100.64.7.2",
  volumes: [{ name: "data", path: "/dev/vol/data", mountPath: "/data" }],
  ...over,
});

const KVM: AccelChoice = { accel: "kvm", cpu: "host", reason: "kvm works" };
const TCG: AccelChoice = { accel: "tcg", cpu: "max", reason: "no /dev/kvm" };
const NONE: AccelChoice = { accel: "none", cpu: undefined, reason: "no qemu" };
const PATHS = { qmp: "/s/x.qmp", ga: "/s/x.ga", console: "/d/console.log" };

// ---- pure helpers ----------------------------------------------------------------------

t.test("vmSpecHash: stable, key order does not matter, every field counts", async (t) => {
  const a = vmSpec();
  t.match(vmSpecHash(a), /^[0-9a-f]{32}$/);
  t.equal(vmSpecHash(a), vmSpecHash(vmSpec()), "same spec, same hash");
  const reversed = Object.fromEntries(Object.entries(a).reverse()) as unknown as MicroVmSpec;
  t.equal(vmSpecHash(reversed), vmSpecHash(a), "key order ignored");
  t.not(vmSpecHash(vmSpec({ memoryMib: 512 })), vmSpecHash(a));
  t.not(vmSpecHash(vmSpec({ cmdline: "debug" })), vmSpecHash(a));
  t.not(vmSpecHash(vmSpec({ generation: 2 })), vmSpecHash(a));
  t.not(vmSpecHash(vmSpec({ volumes: [] })), vmSpecHash(a));
  t.equal(
    vmSpecHash(vmSpec({ cmdline: undefined })),
    vmSpecHash(a),
    "an undefined member is the same as an absent one",
  );
});

t.test("guestMac: locally administered unicast, stable per name, differs between names", async (t) => {
  for (const name of ["web", "api", "db-1", "x"]) {
    const mac = guestMac(name);
    t.match(mac, /^([0-9a-f]{2}:){5}[0-9a-f]{2}$/, `${name}: six lowercase octets`);
    const first = parseInt(mac.slice(0, 2), 16);
    t.equal(first & 0b10, 0b10, `${name}: locally administered bit set`);
    t.equal(first & 0b01, 0, `${name}: unicast`);
    t.equal(guestMac(name), mac, `${name}: stable`);
  }
  t.not(guestMac("web"), guestMac("api"));
  t.not(guestMac("web"), guestMac("web2"));
  t.not(guestMac("web"), HOST_MAC, "never the host side's MAC");
});

t.test("tcgCmdline and parseCpuMhz", async (t) => {
  t.equal(tcgCmdline(undefined), TCG_CMDLINE);
  t.equal(tcgCmdline(0), TCG_CMDLINE, "zero: unknown rate");
  t.equal(tcgCmdline(-5), TCG_CMDLINE);
  t.equal(tcgCmdline(2_400_000), `${TCG_CMDLINE} tsc_early_khz=2400000`);
  t.equal(tcgCmdline(2_399_999.6), `${TCG_CMDLINE} tsc_early_khz=2400000`, "rounded");

  const cpuinfo = [
    "processor\t: 0",
    "model name\t: Intel(R) Xeon(R)",
    "cpu MHz\t\t: 2399.998",
    "cache size\t: 16384 KB",
    "",
    "processor\t: 1",
    "cpu MHz\t\t: 1200.000",
  ].join("\n");
  t.equal(parseCpuMhz(cpuinfo), 2_399_998, "the first cpu MHz, in kHz");
  t.equal(parseCpuMhz("cpu MHz : 3000\n"), 3_000_000);
  t.equal(parseCpuMhz("processor : 0\nBogoMIPS : 50.00\n"), undefined, "arm64: none");
  t.equal(parseCpuMhz(""), undefined);
  t.equal(parseCpuMhz("cpu MHz : 0.000\n"), undefined, "zero is not a rate");
  t.equal(parseCpuMhz("xcpu MHz : 100\n"), undefined, "anchored at a line start");
});

t.test("vmQemuSpec: accelerators, network, volumes, command line", async (t) => {
  const opts = { sandbox: true, hostTscKhz: 2_400_000 };
  const kvm = vmQemuSpec(vmSpec({ cmdline: "loglevel=7" }), KVM, PATHS, opts);
  t.match(kvm, {
    name: "web",
    accel: "kvm",
    cpu: "host",
    cpus: 1,
    memoryMib: 256,
    kernel: "/var/lib/capsule/kernels/vmlinuz",
    initrd: "/var/lib/capsule/kernels/initrd.img",
    tap: workloadNetNames("web").hostIface,
    mac: guestMac("web"),
    address: "100.64.7.2",
    gateway: "169.254.1.1",
    gatewayMac: "ee:ee:ee:ee:ee:ee",
    qmpSocket: "/s/x.qmp",
    gaSocket: "/s/x.ga",
    serialLog: "/d/console.log",
    sandbox: true,
  });
  t.equal(kvm.gateway, GATEWAY);
  t.equal(kvm.gatewayMac, HOST_MAC);
  t.same(kvm.volumes, [{ name: "data", path: "/dev/vol/data", mountPath: "/data" }], "mountPath carried");
  t.equal(kvm.cmdline, `${BASE_CMDLINE} loglevel=7`, "kvm: no TSC keys");
  t.notMatch(kvm.cmdline ?? "", /tsc/);
  t.notOk("runAs" in kvm, "no runAs unless asked");

  const tcg = vmQemuSpec(vmSpec(), TCG, PATHS, opts);
  t.equal(tcg.accel, "tcg");
  t.equal(tcg.cpu, "max");
  t.equal(tcg.cmdline, `${BASE_CMDLINE} ${TCG_CMDLINE} tsc_early_khz=2400000`);
  t.equal(
    vmQemuSpec(vmSpec({ cmdline: "init=/bin/sh" }), TCG, PATHS, { sandbox: false }).cmdline,
    `${BASE_CMDLINE} ${TCG_CMDLINE} init=/bin/sh`,
    "tcg without a known rate: no tsc_early_khz; the user's cmdline last",
  );

  const bare = vmQemuSpec(vmSpec({ initrd: undefined, volumes: [] }), KVM, PATHS, {
    sandbox: false,
    runAs: { user: "nobody" },
  });
  t.notOk("initrd" in bare, "no initrd key when none");
  t.same(bare.volumes, []);
  t.equal(bare.sandbox, false);
  t.same(bare.runAs, { user: "nobody" });
  t.equal(
    vmQemuSpec(vmSpec(), { accel: "kvm", cpu: undefined, reason: "" }, PATHS, opts).cpu,
    undefined,
    "no cpu model: none given",
  );

  t.throws(() => vmQemuSpec(vmSpec(), NONE, PATHS, opts), {
    code: "CAPSULE_FAILED_PRECONDITION",
    message: /no usable accelerator/,
    hint: /./,
  });
});

t.test("paths: sockets under the data dir, or under /run when the data dir is too deep", async (t) => {
  const mk = (dataDir: string) =>
    new MicroVms({
      clock: new FakeClock(),
      spawner: new FakeSpawner(),
      dataDir,
      accel: async () => ({ accel: "tcg", cpu: "max", reason: "" }),
    });
  const short = mk("/var/lib/capsule/vms").paths("web.1");
  t.match(short.qmp, /^\/var\/lib\/capsule\/vms\/sock\/[0-9a-f]{12}\.qmp$/);
  t.match(short.ga, /^\/var\/lib\/capsule\/vms\/sock\/[0-9a-f]{12}\.ga$/);
  const deep = `/${"d".repeat(100)}/vms`;
  const long = mk(deep).paths("web.1");
  t.match(long.qmp, /^\/run\/capsule-[0-9a-f]{12}\/vms\/[0-9a-f]{12}\.qmp$/);
  t.ok(Buffer.byteLength(long.ga) <= 107, "fits a socket address");
  t.equal(mk(deep).paths("web.1").qmp, long.qmp, "stable for a data dir");
  t.equal(long.console, join(deep, "web.1", "console.log"), "files stay under the data dir");
});

t.test("lastLine", async (t) => {
  t.equal(lastLine(""), "");
  t.equal(lastLine("\n\n  \n"), "");
  t.equal(lastLine("one"), "one");
  t.equal(lastLine("a\nqemu: could not open /dev/net/tun\n\n  \n"), "qemu: could not open /dev/net/tun");
  t.equal(lastLine("  padded  \n"), "padded");
});

// ---- MicroVms over fakes -----------------------------------------------------------------

/**
 * ProcSpawner is a FakeSpawner that also draws each spawned process into a fake /proc tree
 * (`stat` and a NUL-separated `cmdline`), and can make the next spawn die at once with a
 * line on its log, as a QEMU that fails to start does.
 */
class ProcSpawner extends FakeSpawner {
  dieWith: string | undefined;
  constructor(private readonly procRoot: string) {
    super();
  }

  override async spawnDetached(argv: readonly string[], opts: SpawnOptions): Promise<number> {
    const pid = await super.spawnDetached(argv, opts);
    await mkdir(join(this.procRoot, String(pid)), { recursive: true });
    await writeFile(join(this.procRoot, String(pid), "stat"), `${pid} (qemu-system-x86) S 1 ${pid} ${pid} 0`);
    await writeFile(join(this.procRoot, String(pid), "cmdline"), `${argv.join("\0")}\0`);
    if (this.dieWith !== undefined) {
      await appendFile(opts.logFile, this.dieWith);
      this.dieWith = undefined;
      this.exit(pid);
    }
    return pid;
  }

  /** exit ends process `pid` at once (synchronously: no fake time passes): dead for isAlive, gone from /proc. */
  exit(pid: number): void {
    this.kill(pid);
    rmSync(join(this.procRoot, String(pid)), { recursive: true, force: true });
  }
}

interface World {
  dir: string;
  dataDir: string;
  procRoot: string;
  clock: PollClock;
  spawner: ProcSpawner;
  agent: FakeGuestAgent;
  agentSockets: string[];
  qmps: FakeQmp[];
  qmpSockets: string[];
  /** qmpUp: false = connecting to QMP fails (QEMU not listening). */
  qmpUp: boolean;
  /** onQuit runs when QMP `quit` is executed. */
  onQuit: ((pid: number) => void) | undefined;
  kills: string[];
  accel: AccelChoice;
  vms: (over?: Partial<ConstructorParameters<typeof MicroVms>[0]>) => MicroVms;
  lastPid: () => number;
}

async function world(t: Test): Promise<World> {
  const dir = await mkdtemp(join(tmpdir(), "capsule-vms-"));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  const procRoot = join(dir, "proc");
  await mkdir(procRoot, { recursive: true });
  await writeFile(join(procRoot, "cpuinfo"), "processor\t: 0\ncpu MHz\t\t: 2400.000\n");
  const w: World = {
    dir,
    dataDir: join(dir, "vms"),
    procRoot,
    clock: new PollClock(),
    spawner: new ProcSpawner(procRoot),
    agent: new FakeGuestAgent(),
    agentSockets: [],
    qmps: [],
    qmpSockets: [],
    qmpUp: true,
    onQuit: undefined,
    kills: [],
    accel: TCG,
    lastPid: () => w.spawner.calls.at(-1)!.pid,
    vms: (over = {}) =>
      new MicroVms({
        clock: w.clock,
        spawner: w.spawner,
        dataDir: w.dataDir,
        accel: async () => w.accel,
        procRoot,
        agent: (socket) => {
          w.agentSockets.push(socket);
          return w.agent;
        },
        qmp: async (socket) => {
          w.qmpSockets.push(socket);
          if (!w.qmpUp) throw new Error("ECONNREFUSED");
          const q = new FakeQmp().on("query-status", { status: "running", running: true });
          q.on("quit", async () => {
            w.onQuit?.(w.lastPid());
            return {};
          });
          w.qmps.push(q);
          return q;
        },
        kill: (pid, sig) => {
          w.kills.push(`${sig} ${pid}`);
          if (sig === "SIGKILL") w.spawner.exit(pid);
        },
        ...over,
      }),
  };
  return w;
}

/**
 * PollClock is a FakeClock that knows how many sleeps are pending, so {@link drive} moves time
 * only while the code under test waits on the clock, never while it waits on real file I/O.
 */
class PollClock extends FakeClock {
  pending = 0;
  override sleep(ms: number): Promise<void> {
    this.pending++;
    return super.sleep(ms).then(() => {
      this.pending--;
    });
  }
}

/** drive advances the clock in 100 ms steps while `p` is pending and something sleeps on the clock. */
async function drive<T>(clock: PollClock, p: Promise<T>, realMs = 10_000): Promise<T> {
  let done = false;
  const settled = p.then(
    (v) => {
      done = true;
      return v;
    },
    (e: unknown) => {
      done = true;
      throw e;
    },
  );
  settled.catch(() => undefined); // the caller handles it; not an unhandled rejection meanwhile
  const until = Date.now() + realMs;
  while (!done && Date.now() < until) {
    await new Promise((r) => setImmediate(r));
    if (!done && clock.pending > 0) clock.advance(100);
  }
  return settled;
}

t.test("run creates a VM: spec.json, the QEMU command line, QMP asked", async (t) => {
  const w = await world(t);
  const vms = w.vms();
  const r = await vms.run(vmSpec());
  t.same(r, { id: "web.1", action: "created", pid: 1000 });
  t.equal(w.spawner.calls.length, 1);
  const call = w.spawner.calls[0]!;
  const p = vms.paths("web.1");
  t.equal(call.logFile, p.log, "QEMU's stderr goes to qemu.log");
  const argv = call.argv.join(" ");
  t.ok(call.argv.includes("-kernel"), "-kernel");
  t.equal(call.argv[call.argv.indexOf("-kernel") + 1], "/var/lib/capsule/kernels/vmlinuz");
  t.match(argv, p.qmp, "the QMP socket");
  t.match(argv, p.ga, "the guest agent socket");
  t.match(argv, p.console, "the serial console file");
  t.match(argv, "tsc_early_khz=2400000", "TCG: the host TSC rate from <procRoot>/cpuinfo");
  t.match(argv, `ifname=${workloadNetNames("web").hostIface}`, "the workload's TAP");
  t.match(argv, "capsule.vol=data:/data");
  t.match(argv, `capsule.mac=${guestMac("web")}`);
  t.ok(p.qmp.length < 108, "socket path fits sun_path");

  const file = JSON.parse(await readFile(p.spec, "utf8")) as { id: string; hash: string; spec: MicroVmSpec };
  t.same(file, { id: "web.1", hash: vmSpecHash(vmSpec()), spec: vmSpec() });
  t.equal((await readFile(p.pid, "utf8")).trim(), "1000");
  t.same(w.qmps[0]!.commands, ["query-status"], "start waits for QMP to answer");
  t.ok(w.qmps[0]!.isClosed, "QMP connection closed after the check");
  t.same(await vms.status("web.1"), { id: "web.1", state: "running", pid: 1000 });
  t.equal(await vms.has("web.1"), true);
  t.equal(await vms.has("web.2"), false);
});

t.test("kvm: no TSC keys; hostTscKhz overrides /proc/cpuinfo", async (t) => {
  const w = await world(t);
  w.accel = KVM;
  await w.vms().run(vmSpec());
  t.notMatch(w.spawner.calls[0]!.argv.join(" "), /tsc/);
  w.accel = TCG;
  await w.vms({ hostTscKhz: 3_100_000 }).run(vmSpec({ workload: "api" }));
  t.match(w.spawner.calls[1]!.argv.join(" "), "tsc_early_khz=3100000");
  await rm(join(w.procRoot, "cpuinfo"));
  await w.vms().run(vmSpec({ workload: "db" }));
  const last = w.spawner.calls[2]!.argv.join(" ");
  t.match(last, TCG_CMDLINE, "no cpuinfo: TCG keys still there");
  t.notMatch(last, /tsc_early_khz/, "no cpuinfo: no rate");
});

t.test("accel none: run refuses before spawning", async (t) => {
  const w = await world(t);
  w.accel = NONE;
  await t.rejects(w.vms().run(vmSpec()), { code: "CAPSULE_FAILED_PRECONDITION" });
  t.equal(w.spawner.calls.length, 0);
});

t.test("run again while alive: running, nothing spawned; a new MicroVms adopts it", async (t) => {
  const w = await world(t);
  const vms = w.vms();
  await vms.run(vmSpec());
  t.same(await vms.run(vmSpec()), { id: "web.1", action: "running", pid: 1000 });
  // capsuled restarted: a new instance over the same directory.
  const again = w.vms();
  t.same(await again.run(vmSpec()), { id: "web.1", action: "running", pid: 1000 });
  t.same(await again.status("web.1"), { id: "web.1", state: "running", pid: 1000 });
  t.match(await again.list(), [{ id: "web.1", state: "running", pid: 1000 }]);
  t.equal(w.spawner.calls.length, 1, "never a second QEMU");

  w.spawner.exit(1000);
  const r = await again.run(vmSpec());
  t.same(r, { id: "web.1", action: "started", pid: 1001 }, "dead: booted again");
  t.equal(w.spawner.calls.length, 2);
});

t.test("run with another spec under the same generation: CAPSULE_INTERNAL", async (t) => {
  const w = await world(t);
  const vms = w.vms();
  await vms.run(vmSpec());
  await t.rejects(vms.run(vmSpec({ memoryMib: 512 })), {
    code: "CAPSULE_INTERNAL",
    message: /web\.1 exists with another spec/,
    hint: /new generation/,
  });
  w.spawner.exit(1000);
  await t.rejects(vms.run(vmSpec({ memoryMib: 512 })), { code: "CAPSULE_INTERNAL" }, "stopped or not");
  t.equal(w.spawner.calls.length, 1);
  t.match(await vms.run(vmSpec({ generation: 2, memoryMib: 512 })), { id: "web.2", action: "created" });
});

t.test("a QEMU that dies at start: CAPSULE_COMMAND_FAILED with its last stderr line", async (t) => {
  const w = await world(t);
  const vms = w.vms();
  w.spawner.dieWith = "qemu-system-x86_64: warning: foo\nqemu-system-x86_64: could not open /dev/net/tun\n\n";
  await t.rejects(vms.run(vmSpec()), {
    code: "CAPSULE_COMMAND_FAILED",
    message: "microVM web.1 did not start: qemu-system-x86_64: could not open /dev/net/tun",
    hint: /qemu\.log/,
  });
  t.equal(w.qmpSockets.length, 0, "no QMP tried for a dead process");
  t.same(await vms.status("web.1"), { id: "web.1", state: "stopped" });

  w.spawner.dieWith = "";
  await t.rejects(vms.run(vmSpec()), { message: /did not start: QEMU exited/ }, "silent death");
  t.match(await vms.run(vmSpec()), { action: "started", pid: 1002 }, "then a good start");
  t.equal(await readFile(vms.paths("web.1").log, "utf8"), "", "qemu.log emptied at each start");
});

t.test("start timeout: QMP never answers, QEMU is SIGKILLed, CAPSULE_TIMEOUT", async (t) => {
  const w = await world(t);
  w.qmpUp = false;
  const vms = w.vms({ startTimeoutMs: 2_000 });
  const start = w.clock.now();
  await t.rejects(drive(w.clock, vms.run(vmSpec())), {
    code: "CAPSULE_TIMEOUT",
    message: /QMP did not answer within 2000 ms/,
  });
  t.ok(w.clock.now() - start >= 2_000, "waited the whole timeout");
  t.ok(w.clock.now() - start < 5_000, "and not much more");
  t.ok(w.qmpSockets.length > 5, "QMP polled");
  t.same(w.kills, ["SIGKILL 1000"]);
  t.same(await vms.status("web.1"), { id: "web.1", state: "stopped" });
});

t.test("list: running and stopped, ignores junk; a recycled pid or a zombie is stopped", async (t) => {
  const w = await world(t);
  const vms = w.vms();
  t.same(await vms.list(), [], "no data dir yet");
  await vms.run(vmSpec({ workload: "web" }));
  await vms.run(vmSpec({ workload: "api", generation: 3 }));
  await vms.run(vmSpec({ workload: "db" }));
  w.spawner.exit(1000); // web stopped
  // Junk: a directory that is not an id, an id without spec.json, a stray file.
  await mkdir(join(w.dataDir, "not-an-id"), { recursive: true });
  await mkdir(join(w.dataDir, "zzz.1"), { recursive: true });
  await mkdir(join(w.dataDir, "Upper.1"), { recursive: true });
  await writeFile(join(w.dataDir, "stray.txt"), "x");
  t.same(await vms.list(), [
    {
      id: "api.3",
      workload: "api",
      generation: 3,
      image: "/var/lib/capsule/kernels/vmlinuz",
      state: "running",
      pid: 1001,
    },
    {
      id: "db.1",
      workload: "db",
      generation: 1,
      image: "/var/lib/capsule/kernels/vmlinuz",
      state: "running",
      pid: 1002,
    },
    {
      id: "web.1",
      workload: "web",
      generation: 1,
      image: "/var/lib/capsule/kernels/vmlinuz",
      state: "stopped",
    },
  ]);
  t.equal(await vms.has("zzz.1"), false);

  // api's pid now belongs to another program: its cmdline does not name api's QMP socket.
  await writeFile(join(w.procRoot, "1001", "cmdline"), "sleep\0infinity\0");
  // db's QEMU is a zombie (and its comm has a parenthesis and a space in it).
  await writeFile(join(w.procRoot, "1002", "stat"), "1002 (qemu) x) Z 1 1002 1002 0");
  t.same(await vms.livePid("api.3"), undefined);
  t.same(await vms.livePid("db.1"), undefined);
  t.match(await vms.list(), [
    { id: "api.3", state: "stopped" },
    { id: "db.1", state: "stopped" },
    { id: "web.1", state: "stopped" },
  ]);
  t.same(await vms.status("api.3"), { id: "api.3", state: "stopped" });
  // A garbage pid file is not a pid.
  await writeFile(vms.paths("db.1").pid, "nonsense\n");
  t.equal(await vms.livePid("db.1"), undefined);
  // A recycled api: run boots a new QEMU rather than adopting the stranger.
  t.match(await vms.run(vmSpec({ workload: "api", generation: 3 })), { action: "started", pid: 1003 });
  t.same(await readdir(join(w.dataDir)).then((n) => n.includes("sock")), true);
  await t.rejects(vms.status("nope.1"), { code: "CAPSULE_NOT_FOUND" });
});

t.test("stop: the guest agent shuts down, QEMU exits: exit 0", async (t) => {
  const w = await world(t);
  const vms = w.vms();
  await vms.run(vmSpec());
  const agent = w.agent;
  const shutdown = agent.shutdown.bind(agent);
  agent.shutdown = async (mode) => {
    await shutdown(mode);
    w.spawner.exit(1000);
  };
  const r = await drive(w.clock, vms.stop("web.1"));
  t.same(r, { stopped: true, killed: false, exitCode: 0 });
  t.same(agent.calls, ["shutdown powerdown"]);
  t.same(w.agentSockets, [vms.paths("web.1").ga], "the VM's agent socket");
  t.same(
    w.qmps.flatMap((q) => q.commands),
    ["query-status"],
    "no QMP quit",
  );
  t.same(w.kills, []);
  const exit = JSON.parse(await readFile(vms.paths("web.1").exit, "utf8")) as Record<string, unknown>;
  t.match(exit, {
    exitCode: 0,
    reason: "stopped (guest shutdown)",
    at: /^2026-01-01T00:00:\d\d\.\d00Z$/,
  });
  t.same(await vms.status("web.1"), { id: "web.1", state: "stopped", exitCode: 0 });
  t.same(await vms.stop("web.1"), { stopped: false, killed: false }, "idempotent");
  await t.rejects(vms.stop("nope.1"), { code: "CAPSULE_NOT_FOUND" });

  // A boot clears the last exit record.
  await vms.run(vmSpec());
  t.same(await vms.status("web.1"), { id: "web.1", state: "running", pid: 1001 });
});

t.test("stop: no guest agent, QMP quit ends QEMU: exit 0", async (t) => {
  const w = await world(t);
  const vms = w.vms();
  await vms.run(vmSpec());
  w.agent.down = true;
  w.onQuit = (pid) => w.spawner.exit(pid);
  const r = await drive(w.clock, vms.stop("web.1", { timeoutMs: 1_000 }));
  t.same(r, { stopped: true, killed: false, exitCode: 0 });
  t.same(w.agent.calls, ["shutdown powerdown"]);
  t.same(w.qmps.at(-1)!.commands, ["quit"], "QMP quit sent");
  t.ok(w.qmps.at(-1)!.isClosed);
  t.same(w.kills, []);
  t.match(JSON.parse(await readFile(vms.paths("web.1").exit, "utf8")), {
    exitCode: 0,
    reason: "stopped (QMP quit)",
  });
  t.same(await vms.status("web.1"), { id: "web.1", state: "stopped", exitCode: 0 });
});

t.test("stop: an agent that never answers is given up after its timeout", async (t) => {
  const w = await world(t);
  const vms = w.vms();
  await vms.run(vmSpec());
  w.agent.shutdown = () => new Promise<void>(() => undefined);
  w.onQuit = (pid) => w.spawner.exit(pid);
  const r = await drive(w.clock, vms.stop("web.1", { timeoutMs: 500 }));
  t.same(r, { stopped: true, killed: false, exitCode: 0 });
  t.same(w.qmps.at(-1)!.commands, ["quit"]);
});

t.test("stop: neither agent nor QMP: SIGKILL, exit 137", async (t) => {
  const w = await world(t);
  const vms = w.vms();
  await vms.run(vmSpec());
  w.agent.down = true;
  w.qmpUp = false;
  const r = await drive(w.clock, vms.stop("web.1", { timeoutMs: 500 }));
  t.same(r, { stopped: true, killed: true, exitCode: 137 });
  t.same(w.kills, ["SIGKILL 1000"]);
  t.match(JSON.parse(await readFile(vms.paths("web.1").exit, "utf8")), {
    exitCode: 137,
    reason: "stopped (SIGKILL)",
  });
  t.same(await vms.status("web.1"), { id: "web.1", state: "stopped", exitCode: 137 });

  // QMP answers but quit does nothing: still SIGKILL.
  w.qmpUp = true;
  await vms.run(vmSpec());
  const r2 = await drive(w.clock, vms.stop("web.1", { timeoutMs: 500 }));
  t.same(r2, { stopped: true, killed: true, exitCode: 137 });
  t.same(w.qmps.at(-1)!.commands, ["quit"]);
  t.same(w.kills, ["SIGKILL 1000", "SIGKILL 1001"]);
});

t.test("restart: stop then boot with the saved spec", async (t) => {
  const w = await world(t);
  const vms = w.vms();
  await vms.run(vmSpec());
  w.agent.shutdown = async () => {
    w.spawner.exit(w.lastPid());
  };
  const r = await drive(w.clock, vms.restart("web.1"));
  t.same(r, { stopped: true, killed: false, exitCode: 0 });
  t.equal(w.spawner.calls.length, 2);
  t.same(w.spawner.calls[1]!.argv, w.spawner.calls[0]!.argv, "same command line");
  t.same(await vms.status("web.1"), { id: "web.1", state: "running", pid: 1001 });
  await t.rejects(vms.restart("nope.1"), { code: "CAPSULE_NOT_FOUND" });
});

t.test("remove: stops, deletes the directory; false the second time", async (t) => {
  const w = await world(t);
  const vms = w.vms();
  await vms.run(vmSpec());
  w.agent.shutdown = async () => {
    w.spawner.exit(1000);
  };
  t.equal(await drive(w.clock, vms.remove("web.1")), true);
  t.same(w.agent.calls, [], "the shutdown stub records nothing: replaced");
  t.equal(w.spawner.calls.length, 1);
  t.notOk((await readdir(w.dataDir)).includes("web.1"), "directory gone");
  t.equal(await vms.has("web.1"), false);
  t.same(await vms.list(), []);
  t.equal(await vms.remove("web.1"), false, "second time: false");
  await t.rejects(vms.status("web.1"), { code: "CAPSULE_NOT_FOUND" });

  // keepLogs: the console log stays, the VM is gone.
  await vms.run(vmSpec({ generation: 2 }));
  const p = vms.paths("web.2");
  await writeFile(p.console, "booted\n");
  w.spawner.exit(1001);
  t.equal(await vms.remove("web.2", { keepLogs: true }), true);
  t.equal(await readFile(p.console, "utf8"), "booted\n");
  t.equal(await vms.has("web.2"), false);
  t.same(await vms.list(), []);
});

t.test("exec goes through the guest agent; refused when not running", async (t) => {
  const w = await world(t);
  const vms = w.vms();
  await t.rejects(vms.exec("web.1", ["true"]), { code: "CAPSULE_NOT_FOUND" });
  await vms.run(vmSpec());
  w.agent.onExec((argv) => (argv[0] === "false" ? { exitCode: 1, stderr: "no\n" } : undefined));
  w.agent.onExec((argv, o) =>
    argv[0] === "cat" ? { stdout: Buffer.from(o.input ?? "").toString("utf8") } : undefined,
  );
  t.same(await vms.exec("web.1", ["cat"], { input: "hello" }), { exitCode: 0, stdout: "hello", stderr: "" });
  t.same(
    await vms.exec("web.1", ["false"]),
    { exitCode: 1, stdout: "", stderr: "no\n" },
    "non-zero is a result",
  );
  t.same(w.agent.calls, ["exec cat <<<hello", "exec false"]);
  t.ok(w.agentSockets.every((s) => s === vms.paths("web.1").ga));

  w.spawner.exit(1000);
  await t.rejects(vms.exec("web.1", ["true"]), {
    code: "CAPSULE_FAILED_PRECONDITION",
    message: /web\.1 is not running/,
  });
  await t.rejects(vms.execStream("web.1", ["sh"]), { code: "CAPSULE_FAILED_PRECONDITION" });
  t.equal(w.agent.calls.length, 2, "nothing reached the agent");
});

t.test("execStream: a terminal is unsupported; a session runs through the agent", async (t) => {
  const w = await world(t);
  const vms = w.vms();
  await vms.run(vmSpec());
  await t.rejects(vms.execStream("web.1", ["sh"], { tty: true }), {
    code: "CAPSULE_UNSUPPORTED",
    hint: /without -t/,
  });
  w.agent.onExec((argv) => ({ stdout: `ran ${argv.join(" ")}\n` }));
  const s = await vms.execStream("web.1", ["echo", "hi"]);
  const out: string[] = [];
  for await (const c of s.output) out.push(`${c.stream}:${c.data.toString("utf8")}`);
  t.same(out, ["stdout:ran echo hi\n"]);
  t.equal(await s.exit, 0);
  t.same(w.agent.calls, ["exec echo hi"]);
});

const flush = () => new Promise((r) => setImmediate(r));

t.test("agentSession: stdin collected until closed, then one exec", async (t) => {
  const agent = new FakeGuestAgent().onExec((_argv, o) => ({
    exitCode: 3,
    stdout: `got ${Buffer.from(o.input ?? "").toString("utf8")}`,
    stderr: "warn",
  }));
  const s = agentSession(agent, ["cat"], true);
  t.match(s.execId, /^ga-[0-9a-f]{12}$/);
  await s.write(Buffer.from("ab"));
  await s.write(Buffer.from("cd"));
  await s.resize({ rows: 10, cols: 10 });
  await flush();
  t.same(agent.calls, [], "nothing runs while stdin is open");
  const closing = s.closeStdin();
  await s.write(Buffer.from("late")); // in the same tick as the close: still too late
  await closing;
  await s.closeStdin();
  const out: string[] = [];
  for await (const c of s.output) out.push(`${c.stream}:${c.data.toString("utf8")}`);
  t.same(out, ["stdout:got abcd", "stderr:warn"], "stdout, then stderr");
  t.equal(await s.exit, 3);
  t.same(agent.calls, ["exec cat <<<abcd"], "one exec, with the input, writes after close dropped");
});

t.test("agentSession: without stdin it runs at once; empty output yields nothing", async (t) => {
  const agent = new FakeGuestAgent();
  const s = agentSession(agent, ["true"], false);
  await flush();
  t.same(agent.calls, ["exec true"], "no input given");
  const out: unknown[] = [];
  for await (const c of s.output) out.push(c);
  t.same(out, []);
  t.equal(await s.exit, 0);

  const down = new FakeGuestAgent();
  down.down = true;
  const s2 = agentSession(down, ["true"], false);
  await t.rejects(s2.exit, { code: "CAPSULE_UNREACHABLE" });
});

t.test("agentSession: killed before stdin closed, the command never runs (no partial input)", async (t) => {
  const agent = new FakeGuestAgent();
  const s = agentSession(agent, ["sh", "-c", "cat > /etc/important"], true);
  await s.write(Buffer.from("partial"));
  await s.kill();
  await s.kill();
  t.equal(await s.exit, 137, "reported as killed");
  const out: unknown[] = [];
  for await (const c of s.output) out.push(c);
  t.same(out, []);
  t.same(agent.calls, [], "the guest agent was never asked");
});

t.test("a torn spec.json: that VM is skipped, the others are listed, and run writes it whole", async (t) => {
  const w = await world(t);
  const vms = w.vms();
  await vms.run(vmSpec({ workload: "web" }));
  await mkdir(join(w.dataDir, "api.1"), { recursive: true });
  await writeFile(join(w.dataDir, "api.1", "spec.json"), '{"id":"api.1","ha');
  t.same(
    (await vms.list()).map((v) => v.id),
    ["web.1"],
    "the torn one does not fail the list",
  );
  t.equal(await vms.has("api.1"), false);
  const r = await vms.run(vmSpec({ workload: "api" }));
  t.equal(r.action, "created");
  t.match(JSON.parse(await readFile(join(w.dataDir, "api.1", "spec.json"), "utf8")), { id: "api.1" });
});

t.test("logs: the serial console; follow stops on abort", async (t) => {
  const w = await world(t);
  const vms = w.vms();
  const collect = async (it: AsyncGenerator<string>) => {
    let s = "";
    for await (const c of it) s += c;
    return s;
  };
  await t.rejects(collect(vms.logs("web.1")), { code: "CAPSULE_NOT_FOUND" });
  await vms.run(vmSpec());
  t.equal(await collect(vms.logs("web.1")), "", "no console yet: nothing");
  const p = vms.paths("web.1");
  await writeFile(p.console, "Linux version 6.1\n");
  t.equal(await collect(vms.logs("web.1")), "Linux version 6.1\n");

  const ac = new AbortController();
  const it = vms.logs("web.1", { follow: true, signal: ac.signal });
  t.same(await it.next(), { value: "Linux version 6.1\n", done: false });
  const next = it.next();
  await appendFile(p.console, "login: ");
  // followLog polls on the clock: advance until the new text is read.
  const got = await drive(w.clock, next);
  t.same(got, { value: "login: ", done: false });
  const end = it.next();
  ac.abort();
  t.same(await drive(w.clock, end), { value: undefined, done: true }, "abort ends the follow");
});
