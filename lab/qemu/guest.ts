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
 * - `capsule.hostname=NAME` the guest's hostname; unset = "capsule-guest".
 * - `virtio_mmio.device=...` (what QEMU's microvm adds when ACPI is off) is handed to
 *   `insmod virtio_mmio`, since no modprobe reads /proc/cmdline here.
 * See {@link guestCmdline} for the rest (console, panic, quiet).
 *
 * Outputs, in `outDir`: `vmlinuz-<version>` and `initrd-<hash>.cpio.gz`, the hash covering
 * everything that goes into the initramfs, so a second build with the same inputs only hashes.
 * The unpacked kernel package is cached in `<outDir>/cache/linux-<version>`.
 */
import { createHash } from "node:crypto";
import { existsSync } from "node:fs";
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
  opts: { ip?: string; gw?: string; hostname?: string; extra?: string } = {},
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
    ...(opts.hostname ? [`capsule.hostname=${opts.hostname}`] : []),
    ...(opts.extra ? [opts.extra] : []),
  ].join(" ");
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

function initScript(mods: string[], qga: boolean): string {
  return `#!/bin/sh
# capsule guest /init (lab/qemu/guest.ts)
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /run /tmp /var/run
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /run
arg() { for w in $(cat /proc/cmdline); do case "$w" in "$1"=*) echo "\${w#*=}";; esac; done; }
for m in ${mods.join(" ")}; do
  p=""
  [ "$m" = virtio_mmio ] && for d in $(arg virtio_mmio.device); do p="$p device=$d"; done
  insmod /lib/modules/$m.ko $p || echo "capsule-init: insmod $m failed"
done
h=$(arg capsule.hostname); hostname "\${h:-capsule-guest}"
ip link set lo up
i=0; while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
ip link set eth0 up
ipa=$(arg capsule.ip); gw=$(arg capsule.gw)
[ -n "$ipa" ] && ip addr add "$ipa" dev eth0
[ -n "$gw" ] && ip route add "$gw/32" dev eth0 && ip route add default via "$gw" dev eth0 onlink
httpd -p ${GUEST_HTTP_PORT} -h /www
${
  qga
    ? `for n in /sys/class/virtio-ports/*; do
  [ -e "$n/name" ] || continue
  if [ "$(cat $n/name)" = ${QGA_PORT_NAME} ]; then
    mkdir -p /dev/virtio-ports; ln -sf /dev/\${n##*/} /dev/virtio-ports/${QGA_PORT_NAME}
    mkdir -p /var/lib/qemu-ga /var/log
    ${QEMU_GA} -m virtio-serial -p /dev/virtio-ports/${QGA_PORT_NAME} -t /run -d -f /run/qemu-ga.pid && echo "capsule-init: qemu-ga started"
  fi
done`
    : ""
}
echo "${READY_MARKER} ip=$ipa"
while true; do sleep 3600; done
`;
}

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
  const modFiles = await moduleClosure(modDir, opts.modules ?? GUEST_MODULES);
  const modNames = modFiles.map(normMod);
  const files: Record<string, Buffer | string> = {
    "www/index.html": GUEST_HTTP_BODY,
    ...opts.files,
    init: initScript(modNames, qga),
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
        await writeFile(join(root, p), c, { mode: p === "init" ? 0o755 : 0o644 });
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
