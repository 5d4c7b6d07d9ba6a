/**
 * The QEMU lab: two or three microVM guests running Debian's kernel as full capsules, for what
 * the host kernel lacks (kernel WireGuard, dm-thin, dm-clone, the LIO iSCSI target). Each guest
 * boots the kernel of {@link buildGuest} with its busybox initramfs, but from a second init
 * ({@link stage1Init}) that mounts the host's `/` read-only over virtio-9p under a tmpfs overlay
 * and switch_roots into it, so the guest runs the host's node, dist/, wg, ip, nft, dmsetup,
 * iscsiadm and qemu-ga. The kernel's module tree (with `dm-clone.ko`, see {@link buildDmClone},
 * in `extra/`, and depmod run) is bind-mounted at `/lib/modules/<release>` so modprobe works.
 * {@link stage2Init} then brings up eth0, starts qemu-ga and `capsuled`, and prints
 * {@link VM_READY_MARKER}.
 *
 * Network (only inside the namespace the lab creates): bridge `br0` in `<prefix>` holding
 * 198.51.100.1/24 and one TAP per guest; guest i is 198.51.100.(11+i). capsuled's fabric
 * addresses are its own (100.64.0.0/10). Commands run in guests through qemu-ga's guest-exec
 * ({@link QgaClient}); the host reaches capsuled's API from inside the namespace.
 *
 * Per guest, in the work dir: a sparse raw disk (`/dev/vda` in the guest), the console log, the
 * QMP and qemu-ga sockets, and `lab.json` naming QEMU's pids so `down` works from another process.
 */
import { type ChildProcess, spawn } from "node:child_process";
import { existsSync, readFileSync } from "node:fs";
import { mkdir, open, readdir, rm, writeFile } from "node:fs/promises";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { type CommandRunner, ExecaRunner } from "../../src/node/host/runner.js";
import { DAEMON_NODE_FLAGS } from "../../src/node/node-flags.js";
import { parseCpuMhz } from "../../src/node/runtime/vms.js";
import { buildDmClone } from "./dmclone.js";
import { buildGuest, GUEST_MODULES, QGA_PORT_NAME } from "./guest.js";
import { QgaClient } from "./qga.js";

/** QEMU is the emulator the lab runs. */
export const QEMU = "/usr/bin/qemu-system-x86_64";

/** VM_READY_MARKER is what {@link stage2Init} prints on the console once qemu-ga (and capsuled) started. */
export const VM_READY_MARKER = "CAPSULE-VM-READY";

/** ROOT_TAG is the virtio-9p mount tag of the host's `/`. */
export const ROOT_TAG = "hostroot";

/** VM_MODULES are the initramfs modules: {@link GUEST_MODULES} plus 9p and overlayfs for the root. */
export const VM_MODULES = [...GUEST_MODULES, "9pnet_virtio", "9p", "overlay"];

/** LAB_NET is the guest network (inside the lab's namespace only). */
export const LAB_NET = { prefix: "198.51.100", len: 24, host: 1, firstGuest: 11 };

/** CAPSULED_PORT is where each guest's capsuled listens. */
export const CAPSULED_PORT = 50000;

/** WG_PORT is each guest's fabric port. */
export const WG_PORT = 51820;

/** VmLabOptions: all fields optional. */
export interface VmLabOptions {
  /** count is the number of guests, 1 to 3 (default 2). */
  count?: number;
  /** prefix names the namespace and the guests' hostnames (default "capvm"). */
  prefix?: string;
  /** workDir holds disks, logs and sockets (required by {@link planVmLab}). */
  workDir: string;
  /** memMiB is each guest's RAM (default 768). */
  memMiB?: number;
  /** diskMiB is each guest's raw disk (default 256). */
  diskMiB?: number;
  /** capsuled: start capsuled in each guest (default true). */
  capsuled?: boolean;
  /** repo is the checkout whose dist/ the guests run (default: this one). */
  repo?: string;
}

/** VmGuestPlan is one guest. */
export interface VmGuestPlan {
  name: string;
  /** ip is the guest's address on the lab network (no prefix length). */
  ip: string;
  mac: string;
  tap: string;
  disk: string;
  console: string;
  qmp: string;
  qga: string;
}

/** VmLabPlan is everything {@link VmLab} creates. */
export interface VmLabPlan {
  ns: string;
  bridge: string;
  hostIp: string;
  workDir: string;
  memMiB: number;
  diskMiB: number;
  capsuled: boolean;
  repo: string;
  guests: VmGuestPlan[];
}

/** defaultRepo is the checkout this file belongs to: the nearest ancestor with a package.json. */
export function defaultRepo(): string {
  let d = dirname(fileURLToPath(import.meta.url));
  while (d !== "/" && !existsSync(join(d, "package.json"))) d = dirname(d);
  return d;
}

/** planVmLab names every object of a lab; pure. */
export function planVmLab(opts: VmLabOptions): VmLabPlan {
  const count = opts.count ?? 2;
  if (!Number.isInteger(count) || count < 1 || count > 3) throw new Error(`count ${count} is not 1..3`);
  const prefix = opts.prefix ?? "capvm";
  if (!/^[a-z][a-z0-9-]{0,11}$/.test(prefix)) throw new Error(`prefix ${prefix} is not [a-z][a-z0-9-]{0,11}`);
  const guests = Array.from({ length: count }, (_, i) => {
    const name = `${prefix}-${String.fromCharCode(97 + i)}`;
    const dir = join(opts.workDir, name);
    return {
      name,
      ip: `${LAB_NET.prefix}.${LAB_NET.firstGuest + i}`,
      mac: `52:54:00:c5:00:${(0x11 + i).toString(16)}`,
      tap: `tap${i}`,
      disk: join(dir, "disk.raw"),
      console: join(dir, "console.log"),
      qmp: join(dir, "qmp.sock"),
      qga: join(dir, "qga.sock"),
    };
  });
  return {
    ns: prefix,
    bridge: "br0",
    hostIp: `${LAB_NET.prefix}.${LAB_NET.host}`,
    workDir: opts.workDir,
    memMiB: opts.memMiB ?? 768,
    diskMiB: opts.diskMiB ?? 256,
    capsuled: opts.capsuled ?? true,
    repo: opts.repo ?? defaultRepo(),
    guests,
  };
}

/** netUpCommands creates the namespace, the bridge and one TAP per guest. */
export function netUpCommands(p: VmLabPlan): string[][] {
  const ipn = (...a: string[]) => ["ip", "-n", p.ns, ...a];
  return [
    ["ip", "netns", "add", p.ns],
    ipn("link", "set", "lo", "up"),
    ipn("link", "add", p.bridge, "type", "bridge"),
    ipn("addr", "add", `${p.hostIp}/${LAB_NET.len}`, "dev", p.bridge),
    ipn("link", "set", p.bridge, "up"),
    ...p.guests.flatMap((g) => [
      ipn("tuntap", "add", "dev", g.tap, "mode", "tap"),
      ipn("link", "set", g.tap, "master", p.bridge),
      ipn("link", "set", g.tap, "up"),
    ]),
  ];
}

/** BootFiles are the host files every guest boots from. */
export interface BootFiles {
  kernel: string;
  initrd: string;
  release: string;
  /** modTree is the host path of the module tree bound at /lib/modules/<release>. */
  modTree: string;
  /** modules is the initramfs's module load order. */
  modules: string[];
  /** dmClone is the host path of dm-clone.ko. */
  dmClone: string;
  /** tscKhz is the TSC frequency handed to the guest kernel (see {@link hostTscKhz}). */
  tscKhz: number;
}

/**
 * hostTscKhz reads the host's TSC frequency from /proc/cpuinfo's first "cpu MHz" (default
 * 2 GHz). Under TCG the guest's TSC ticks with the host's, and microvm has no PIT or HPET to
 * calibrate it against: without `tsc_early_khz` Debian's kernel hangs after "tsc: Marking TSC
 * unstable", and a wrong value makes the guest clock drift.
 */
export function hostTscKhz(cpuinfo: string): number {
  return parseCpuMhz(cpuinfo) ?? 2_000_000;
}

/** vmCmdline is a guest's kernel command line. */
export function vmCmdline(p: VmLabPlan, g: VmGuestPlan, b: BootFiles): string {
  return [
    "console=ttyS0",
    "panic=-1",
    "loglevel=4",
    "8250.nr_uarts=1",
    "tsc=reliable",
    "no_timer_check",
    `tsc_early_khz=${b.tscKhz}`,
    "rdinit=/bin/sh",
    `capsule.mods=${b.modules.join(",")}`,
    `capsule.modtree=${b.modTree}`,
    `capsule.release=${b.release}`,
    `capsule.hostname=${g.name}`,
    `capsule.ip=${g.ip}/${LAB_NET.len}`,
    `capsule.capsuled=${p.capsuled ? 1 : 0}`,
    `capsule.repo=${p.repo}`,
    // buildGuest writes extra files 0644, so /bin/sh runs stage 1 (argv after "--" goes to init).
    "--",
    "/capsule/init",
  ].join(" ");
}

/** qemuArgv is the QEMU command line of guest `g` (run inside the lab namespace). */
export function qemuArgv(p: VmLabPlan, g: VmGuestPlan, b: BootFiles): string[] {
  // prettier-ignore
  return [
    QEMU,
    "-accel", "tcg", "-M", "microvm", "-cpu", "max", "-m", String(p.memMiB), "-smp", "1",
    "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
    "-kernel", b.kernel, "-initrd", b.initrd, "-append", vmCmdline(p, g, b),
    "-serial", `file:${g.console}`,
    "-qmp", `unix:${g.qmp},server=on,wait=off`,
    "-fsdev", `local,id=root,path=/,security_model=none,readonly=on,multidevs=remap`,
    "-device", `virtio-9p-device,fsdev=root,mount_tag=${ROOT_TAG}`,
    "-netdev", `tap,id=n0,ifname=${g.tap},script=no,downscript=no`,
    "-device", `virtio-net-device,netdev=n0,mac=${g.mac}`,
    "-drive", `file=${g.disk},format=raw,if=none,id=d0,cache=unsafe,discard=unmap`,
    "-device", "virtio-blk-device,drive=d0",
    "-device", "virtio-rng-device",
    "-device", "virtio-serial-device",
    "-chardev", `socket,id=qga0,path=${g.qga},server=on,wait=off`,
    "-device", `virtserialport,chardev=qga0,name=${QGA_PORT_NAME}`,
  ];
}

/**
 * stage1Init runs from the initramfs: load the virtio, 9p and overlay modules (in the order the
 * command line gives), mount the host's `/` read-only under a tmpfs overlay, bind the module
 * tree, copy {@link stage2Init} in and switch_root to it.
 */
export function stage1Init(): string {
  return `#!/bin/sh
# capsule VM lab stage 1 (lab/qemu/vmlab.ts)
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
arg() { for w in $(cat /proc/cmdline); do case "$w" in "$1"=*) echo "\${w#*=}";; esac; done; }
for m in $(arg capsule.mods | tr , ' '); do
  insmod /lib/modules/$m.ko || echo "capsule-stage1: insmod $m failed"
done
echo "capsule-stage1: modules loaded"
mkdir -p /lower /upper /newroot
i=0
until mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=262144 ${ROOT_TAG} /lower; do
  i=$((i+1))
  if [ $i -ge 30 ]; then
    echo "capsule-stage1: 9p mount failed"; cat /proc/cmdline; ls /sys/bus/virtio/devices/*/
    sleep 5; poweroff -f
  fi
  sleep 0.2
done
mount -t tmpfs -o mode=0755 upper /upper
mkdir -p /upper/u /upper/w
mount -t overlay overlay -o lowerdir=/lower,upperdir=/upper/u,workdir=/upper/w /newroot || { echo "capsule-stage1: overlay failed"; sleep 5; poweroff -f; }
rel=$(arg capsule.release)
mkdir -p /newroot/lib/modules/$rel
mount --bind /lower$(arg capsule.modtree) /newroot/lib/modules/$rel
/bin/busybox cp /capsule/stage2 /newroot/capsule-stage2
/bin/busybox chmod 755 /newroot/capsule-stage2
echo "capsule-stage1: root mounted, switching"
umount /proc /sys /dev 2>/dev/null
exec /bin/busybox switch_root /newroot /capsule-stage2
`;
}

/**
 * stage2Init is PID 1 in the switched root (the host's tree, writable through the overlay):
 * mounts, hostname, eth0, a per-guest iSCSI initiator name, qemu-ga, capsuled, then
 * {@link VM_READY_MARKER}.
 */
export function stage2Init(): string {
  return `#!/bin/sh
# capsule VM lab stage 2 (lab/qemu/vmlab.ts)
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs -o mode=0755 tmpfs /run
modprobe configfs 2>/dev/null; mount -t configfs configfs /sys/kernel/config
mkdir -p /run/lock /var/log /var/lib/capsule /etc/iscsi
arg() { for w in $(cat /proc/cmdline); do case "$w" in "$1"=*) echo "\${w#*=}";; esac; done; }
name=$(arg capsule.hostname)
hostname "$name"
echo "$name" > /etc/hostname
echo "127.0.0.1 localhost $name" > /etc/hosts
echo "InitiatorName=iqn.2024-01.test.capsule:$name" > /etc/iscsi/initiatorname.iscsi
echo "capsule-stage2: $name"
ip link set lo up
ip link set eth0 up
ip addr add "$(arg capsule.ip)" dev eth0
for n in /sys/class/virtio-ports/*; do
  [ -e "$n/name" ] || continue
  if [ "$(cat $n/name)" = ${QGA_PORT_NAME} ]; then
    mkdir -p /dev/virtio-ports; ln -sf /dev/\${n##*/} /dev/virtio-ports/${QGA_PORT_NAME}
    mkdir -p /var/lib/qemu-ga
    qemu-ga -m virtio-serial -p /dev/virtio-ports/${QGA_PORT_NAME} -t /run -d -f /run/qemu-ga.pid
  fi
done
echo "capsule-stage2: qemu-ga started"
if [ "$(arg capsule.capsuled)" = 1 ]; then
  repo=$(arg capsule.repo)
  ip=$(arg capsule.ip); ip=\${ip%/*}
  node ${DAEMON_NODE_FLAGS.join(" ")} "$repo/dist/src/node/main.js" --name "$name" \\
    --state-dir /var/lib/capsule --listen 0.0.0.0:${CAPSULED_PORT} \\
    --endpoint "$ip:${WG_PORT}" --fabric-port ${WG_PORT} >/var/log/capsuled.log 2>&1 &
  echo $! > /run/capsuled.pid
fi
echo "${VM_READY_MARKER} $name"
while true; do sleep 3600; done
`;
}

/**
 * prepareBoot builds (or reuses, from `cacheDir`) the kernel, the initramfs with
 * {@link stage1Init}, dm-clone.ko and the module tree with dm-clone in `extra/` and depmod run.
 */
export async function prepareBoot(
  cacheDir: string,
  host: CommandRunner = new ExecaRunner(),
): Promise<BootFiles & { timings: Record<string, number> }> {
  const timings: Record<string, number> = {};
  let t = Date.now();
  const g = await buildGuest(cacheDir, {
    modules: VM_MODULES,
    qemuGa: false,
    files: { "capsule/init": stage1Init(), "capsule/stage2": stage2Init() },
    runner: host,
  });
  timings.guestMs = Date.now() - t;
  // buildGuest unpacked the kernel package into <cacheDir>/cache/<pkg>_<version>/.
  const cache = join(cacheDir, "cache");
  const pkgDir = (await readdir(cache)).find(
    (d) =>
      d.startsWith(`linux-image-${g.kernelVersion}_`) &&
      existsSync(join(cache, d, ".complete")) &&
      existsSync(join(cache, d, "boot", `vmlinuz-${g.kernelVersion}`)),
  );
  if (!pkgDir) throw new Error(`no unpacked linux-image-${g.kernelVersion} in ${cache}`);
  const version = pkgDir.slice(`linux-image-${g.kernelVersion}_`.length);
  // The .deb version as apt prints it ("6.1.192-2"); the dir name only replaced unusual characters.
  const debVersion =
    readFileSync(join(cache, pkgDir, ".complete"), "utf8")
      .trim()
      .split(" ")[1] ?? version;

  t = Date.now();
  const dm = await buildDmClone(cache, g.kernelVersion, debVersion, host);
  timings.dmCloneMs = Date.now() - t;

  t = Date.now();
  const base = join(cache, `modtree-${g.kernelVersion}_${version}`);
  const modTree = join(base, "lib", "modules", g.kernelVersion);
  if (!existsSync(join(base, ".complete"))) {
    await rm(base, { recursive: true, force: true });
    await mkdir(join(base, "lib", "modules"), { recursive: true });
    const src = join(cache, pkgDir, "lib", "modules", g.kernelVersion);
    // Hard links: the tree is large and the package dir is on the same filesystem.
    await host.run(["sh", "-c", 'cp -al "$1" "$2" 2>/dev/null || cp -a "$1" "$2"', "sh", src, modTree], {
      timeoutMs: 300_000,
    });
    await mkdir(join(modTree, "extra"), { recursive: true });
    await host.run(["cp", dm.ko, join(modTree, "extra", "dm-clone.ko")]);
    await host.run(["depmod", "-b", base, g.kernelVersion], { timeoutMs: 300_000 });
    await writeFile(join(base, ".complete"), `${g.kernelVersion} ${debVersion}\n`);
  }
  timings.modTreeMs = Date.now() - t;
  return {
    kernel: g.kernel,
    initrd: g.initrd,
    release: g.kernelVersion,
    modTree,
    modules: g.modules,
    dmClone: dm.ko,
    tscKhz: hostTscKhz(readFileSync("/proc/cpuinfo", "utf8")),
    timings,
  };
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

const alive = (pid: number) => {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
};

/** LabState is what `lab.json` records so another process can tear the lab down. */
export interface LabState {
  ns: string;
  workDir: string;
  pids: Record<string, number>;
}

/** VmLab runs one lab: network, QEMU processes, qemu-ga clients. */
export class VmLab {
  private readonly procs = new Map<string, ChildProcess>();
  private readonly agents = new Map<string, QgaClient>();
  /** timings collects how long each phase took, in ms. */
  readonly timings: Record<string, number> = {};

  constructor(
    readonly plan: VmLabPlan,
    private readonly host: CommandRunner = new ExecaRunner(),
  ) {}

  /** start creates the network and disks and starts every QEMU (detached, so `up` can exit). */
  async start(boot: BootFiles): Promise<void> {
    const p = this.plan;
    for (const argv of netUpCommands(p)) await this.host.run(argv);
    for (const g of p.guests) {
      await mkdir(join(g.disk, ".."), { recursive: true });
      const f = await open(g.disk, "w");
      await f.truncate(p.diskMiB * 1024 * 1024);
      await f.close();
      await rm(g.console, { force: true });
    }
    const t0 = Date.now();
    for (const g of p.guests) {
      const argv = ["ip", "netns", "exec", p.ns, ...qemuArgv(p, g, boot)];
      const out = await open(join(g.disk, "..", "qemu.log"), "w");
      const child = spawn(argv[0] as string, argv.slice(1), {
        stdio: ["ignore", out.fd, out.fd],
        detached: true,
      });
      void out.close();
      child.unref();
      this.procs.set(g.name, child);
    }
    this.timings.spawnMs = Date.now() - t0;
    await this.saveState();
  }

  private async saveState(): Promise<void> {
    const pids: Record<string, number> = {};
    for (const [n, c] of this.procs) if (c.pid) pids[n] = c.pid;
    const st: LabState = { ns: this.plan.ns, workDir: this.plan.workDir, pids };
    await writeFile(join(this.plan.workDir, "lab.json"), JSON.stringify(st, null, 2) + "\n");
  }

  /** console returns guest `name`'s console so far. */
  console(name: string): string {
    const g = this.guest(name);
    return existsSync(g.console) ? readFileSync(g.console, "utf8") : "";
  }

  guest(name: string): VmGuestPlan {
    const g = this.plan.guests.find((x) => x.name === name);
    if (!g) throw new Error(`no guest ${name}`);
    return g;
  }

  /** waitReady waits (bounded) until every guest printed the marker and its qemu-ga answers. */
  async waitReady(timeoutMs = 300_000): Promise<Record<string, number>> {
    const t0 = Date.now();
    const ready: Record<string, number> = {};
    for (const g of this.plan.guests) {
      for (;;) {
        if (this.console(g.name).includes(VM_READY_MARKER)) break;
        const pid = this.procs.get(g.name)?.pid;
        if (pid && !alive(pid))
          throw new Error(`QEMU of ${g.name} exited:\n${this.console(g.name).slice(-3000)}`);
        if (Date.now() - t0 > timeoutMs)
          throw new Error(`${g.name} not ready after ${timeoutMs} ms:\n${this.console(g.name).slice(-3000)}`);
        await sleep(200);
      }
      ready[g.name] = Date.now() - t0;
      this.agents.set(
        g.name,
        await QgaClient.connect(g.qga, Math.max(10_000, timeoutMs - (Date.now() - t0))),
      );
    }
    return ready;
  }

  /** agent is guest `name`'s qemu-ga client (after {@link waitReady}). */
  agent(name: string): QgaClient {
    const a = this.agents.get(name);
    if (!a) throw new Error(`no qemu-ga connection to ${name}`);
    return a;
  }

  /** nsRun runs argv inside the lab namespace on the host. */
  nsRun(argv: string[], opts: { timeoutMs?: number; allowFailure?: boolean } = {}) {
    return this.host.run(["ip", "netns", "exec", this.plan.ns, ...argv], opts);
  }

  /** stop closes the agents, kills QEMU and deletes the namespace; safe to call twice. */
  async stop(): Promise<void> {
    for (const a of this.agents.values()) a.close();
    this.agents.clear();
    const pids = [...this.procs.values()].map((c) => c.pid).filter((x): x is number => !!x);
    await teardownVmLab({ ns: this.plan.ns, workDir: this.plan.workDir, pids: {} }, pids, this.host);
    this.procs.clear();
  }
}

/**
 * teardownVmLab kills `pids` and whatever else runs in the namespace, then deletes it. QEMU is
 * started through `ip netns exec`, which execs, so the pid is QEMU's own.
 */
export async function teardownVmLab(
  st: LabState,
  extraPids: number[] = [],
  host: CommandRunner = new ExecaRunner(),
): Promise<void> {
  const isQemu = (p: number) => {
    try {
      return readFileSync(`/proc/${p}/cmdline`, "utf8").includes("qemu-system");
    } catch {
      return false;
    }
  };
  // Recorded pids only while they still are QEMU (a stale lab.json must not kill a reused pid).
  const pids = new Set([...Object.values(st.pids).filter(isQemu), ...extraPids]);
  const nsPids = await host.run(["ip", "netns", "pids", st.ns], { allowFailure: true });
  for (const p of nsPids.stdout.split(/\s+/).filter(Boolean)) pids.add(Number(p));
  for (const p of pids) {
    try {
      process.kill(p, "SIGKILL");
    } catch {
      // already gone
    }
  }
  for (let i = 0; i < 50 && [...pids].some(alive); i++) await sleep(100);
  await host.run(["ip", "netns", "del", st.ns], { allowFailure: true });
}
