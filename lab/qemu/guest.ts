/**
 * A tiny microVM guest for tests and the demo: Debian's own kernel (from the package
 * `linux-image-amd64` depends on, downloaded with `apt-get download` and unpacked with
 * `dpkg-deb -x`, never installed on the host) and a busybox initramfs that brings up eth0,
 * serves "hello from a microvm\n" with busybox httpd on :8080, optionally runs qemu-ga on the
 * virtio-serial port `org.qemu.guest_agent.0`, and prints {@link READY_MARKER} on the console.
 *
 * Guest kernel command line (parsed by the guest's /init; the kernel's own `ip=` cannot be
 * used because virtio_net is a module in Debian's kernel, loaded after IP autoconfig ran):
 * - `capsule.ip=ADDR/LEN`  eth0's address (e.g. `100.64.5.2/32`); unset = no address.
 * - `capsule.gw=ADDR`      the host side of the TAP; added as an on-link /32 route and the
 *                          default route (so a /32 guest address works); unset = none.
 * - `capsule.gwmac=MAC`    pins the gateway's MAC as a permanent neighbour entry on eth0
 *                          (`arp -s`, busybox's `ip neigh` cannot add entries): the host side
 *                          of a capsule TAP has no IPv4 address, so it answers no ARP for the
 *                          gateway; unset = ARP as usual.
 * - `capsule.hostname=NAME` the guest's hostname; unset = `capsule.name`, else "capsule-guest".
 * - `capsule.vol=NAME:PATH` mounts the virtio-blk disk whose serial is NAME (found through
 *                          /sys/block/vdX/serial: no udev, so no /dev/disk/by-id) as ext4 at
 *                          PATH (created), read-only when the disk is; repeatable, and one key
 *                          may also carry several, comma-separated (`capsule.vol=a:/a,b:/b`).
 *                          ext4 and its modules ({@link GUEST_FS_MODULES}) load only then.
 * - `virtio_mmio.device=...` (what QEMU's microvm adds when ACPI is off) is handed to
 *   `insmod virtio_mmio`, since no modprobe reads /proc/cmdline here.
 * See {@link guestCmdline} for the rest (console, panic, quiet). Keys of
 * src/node/runtime/qemu-plan.ts's `kernelCmdline` (`capsule.name`, `capsule.mac`, `reboot=k`)
 * are accepted too.
 *
 * Also in the initramfs: a CGI at `/cgi-bin/remote` printing the client's address
 * (`REMOTE_ADDR`), and `/sbin/shutdown`, which qemu-ga's `guest-shutdown` runs (QEMU 7.2:
 * `shutdown -P|-H|-r +0 "hypervisor initiated shutdown"`, stdio on /dev/null, waited for): it
 * stops every process, unmounts the volumes (lazily as a last resort), syncs and powers off,
 * so QEMU exits (`-no-reboot` makes a reboot an exit too).
 *
 * Outputs, in `outDir`: `vmlinuz-<version>` and `initrd-<hash>.cpio.gz`, the hash covering
 * everything that goes into the initramfs, so a second build with the same inputs only hashes.
 * The unpacked kernel package is cached in `<outDir>/cache/linux-<version>`.
 */
import { parseCpuMhz } from "../../src/node/runtime/vms.js";
import { createHash } from "node:crypto";
import { existsSync, readFileSync } from "node:fs";
import {
  copyFile,
  mkdir,
  mkdtemp,
  readdir,
  readFile,
  rename,
  rm,
  symlink,
  writeFile,
} from "node:fs/promises";
import { basename, join, relative } from "node:path";
import { type CommandRunner, ExecaRunner } from "../../src/node/host/runner.js";

/** READY_MARKER is the line /init prints on the console once httpd (and qemu-ga) run. */
export const READY_MARKER = "CAPSULE-GUEST-READY";

/** GUEST_HTTP_PORT is where the guest's httpd listens. */
export const GUEST_HTTP_PORT = 8080;

/** GUEST_HTTP_BODY is what the guest's httpd serves at "/". */
export const GUEST_HTTP_BODY = "hello from a microvm\n";

/** QGA_PORT_NAME is the virtio-serial port name qemu-ga is started on. */
export const QGA_PORT_NAME = "org.qemu.guest_agent.0";

/** BUSYBOX is the static busybox the initramfs is built from. */
export const BUSYBOX = "/bin/busybox";

/** QEMU_GA is where Debian's qemu-guest-agent puts the agent. */
export const QEMU_GA = "/usr/sbin/qemu-ga";

/**
 * GUEST_MODULES are the modules /init loads (with their dependencies, in dependency order):
 * virtio over MMIO (microvm) and PCI (q35), the network, block and console devices. Names
 * that are built into the kernel (modules.builtin) are skipped.
 */
export const GUEST_MODULES = [
  "virtio_mmio",
  "virtio_pci",
  "virtio_net",
  "virtio_blk",
  "virtio_console",
  "virtio_rng",
];

/**
 * GUEST_FS_MODULES are what mounting an ext4 volume needs (with dependencies: jbd2, mbcache,
 * crc16); crc32c is asked for at mount time through the crypto API (metadata checksums), not
 * a module dependency, hence named here. Carried always, loaded only with `capsule.vol`.
 */
export const GUEST_FS_MODULES = ["crc32c_generic", "ext4"];

/** GUEST_APPLETS are the busybox applets in the guest's /bin. */
export const GUEST_APPLETS = [
  "sh",
  "mount",
  "umount",
  "ip",
  "httpd",
  "insmod",
  "modprobe",
  "lsmod",
  "sleep",
  "cat",
  "echo",
  "ls",
  "mkdir",
  "ln",
  "grep",
  "sed",
  "cut",
  "tr",
  "ps",
  "kill",
  "dmesg",
  "hostname",
  "uname",
  "wget",
  "nc",
  "ping",
  "poweroff",
  "reboot",
  "sync",
  "test",
  "[",
  "true",
  "false",
  "seq",
  "head",
  "tail",
  "date",
  "env",
  "arp",
  "killall",
  "df",
  "rm",
  "touch",
  "wc",
  "tee",
];

/** GuestOptions: all fields optional. */
export interface GuestOptions {
  /** kernelPackage is the Debian package to take the kernel from; unset = what `linux-image-amd64` depends on. */
  kernelPackage?: string;
  /** modules to load at boot; unset = {@link GUEST_MODULES}. */
  modules?: string[];
  /** qemuGa: include qemu-ga (binary + ldd libraries from the host); unset = true when {@link QEMU_GA} exists. */
  qemuGa?: boolean;
  /** files are extra regular files in the initramfs (path without leading slash -> content). */
  files?: Record<string, string>;
  /** installTools: `apt-get install` missing cpio/busybox-static/qemu-guest-agent when root; unset = true. */
  installTools?: boolean;
  /** runner runs apt-get, dpkg-deb, ldd, cpio, gzip; unset = a real one. */
  runner?: CommandRunner;
}

/** BuiltGuest is what {@link buildGuest} produced. */
export interface BuiltGuest {
  /** kernel is the bzImage path. */
  kernel: string;
  /** initrd is the gzip'd newc cpio path. */
  initrd: string;
  /** kernelVersion is the kernel's release ("6.1.0-56-amd64"). */
  kernelVersion: string;
  /** modules are the module files in the initramfs, in load order (basenames). */
  modules: string[];
  /** qemuGa says whether the initramfs carries qemu-ga. */
  qemuGa: boolean;
  /** cached says whether both outputs already existed. */
  cached: boolean;
  /** buildMs is how long this call took. */
  buildMs: number;
}

/**
 * guestCmdline is the kernel command line for a guest at `ip` (ADDR/LEN) whose host side is
 * `gw`. `extra` is appended.
 */
export function guestCmdline(
  opts: { ip?: string; gw?: string; gwmac?: string; hostname?: string; vols?: string[]; extra?: string } = {},
): string {
  return [
    "console=ttyS0",
    "panic=-1",
    "quiet",
    "loglevel=3",
    "8250.nr_uarts=1",
    "tsc=reliable",
    "no_timer_check",
    "rdinit=/init",
    ...(opts.ip ? [`capsule.ip=${opts.ip}`] : []),
    ...(opts.gw ? [`capsule.gw=${opts.gw}`] : []),
    ...(opts.gwmac ? [`capsule.gwmac=${opts.gwmac}`] : []),
    ...(opts.hostname ? [`capsule.hostname=${opts.hostname}`] : []),
    ...(opts.vols ?? []).map((v) => `capsule.vol=${v}`),
    ...(opts.extra ? [opts.extra] : []),
  ].join(" ");
}

/**
 * tcgClockCmdline returns `tsc_early_khz=<kHz> lpj=<loops>` for a TCG guest on this host, or ""
 * when /proc/cpuinfo says nothing usable. Under TCG the guest's TSC runs at the host's TSC rate,
 * but the guest kernel cannot measure it: on a busy host (other VMs, load above the core count)
 * its PIT calibration fails ("tsc: Marking TSC unstable due to could not calculate TSC khz") and
 * boot then stalled for minutes in our runs. Giving the rate (from "cpu MHz", the TSC rate on a
 * VM with constant_tsc; a near miss only skews guest time) and the delay-loop value (BogoMIPS
 * × 500000 / HZ, HZ 250 in Debian's kernel) skips both calibrations.
 */
export function tcgClockCmdline(cpuinfo?: string, hz = 250): string {
  let text = cpuinfo;
  if (text === undefined) {
    try {
      text = readFileSync("/proc/cpuinfo", "utf8");
    } catch {
      return "";
    }
  }
  const khz = parseCpuMhz(text);
  const bogo = Number(/^bogomips\s*:\s*([0-9.]+)/m.exec(text)?.[1]);
  const out: string[] = [];
  if (khz) out.push(`tsc_early_khz=${khz}`);
  if (bogo > 0) out.push(`lpj=${Math.round((bogo * 500_000) / hz)}`);
  return out.join(" ");
}

const sha256 = (b: Buffer | string) => createHash("sha256").update(b).digest("hex");
const isRoot = () => process.getuid?.() === 0;

/** normMod maps a module name or file name to its canonical name ("virtio-net.ko.xz" -> "virtio_net"). */
function normMod(s: string): string {
  return basename(s)
    .replace(/\.ko(\.(xz|zst|gz))?$/, "")
    .replace(/-/g, "_");
}

/** modinfoDepends reads the `depends=` entry of a module's .modinfo section (what depmod's modules.dep is made from). */
export function modinfoDepends(ko: Buffer): string[] {
  const i = ko.indexOf("\0depends=");
  if (i < 0) return [];
  const end = ko.indexOf(0, i + 1);
  const v = ko.subarray(i + 9, end).toString("latin1");
  return v ? v.split(",").map(normMod) : [];
}

async function walk(dir: string): Promise<string[]> {
  const out: string[] = [];
  for (const e of await readdir(dir, { withFileTypes: true })) {
    const p = join(dir, e.name);
    if (e.isDirectory()) out.push(...(await walk(p)));
    else out.push(p);
  }
  return out;
}

async function ensureTools(host: CommandRunner, install: boolean): Promise<void> {
  const need: string[] = [];
  const have = async (cmd: string) =>
    (await host.run(["sh", "-c", `command -v ${cmd}`], { allowFailure: true })).exitCode === 0;
  if (!(await have("cpio"))) need.push("cpio");
  if (!existsSync(BUSYBOX)) need.push("busybox-static");
  if (!existsSync(QEMU_GA)) need.push("qemu-guest-agent");
  if (need.length === 0 || !install || !isRoot()) return;
  await host.run(["apt-get", "install", "-y", "--no-install-recommends", ...need], {
    timeoutMs: 600_000,
    env: { DEBIAN_FRONTEND: "noninteractive" },
    allowFailure: true,
  });
}

/** kernelPackageName resolves the versioned image package `linux-image-amd64` depends on. */
export async function kernelPackageName(host: CommandRunner = new ExecaRunner()): Promise<string> {
  const out = (await host.run(["apt-cache", "depends", "linux-image-amd64"])).stdout;
  const m = /Depends:\s*(linux-image-\d\S*)/.exec(out);
  if (!m?.[1]) throw new Error(`no linux-image-* dependency in: ${out}`);
  return m[1];
}

/** fetchKernel returns the unpacked package tree (cached by package name + version) and the kernel release. */
async function fetchKernel(
  host: CommandRunner,
  cacheDir: string,
  pkg: string,
): Promise<{ tree: string; release: string }> {
  const ver = (await host.run(["apt-cache", "policy", pkg])).stdout.match(/Candidate:\s*(\S+)/)?.[1];
  if (!ver || ver === "(none)") throw new Error(`${pkg} has no installable version (apt-get update?)`);
  const tree = join(cacheDir, `${pkg}_${ver}`.replace(/[^A-Za-z0-9._+-]/g, "_"));
  if (!existsSync(join(tree, ".complete"))) {
    await mkdir(cacheDir, { recursive: true });
    const dl = await mkdtemp(join(cacheDir, "dl-"));
    try {
      // apt-get download writes into the working directory; _apt cannot write there, hence the sh.
      await host.run(["sh", "-c", 'cd "$1" && apt-get download "$2"', "sh", dl, `${pkg}=${ver}`], {
        timeoutMs: 600_000,
      });
      const deb = (await readdir(dl)).find((f) => f.endsWith(".deb"));
      if (!deb) throw new Error(`apt-get download ${pkg} wrote no .deb`);
      const tmp = join(dl, "tree");
      await host.run(["dpkg-deb", "-x", join(dl, deb), tmp], { timeoutMs: 300_000 });
      await writeFile(join(tmp, ".complete"), `${pkg} ${ver}\n`);
      await rm(tree, { recursive: true, force: true });
      await rename(tmp, tree);
    } finally {
      await rm(dl, { recursive: true, force: true });
    }
  }
  const vmlinuz = (await readdir(join(tree, "boot"))).find((f) => f.startsWith("vmlinuz-"));
  if (!vmlinuz) throw new Error(`${pkg} has no boot/vmlinuz-*`);
  return { tree, release: vmlinuz.slice("vmlinuz-".length) };
}

/** moduleClosure returns the module files for `wanted` and their dependencies, dependencies first; built-ins are skipped. */
async function moduleClosure(modDir: string, wanted: string[]): Promise<string[]> {
  const builtin = new Set(
    (await readFile(join(modDir, "modules.builtin"), "utf8")).split("\n").filter(Boolean).map(normMod),
  );
  const byName = new Map<string, string>();
  for (const f of await walk(join(modDir, "kernel")))
    if (/\.ko(\.(xz|zst|gz))?$/.test(f)) byName.set(normMod(f), f);
  const order: string[] = [];
  const seen = new Set<string>();
  const visit = async (name: string, chain: string[]): Promise<void> => {
    if (seen.has(name) || builtin.has(name)) return;
    const f = byName.get(name);
    if (!f) throw new Error(`module ${name} is neither built in nor in the package (${chain.join(" <- ")})`);
    seen.add(name);
    const deps = modinfoDepends(await readKo(f));
    for (const d of deps) await visit(d, [name, ...chain]);
    order.push(f);
  };
  for (const m of wanted) await visit(normMod(m), []);
  return order;
}

/** readKo reads a module, decompressing .ko.xz/.ko.zst/.ko.gz (busybox insmod takes plain ELF). */
async function readKo(f: string): Promise<Buffer> {
  if (f.endsWith(".ko")) return readFile(f);
  const { execa } = await import("execa");
  const tool = f.endsWith(".xz") ? "xz" : f.endsWith(".zst") ? "zstd" : "gzip";
  const r = await execa(tool, ["-dc", f], { encoding: "buffer", stripFinalNewline: false });
  return Buffer.from(r.stdout);
}

/** VOLS_FILE lists the mount points /init mounted, one per line, for /sbin/shutdown. */
const VOLS_FILE = "/run/capsule-vols";

function initScript(mods: string[], fsMods: string[], qga: boolean): string {
  return `#!/bin/sh
# capsule guest /init (lab/qemu/guest.ts)
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /run /tmp /var/run
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
log() { echo "capsule-init: $*"; }
arg() { for w in $(cat /proc/cmdline); do case "$w" in "$1"=*) echo "\${w#*=}";; esac; done; }
log "booting, kernel $(uname -r)"
for m in ${mods.join(" ")}; do
  p=""
  [ "$m" = virtio_mmio ] && for d in $(arg virtio_mmio.device); do p="$p device=$d"; done
  insmod /lib/modules/$m.ko $p || log "insmod $m failed"
done
h=$(arg capsule.hostname); [ -n "$h" ] || h=$(arg capsule.name); h=\${h:-capsule-guest}
hostname "$h"; echo "$h" > /etc/hostname
ip link set lo up
i=0; while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
ip link set eth0 up
ipa=$(arg capsule.ip); gw=$(arg capsule.gw); gwmac=$(arg capsule.gwmac)
[ -n "$ipa" ] && ip addr add "$ipa" dev eth0
if [ -n "$gw" ]; then
  ip route add "$gw/32" dev eth0
  # The host side answers no ARP for the gateway: pin its MAC (busybox ip neigh cannot add).
  [ -n "$gwmac" ] && { arp -i eth0 -s "$gw" "$gwmac" || log "arp -s $gw $gwmac failed"; }
  ip route add default via "$gw" dev eth0 onlink
fi
[ -e /sys/class/net/eth0 ] || log "no eth0 after 5 s"
log "eth0 $(cat /sys/class/net/eth0/address 2>/dev/null) address \${ipa:-none} gateway \${gw:-none}\${gwmac:+ at $gwmac}"
: > ${VOLS_FILE}
vols=$(arg capsule.vol | tr , ' ')
if [ -n "$vols" ]; then
  for m in ${fsMods.join(" ")}; do insmod /lib/modules/$m.ko || log "insmod $m failed"; done
  # The virtio-blk disk whose serial is $1 (no udev here, so no /dev/disk/by-id).
  disk() { for f in /sys/block/vd*/serial; do [ -e "$f" ] && [ "$(cat "$f")" = "$1" ] && { d=\${f%/serial}; echo \${d##*/}; return 0; }; done; return 1; }
  for v in $vols; do
    name=\${v%%:*}; mp=\${v#*:}
    i=0; while ! dev=$(disk "$name") && [ $i -lt 30 ]; do sleep 0.1; i=$((i+1)); done
    if [ -z "$dev" ]; then log "volume $name: no virtio disk with serial $name"; continue; fi
    o=rw; [ "$(cat /sys/block/$dev/ro)" = 1 ] && o=ro
    mkdir -p "$mp"
    if mount -t ext4 -o $o "/dev/$dev" "$mp"; then
      echo "$mp" >> ${VOLS_FILE}; log "volume $name: /dev/$dev mounted at $mp ($o)"
    else
      log "volume $name: mounting /dev/$dev at $mp failed"
    fi
  done
fi
httpd -p ${GUEST_HTTP_PORT} -h /www && log "httpd listening on :${GUEST_HTTP_PORT}"
${
  qga
    ? `for n in /sys/class/virtio-ports/*; do
  [ -e "$n/name" ] || continue
  if [ "$(cat $n/name)" = ${QGA_PORT_NAME} ]; then
    mkdir -p /dev/virtio-ports; ln -sf /dev/\${n##*/} /dev/virtio-ports/${QGA_PORT_NAME}
    mkdir -p /var/lib/qemu-ga /var/log
    ${QEMU_GA} -m virtio-serial -p /dev/virtio-ports/${QGA_PORT_NAME} -t /run -d -f /run/qemu-ga.pid && log "qemu-ga started"
  fi
done`
    : ""
}
echo "${READY_MARKER} ip=$ipa"
while true; do sleep 3600; done
`;
}

/**
 * shutdownScript is /sbin/shutdown, what qemu-ga's guest-shutdown runs (QEMU 7.2, Linux:
 * `execle("/sbin/shutdown", "shutdown", "-P"|"-H"|"-r", "+0", "hypervisor initiated shutdown")`
 * with stdio on /dev/null; qemu-ga waits for it and answers only if it fails). Every other
 * process is stopped first, so nothing holds a volume open.
 */
function shutdownScript(): string {
  return `#!/bin/sh
# capsule guest /sbin/shutdown (lab/qemu/guest.ts): [-P|-h|-H|-r] [time] [message]
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
exec >/dev/console 2>&1 </dev/null
mode=poweroff
for a in "$@"; do case "$a" in -r) mode=reboot;; -H|-h) mode=halt;; -P) mode=poweroff;; esac; done
echo "capsule-init: shutting down ($mode)"
killall httpd 2>/dev/null
kill -TERM -1 2>/dev/null; sleep 0.3; kill -KILL -1 2>/dev/null
sync
for mp in $(sed '1!G;h;$!d' ${VOLS_FILE} 2>/dev/null); do
  if umount "$mp" || { sleep 0.3; umount "$mp"; }; then
    echo "capsule-init: unmounted $mp"
  else
    umount -l "$mp" && echo "capsule-init: unmounted $mp (lazily)"
  fi
done
sync
echo "capsule-init: power off"
case "$mode" in
  reboot) reboot -f;;
  *) poweroff -f;;
esac
sleep 2
# Still here: a reboot ends QEMU too (-no-reboot).
reboot -f
`;
}

/** REMOTE_CGI is /www/cgi-bin/remote: the client's address (REMOTE_ADDR), to check an edge keeps it. */
const REMOTE_CGI = `#!/bin/sh
# httpd listens dual-stack, so an IPv4 client is "[::ffff:a.b.c.d]": print the plain address.
a=\${REMOTE_ADDR#\\[}; a=\${a%]}; a=\${a#::ffff:}
printf 'Content-Type: text/plain\\r\\n\\r\\n%s\\n' "$a"
`;

/**
 * buildGuest writes a kernel and an initramfs into `outDir` (created if missing) and returns
 * their paths. Cached: the kernel package is downloaded once per version, the initramfs
 * rebuilt only when its inputs change.
 */
export async function buildGuest(outDir: string, opts: GuestOptions = {}): Promise<BuiltGuest> {
  const t0 = Date.now();
  const host = opts.runner ?? new ExecaRunner();
  await mkdir(outDir, { recursive: true });
  await ensureTools(host, opts.installTools ?? true);
  if (!existsSync(BUSYBOX)) throw new Error(`${BUSYBOX} is missing (apt-get install busybox-static)`);
  const qga = opts.qemuGa ?? existsSync(QEMU_GA);
  if (qga && !existsSync(QEMU_GA))
    throw new Error(`${QEMU_GA} is missing (apt-get install qemu-guest-agent)`);

  const pkg = opts.kernelPackage ?? (await kernelPackageName(host));
  const { tree, release } = await fetchKernel(host, join(outDir, "cache"), pkg);
  const kernel = join(outDir, `vmlinuz-${release}`);
  const kernelCached = existsSync(kernel);
  if (!kernelCached) {
    await copyFile(join(tree, "boot", `vmlinuz-${release}`), `${kernel}.tmp`);
    await rename(`${kernel}.tmp`, kernel);
  }

  // The initramfs inputs, hashed into its name.
  const modDir = join(tree, "lib", "modules", release);
  const bootFiles = await moduleClosure(modDir, opts.modules ?? GUEST_MODULES);
  const modFiles = await moduleClosure(modDir, [...(opts.modules ?? GUEST_MODULES), ...GUEST_FS_MODULES]);
  const modNames = modFiles.map(normMod);
  const bootNames = bootFiles.map(normMod);
  const fsNames = modNames.filter((m) => !bootNames.includes(m));
  const files: Record<string, Buffer | string> = {
    "www/index.html": GUEST_HTTP_BODY,
    "www/cgi-bin/remote": REMOTE_CGI,
    ...opts.files,
    init: initScript(bootNames, fsNames, qga),
    "sbin/shutdown": shutdownScript(),
    "etc/hostname": "capsule-guest\n",
    "etc/passwd": "root:x:0:0:root:/:/bin/sh\n",
    "etc/group": "root:x:0:\n",
  };
  const hostFiles = [BUSYBOX];
  if (qga) {
    const ldd = (await host.run(["ldd", QEMU_GA])).stdout;
    hostFiles.push(QEMU_GA, ...[...ldd.matchAll(/(?:=>\s*)?(\/\S+)\s+\(0x/g)].map((m) => m[1] as string));
  }
  const h = createHash("sha256");
  h.update(`v1\0${pkg}\0${release}\0${GUEST_APPLETS.join(",")}\0`);
  for (const f of modFiles) h.update(`${relative(tree, f)}\0`);
  for (const [p, c] of Object.entries(files)) h.update(`${p}\0${sha256(c)}\0`);
  for (const f of hostFiles) h.update(`${f}\0${sha256(await readFile(f))}\0`);
  const initrd = join(outDir, `initrd-${h.digest("hex").slice(0, 16)}.cpio.gz`);
  const initrdCached = existsSync(initrd);

  if (!initrdCached) {
    const work = await mkdtemp(join(outDir, "initrd-"));
    try {
      const root = join(work, "root");
      for (const d of [
        "bin",
        "sbin",
        "proc",
        "sys",
        "dev",
        "run",
        "tmp",
        "etc",
        "www",
        "lib/modules",
        "var/run",
      ])
        await mkdir(join(root, d), { recursive: true });
      for (const f of hostFiles) {
        const dst = join(root, f === BUSYBOX ? "bin/busybox" : f);
        await mkdir(join(dst, ".."), { recursive: true });
        await writeFile(dst, await readFile(f), { mode: 0o755 });
      }
      for (const a of GUEST_APPLETS) await symlink("busybox", join(root, "bin", a));
      for (const f of modFiles)
        await writeFile(join(root, "lib/modules", `${normMod(f)}.ko`), await readKo(f));
      for (const [p, c] of Object.entries(files)) {
        await mkdir(join(root, p, ".."), { recursive: true });
        // Scripts (init, /sbin/shutdown, CGIs, any "#!" file given) are executable.
        const exe = (typeof c === "string" ? c : c.toString("latin1", 0, 2)).startsWith("#!");
        await writeFile(join(root, p), c, { mode: exe ? 0o755 : 0o644 });
      }
      const tmp = `${initrd}.tmp`;
      // Deterministic: sorted names, uid/gid 0, every mtime the epoch, no gzip name/time.
      await host.run(
        [
          "sh",
          "-c",
          'cd "$1" && find . -exec touch -h -d @0 {} + && find . | LC_ALL=C sort | ' +
            'cpio -o -H newc -R 0:0 --reproducible --quiet | gzip -n -6 > "$2"',
          "sh",
          root,
          tmp,
        ],
        { timeoutMs: 120_000 },
      );
      await rename(tmp, initrd);
    } finally {
      await rm(work, { recursive: true, force: true });
    }
  }
  return {
    kernel,
    initrd,
    kernelVersion: release,
    modules: modNames,
    qemuGa: qga,
    cached: kernelCached && initrdCached,
    buildMs: Date.now() - t0,
  };
}
