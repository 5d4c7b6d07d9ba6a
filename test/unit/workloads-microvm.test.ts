// MicroVM workloads through Workloads and the Reconciler over in-memory fakes: apply refuses
// what this capsule cannot run (no accelerator, a missing or relative kernel, an image, a long
// volume name, capsule.* on the command line) before any change; a good manifest runs a
// `microvm` RunSpec (defaults 1 CPU / 256 MiB, volumes as devices) on a TAP.
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { pino } from "pino";
import t, { type Test } from "tap";
import { FakeClock } from "../../src/node/host/clock.js";
import { Store } from "../../src/node/store/store.js";
import {
  FakeAddressBook,
  FakeContainerRuntime,
  FakeNetRuntime,
  FakePortForwarder,
  FakeVolumes,
} from "../../src/node/workloads/fakes.js";
import { Workloads } from "../../src/node/workloads/manager.js";
import { Reconciler } from "../../src/node/workloads/reconciler.js";
import { WorkloadRepo } from "../../src/node/workloads/repo.js";

const log = pino({ level: "silent" });

async function setup(t: Test, opts: { accel?: string | undefined; volumes?: string[] } = {}) {
  const dir = await mkdtemp(join(tmpdir(), "capsule-wl-vm-"));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  const kernel = join(dir, "vmlinuz");
  const initrd = join(dir, "initrd.img");
  await writeFile(kernel, "kernel");
  await writeFile(initrd, "initrd");
  const store = Store.open(":memory:");
  t.teardown(() => store.close());
  const repo = new WorkloadRepo(store);
  const clock = new FakeClock();
  const containers = new FakeContainerRuntime();
  const net = new FakeNetRuntime();
  const volumes = new FakeVolumes(opts.volumes ?? ["data", "a-volume-name-of-21ch"]);
  const ports = new FakePortForwarder();
  const addresses = new FakeAddressBook();
  const have = new Set<string>();
  const images = { has: async (ref: string) => have.has(ref) };
  const reconciler = new Reconciler({
    repo,
    containers,
    net,
    volumes,
    ports,
    hostSrc: () => "100.64.7.1",
    clock,
    log,
  });
  const accel = "accel" in opts ? opts.accel : "kvm";
  const workloads = new Workloads({
    repo,
    images,
    addresses,
    containers,
    net,
    reconciler,
    volumes,
    ports,
    clock,
    ...(accel === undefined ? {} : { vmAccel: async () => accel }),
  });
  const vm = (microvm: Record<string, unknown> = {}, over: Record<string, unknown> = {}) =>
    JSON.stringify({ kind: "Workload", name: "vm", microvm: { kernel, initrd, ...microvm }, ...over });
  return { have, dir, kernel, initrd, repo, containers, net, volumes, addresses, reconciler, workloads, vm };
}

t.test("apply refuses a microVM this capsule cannot run, before any change", async (t) => {
  const s = await setup(t);
  const nothing = (what: string) => {
    t.same(s.repo.list(), [], `${what}: no row`);
    t.same(s.addresses.calls, [], `${what}: no address`);
    t.same(s.volumes.calls, [], `${what}: no volume touched`);
  };

  await t.rejects(s.workloads.apply([s.vm({ kernel: join(s.dir, "nope") })]), {
    code: "CAPSULE_INVALID_ARGUMENT",
    message: /^vm: microvm\.kernel: .*nope is not a readable file on this capsule/,
    hint: /copy the file/,
  });
  await t.rejects(s.workloads.apply([s.vm({ initrd: join(s.dir, "nope.img") })]), {
    code: "CAPSULE_INVALID_ARGUMENT",
    message: /^vm: microvm\.initrd: /,
  });
  await t.rejects(s.workloads.apply([s.vm({ kernel: "boot/vmlinuz" })]), {
    code: "CAPSULE_INVALID_ARGUMENT",
    message: 'vm: microvm.kernel: "boot/vmlinuz" is not an absolute path',
  });
  await t.rejects(s.workloads.apply([s.vm({ initrd: "initrd.img" })]), {
    message: /microvm\.initrd: "initrd\.img" is not an absolute path/,
  });
  await t.rejects(s.workloads.apply([s.vm({ image: "/var/lib/capsule/disk.img" })]), {
    code: "CAPSULE_INVALID_ARGUMENT",
    message: /^vm: microvm\.image: is not supported yet/,
    hint: /microvm\.kernel/,
  });
  await t.rejects(
    s.workloads.apply([
      JSON.stringify({ kind: "Workload", name: "vm", microvm: { initrd: s.initrd, cpus: 2 } }),
    ]),
    { code: "CAPSULE_INVALID_ARGUMENT", message: /^vm: microvm\.kernel: is required/ },
  );
  await t.rejects(
    s.workloads.apply([s.vm({}, { volumes: [{ name: "a-volume-name-of-21ch", mountPath: "/d" }] })]),
    {
      code: "CAPSULE_INVALID_ARGUMENT",
      message: /volume name a-volume-name-of-21ch is longer than 20 characters/,
      hint: /virtio serial/,
    },
  );
  await t.rejects(s.workloads.apply([s.vm({}, { volumes: [{ name: "data", mountPath: "/my data" }] })]), {
    code: "CAPSULE_INVALID_ARGUMENT",
    message: /mountPath \/my data has characters/,
  });
  for (const cmdline of ["capsule.ip=1.2.3.4", "quiet capsule.name=x", "a\tcapsule.vol=x:/y"]) {
    await t.rejects(
      s.workloads.apply([s.vm({ cmdline })]),
      { code: "CAPSULE_INVALID_ARGUMENT", message: /microvm\.cmdline: sets a capsule\.\* key/ },
      cmdline,
    );
  }
  // A batch with a bad microVM and a good one changes nothing either.
  await t.rejects(
    s.workloads.apply([
      s.vm({ kernel: "relative" }),
      JSON.stringify({ kind: "Workload", name: "vm2", microvm: { kernel: s.kernel } }),
    ]),
    { code: "CAPSULE_INVALID_ARGUMENT" },
  );
  nothing("refused");
  // Not a capsule.* key: fine.
  t.same(await s.workloads.apply([s.vm({ cmdline: "mycapsule.x=1 init=/sbin/init" })], { dryRun: true }), [
    { kind: "Workload", name: "vm", action: "created" },
  ]);
  nothing("dry run");
});

t.test("apply: no accelerator (or no VM support at all) is refused with a hint", async (t) => {
  for (const accel of ["none", undefined]) {
    const s = await setup(t, { accel });
    await t.rejects(
      s.workloads.apply([s.vm()]),
      {
        code: "CAPSULE_FAILED_PRECONDITION",
        message: "vm: microVMs cannot run on this capsule",
        hint: /VM-ACCEL.*qemu-system-x86/,
      },
      `accel ${accel ?? "unset"}`,
    );
    t.same(s.repo.list(), []);
  }
  // tcg is an accelerator.
  const s = await setup(t, { accel: "tcg" });
  t.match(await s.workloads.apply([s.vm()]), [{ action: "created" }]);
});

t.test("a good microVM manifest applies and runs a microvm RunSpec on a TAP", async (t) => {
  const s = await setup(t);
  const doc = s.vm({}, { volumes: [{ name: "data", mountPath: "/srv/data" }] });
  t.same(await s.workloads.apply([doc]), [{ kind: "Workload", name: "vm", action: "created" }]);
  await s.reconciler.idle();
  t.same(s.containers.calls, ["run vm.1"]);
  const spec = s.containers.containers.get("vm.1")!.spec;
  t.same(spec, {
    kind: "microvm",
    workload: "vm",
    generation: 1,
    kernel: s.kernel,
    initrd: s.initrd,
    cpus: 1,
    memoryMib: 256,
    address: "100.64.7.2",
    volumes: [{ name: "data", path: "/dev/vol/data", mountPath: "/srv/data" }],
  });
  t.same(s.volumes.calls, ["attachDevice data vm"], "a device, not a capsule-side mount");
  t.same(s.net.calls, ["ensure vm 100.64.7.2 src 100.64.7.1"]);
  t.equal(s.net.kinds.get("vm"), "microvm", "the net is told it is a microVM (a TAP)");
  t.match(await s.workloads.get("vm"), { kind: "microvm", image: s.kernel, phase: "running" });

  t.same(await s.workloads.apply([doc]), [{ kind: "Workload", name: "vm", action: "unchanged" }]);

  // cpus, memory and cmdline given: a new generation with them.
  t.same(await s.workloads.apply([s.vm({ cpus: 2, memoryMib: 512, cmdline: "loglevel=7" })]), [
    { kind: "Workload", name: "vm", action: "configured" },
  ]);
  await s.reconciler.idle();
  t.equal(s.repo.get("vm")!.generation, 2);
  t.match(s.containers.containers.get("vm.2")!.spec, {
    kind: "microvm",
    generation: 2,
    cpus: 2,
    memoryMib: 512,
    cmdline: "loglevel=7",
    address: "100.64.7.2",
    volumes: [],
  });
  t.notOk(s.containers.containers.has("vm.1"), "old generation removed");
});

t.test("no initrd or cmdline keys when not given; turned into a container, wired as one", async (t) => {
  const s = await setup(t);
  await s.workloads.apply([JSON.stringify({ kind: "Workload", name: "vm", microvm: { kernel: s.kernel } })]);
  await s.reconciler.idle();
  const spec = s.containers.containers.get("vm.1")!.spec;
  t.notOk("initrd" in spec);
  t.notOk("cmdline" in spec);
  t.equal(s.net.kinds.get("vm"), "microvm");

  // The same name turned into a container: a new generation, wired as a container.
  s.have.add("demo/httpd:1");
  await s.workloads.apply([
    JSON.stringify({ kind: "Workload", name: "vm", container: { image: "demo/httpd:1" } }),
  ]);
  await s.reconciler.idle();
  t.match(s.containers.containers.get("vm.2")!.spec, { kind: "container", image: "demo/httpd:1" });
  t.equal(s.net.kinds.get("vm"), "container");
});
