// planQemuArgv: the golden command line, kernel command line, sandbox and runas on and off,
// read-only volumes, escaping, and validation errors that name the field.
import t from "tap";
import {
  kernelCmdline,
  planQemuArgv,
  qemuOptValue,
  type QemuSpec,
  QEMU_SANDBOX,
  QEMU_SANDBOX_RUNAS,
} from "../../src/node/runtime/qemu-plan.js";

const spec = (over: Partial<QemuSpec> = {}): QemuSpec => ({
  name: "web",
  accel: "kvm",
  cpus: 2,
  memoryMib: 512,
  kernel: "/var/lib/capsule/kernels/vmlinuz",
  initrd: "/var/lib/capsule/kernels/initrd.img",
  tap: "cvabcdef012",
  mac: "02:00:64:40:00:07",
  address: "100.64.0.7",
  gateway: "169.254.1.1",
  volumes: [
    { name: "data", path: "/dev/capsule/data" },
    { name: "conf", path: "/var/lib/capsule/volumes/conf.img", readOnly: true },
  ],
  qmpSocket: "/run/capsule/vm/web/qmp.sock",
  gaSocket: "/run/capsule/vm/web/ga.sock",
  serialLog: "/var/log/capsule/vm/web.log",
  sandbox: true,
  ...over,
});

const GOLDEN = [
  "qemu-system-x86_64",
  "-name guest=web,debug-threads=on",
  "-machine microvm,x-option-roms=off,isa-serial=on,rtc=on",
  "-accel kvm",
  "-cpu host",
  "-smp 2",
  "-m 512M",
  "-nodefaults",
  "-no-user-config",
  "-display none",
  "-no-reboot",
  "-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
  "-kernel /var/lib/capsule/kernels/vmlinuz",
  "-initrd /var/lib/capsule/kernels/initrd.img",
  "-append console=ttyS0 reboot=t panic=1 capsule.name=web capsule.ip=100.64.0.7/32 capsule.gw=169.254.1.1 capsule.mac=02:00:64:40:00:07",
  "-chardev file,id=serial0,path=/var/log/capsule/vm/web.log,append=on",
  "-serial chardev:serial0",
  "-chardev socket,id=qmp0,path=/run/capsule/vm/web/qmp.sock,server=on,wait=off",
  "-mon chardev=qmp0,mode=control",
  "-device virtio-serial-device,id=vser0",
  "-chardev socket,id=ga0,path=/run/capsule/vm/web/ga.sock,server=on,wait=off",
  "-device virtserialport,bus=vser0.0,chardev=ga0,name=org.qemu.guest_agent.0",
  "-object rng-random,id=rng0,filename=/dev/urandom",
  "-device virtio-rng-device,rng=rng0",
  "-netdev tap,id=net0,ifname=cvabcdef012,script=no,downscript=no",
  "-device virtio-net-device,netdev=net0,mac=02:00:64:40:00:07",
  "-drive file=/dev/capsule/data,format=raw,if=none,id=vol-data",
  "-device virtio-blk-device,drive=vol-data,serial=data",
  "-drive file=/var/lib/capsule/volumes/conf.img,format=raw,if=none,id=vol-conf,readonly=on",
  "-device virtio-blk-device,drive=vol-conf,serial=conf",
];

/** lines groups argv into "option value" lines the way GOLDEN is written. */
function lines(argv: string[]): string[] {
  const out: string[] = [argv[0]!];
  const flags = new Set(["-nodefaults", "-no-user-config", "-no-reboot"]);
  for (let i = 1; i < argv.length; i++) {
    const a = argv[i]!;
    if (flags.has(a)) out.push(a);
    else out.push(`${a} ${argv[++i]}`);
  }
  return out;
}

t.test("golden argv", async (t) => {
  const argv = planQemuArgv(spec());
  t.same(lines(argv), GOLDEN);
  t.equal(argv.length, 2 * GOLDEN.length - 4, "one argument per value: the -append value is one");
  t.same(planQemuArgv(spec()), argv, "deterministic");
});

t.test("the gateway's MAC and mounted volumes", async (t) => {
  const argv = planQemuArgv(
    spec({
      gatewayMac: "ee:ee:ee:ee:ee:ee",
      volumes: [{ name: "data", path: "/dev/capsule/data", mountPath: "/srv/data" }],
    }),
  );
  const append = argv[argv.indexOf("-append") + 1]!;
  t.match(append, / capsule\.gwmac=ee:ee:ee:ee:ee:ee capsule\.vol=data:\/srv\/data$/);
  t.throws(() => planQemuArgv(spec({ gatewayMac: "EE:EE" })), {
    code: "CAPSULE_INVALID_ARGUMENT",
    message: /gatewayMac/,
  });
  t.throws(() => planQemuArgv(spec({ volumes: [{ name: "data", path: "/dev/x", mountPath: "srv data" }] })), {
    message: /volumes\[0\]\.mountPath/,
  });
});

t.test("sandbox and runas on and off", async (t) => {
  const off = planQemuArgv(spec({ sandbox: false }));
  t.notOk(off.includes("-sandbox"));
  t.notOk(off.includes("-runas"));
  const name = planQemuArgv(spec({ runAs: { user: "capsule-vm" } }));
  t.equal(name[name.indexOf("-runas") + 1], "capsule-vm");
  t.equal(
    name[name.indexOf("-sandbox") + 1],
    QEMU_SANDBOX_RUNAS,
    "set*id allowed so -runas survives seccomp",
  );
  t.match(QEMU_SANDBOX_RUNAS, "elevateprivileges=allow");
  const ids = planQemuArgv(spec({ sandbox: false, runAs: { user: "997", group: "996" } }));
  t.equal(ids[ids.indexOf("-runas") + 1], "997:996");
  t.notOk(ids.includes("-sandbox"));
  const plain = planQemuArgv(spec());
  t.equal(plain[plain.indexOf("-sandbox") + 1], QEMU_SANDBOX);
});

t.test("tcg, cpu model, no initrd, no volumes, extra cmdline, escaping", async (t) => {
  const argv = planQemuArgv(
    spec({
      accel: "tcg",
      initrd: undefined,
      volumes: [{ name: "a", path: "/srv/odd,name.img", readOnly: false }],
      cmdline: "  init=/sbin/capsule-init quiet ",
      serialLog: "/var/log/a,b.log",
    }),
  );
  t.equal(argv[argv.indexOf("-accel") + 1], "tcg");
  t.equal(argv[argv.indexOf("-cpu") + 1], "max");
  t.notOk(argv.includes("-initrd"));
  t.ok(argv.includes("file=/srv/odd,,name.img,format=raw,if=none,id=vol-a"));
  t.ok(argv.includes("file,id=serial0,path=/var/log/a,,b.log,append=on"));
  t.match(
    argv[argv.indexOf("-append") + 1],
    / capsule\.mac=02:00:64:40:00:07 init=\/sbin\/capsule-init quiet$/,
  );
  t.equal(planQemuArgv(spec({ cpu: "qemu64" }))[planQemuArgv(spec()).indexOf("-cpu") + 1], "qemu64");
  t.equal(planQemuArgv(spec({ volumes: [] })).filter((a) => a === "-drive").length, 0);
  t.equal(qemuOptValue("a,,b"), "a,,,,b");
  t.equal(
    kernelCmdline(spec({ cmdline: "" })),
    "console=ttyS0 reboot=t panic=1 capsule.name=web capsule.ip=100.64.0.7/32 capsule.gw=169.254.1.1 capsule.mac=02:00:64:40:00:07",
  );
});

t.test("validation names the field", async (t) => {
  const cases: [Partial<QemuSpec>, string][] = [
    [{ name: "Web" }, "name"],
    [{ accel: "none" as "kvm" }, "accel"],
    [{ cpu: "host", accel: "tcg" }, "cpu"],
    [{ cpu: "max;rm" }, "cpu"],
    [{ cpus: 0 }, "cpus"],
    [{ cpus: 1.5 }, "cpus"],
    [{ cpus: 65 }, "cpus"],
    [{ memoryMib: 32 }, "memoryMib"],
    [{ memoryMib: Number.NaN }, "memoryMib"],
    [{ kernel: "vmlinuz" }, "kernel"],
    [{ initrd: "initrd.img" }, "initrd"],
    [{ cmdline: "a\nb" }, "cmdline"],
    [{ cmdline: "capsule.ip=1.2.3.4/32" }, "cmdline"],
    [{ tap: "" }, "tap"],
    [{ tap: "a-very-long-tap-name" }, "tap"],
    [{ tap: "ta p" }, "tap"],
    [{ mac: "02:00:64:40:00" }, "mac"],
    [{ mac: "02:00:64:40:00:0G" }, "mac"],
    [{ mac: "02:00:64:40:00:0A" }, "mac"],
    [{ mac: "01:00:64:40:00:07" }, "mac"],
    [{ address: "100.64.0" }, "address"],
    [{ address: "100.64.0.07" }, "address"],
    [{ address: "10.0.0.7" }, "address"],
    [{ address: "100.128.0.7" }, "address"],
    [{ gateway: "169.254.1" }, "gateway"],
    [{ gateway: "100.64.0.7" }, "gateway"],
    [{ volumes: [{ name: "Data", path: "/d" }] }, "volumes[0].name"],
    [{ volumes: [{ name: "a-volume-name-over-20", path: "/d" }] }, "volumes[0].name"],
    [
      {
        volumes: [
          { name: "a", path: "/a" },
          { name: "a", path: "/b" },
        ],
      },
      "volumes[1].name",
    ],
    [{ volumes: [{ name: "a", path: "a.img" }] }, "volumes[0].path"],
    [{ qmpSocket: "qmp.sock" }, "qmpSocket"],
    [{ qmpSocket: "/" + "x".repeat(107) }, "qmpSocket"],
    [{ gaSocket: "/run/capsule/vm/web/qmp.sock" }, "gaSocket"],
    [{ serialLog: "web.log" }, "serialLog"],
    [{ runAs: { user: "bad user" } }, "runAs.user"],
    [{ runAs: { user: "capsule", group: "996" } }, "runAs.user"],
    [{ runAs: { user: "997", group: "kvm" } }, "runAs.group"],
  ];
  for (const [over, field] of cases) {
    t.throws(
      () => planQemuArgv(spec(over)),
      { code: "CAPSULE_INVALID_ARGUMENT", details: { field } },
      `${field}: ${JSON.stringify(over)}`,
    );
  }
  t.doesNotThrow(() => planQemuArgv(spec({ volumes: [{ name: "a".repeat(20), path: "/d" }] })));
  t.doesNotThrow(() => planQemuArgv(spec({ address: "100.127.255.254", mac: "fe:ff:ff:ff:ff:ff" })));
});
