/**
 * The QEMU command line of a microVM workload (pure): {@link planQemuArgv} turns a
 * {@link QemuSpec} into argv for `qemu-system-x86_64`, the same spec giving the same argv.
 *
 * Conventions (QEMU 7.2, Debian 12):
 * - Machine `microvm,x-option-roms=off,isa-serial=on,rtc=on`: no PCI, no firmware option ROMs;
 *   devices are virtio-mmio (`virtio-*-device`), announced to the guest through ACPI (microvm's
 *   default), so the guest kernel needs CONFIG_VIRTIO_MMIO (Debian's cloud kernel has it as a
 *   module: the initrd must load `virtio_mmio`, `virtio_blk`, `virtio_net`, `virtio_console`).
 *   The ISA serial port is kept for the console (`console=ttyS0`, written to `serialLog`) because
 *   it works before any module loads; the RTC gives the guest wall-clock time under TCG too.
 * - `-nodefaults -no-user-config -display none -no-reboot`: nothing implicit; a guest reboot ends
 *   QEMU so the supervisor decides about the restart. No `-daemonize`: its fork is a spawn the
 *   sandbox denies (SIGSYS, verified), so the caller starts QEMU detached itself.
 * - `-accel kvm|tcg`, `-cpu` (default `host` for KVM, `max` for TCG; pass the model
 *   `detectAccel` ran, e.g. `qemu64` where `host` fails), `-smp`, `-m <memoryMib>M`.
 * - Network: one `-netdev tap,ifname=<tap>,script=no,downscript=no` (the TAP already exists and
 *   is wired by the caller) behind `virtio-net-device` with the workload's MAC: eth0 in the guest.
 * - Volumes: each is `-drive file=<path>,format=raw,if=none,id=vol-<name>[,readonly=on]` behind
 *   `virtio-blk-device,serial=<name>`, so the guest finds it as `/dev/disk/by-id/virtio-<name>`
 *   (virtio-blk serials are 20 bytes, so volume names are at most 20 characters here), in spec order.
 * - Control: QMP on the unix socket `qmpSocket` (server, no wait); qemu-guest-agent on a
 *   virtio-serial port named `org.qemu.guest_agent.0` backed by the unix socket `gaSocket`;
 *   entropy from the host's /dev/urandom through `virtio-rng-device`.
 * - Kernel command line: `console=ttyS0 reboot=t panic=1 capsule.name=<name>
 *   capsule.ip=<address>/32 capsule.gw=<gateway> capsule.mac=<mac> [capsule.gwmac=<mac>]
 *   [capsule.vol=<volume>:<mountPath> ...]`, then `cmdline` if given.
 *   The guest's init configures eth0 from the `capsule.*` keys: the address as a /32, the
 *   gateway as an on-link default route (the host side answers for it, as for containers).
 * - `-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny` when
 *   `sandbox` ({@link QEMU_SANDBOX_RUNAS}, with `elevateprivileges=allow`, when `runAs` is given
 *   too); `-runas` when `runAs` is given (QEMU 7.2 takes a user name, whose primary group is
 *   used, or numeric `uid:gid`). QEMU opens the kernel, initrd, volumes, TAP, log and sockets
 *   before it drops privileges.
 *
 * Paths go into QEMU's `key=value,...` option syntax, where a comma is written as two commas;
 * {@link qemuOptValue} does that.
 */
import { invalidArgument } from "../../errors.js";
import { SOCKET_PATH_MAX, socketPathFits } from "../host/socket-path.js";

/** QemuVolume is one block device or image file given to the guest. */
export interface QemuVolume {
  /** name is the volume's name: a DNS label of at most 20 characters (the virtio-blk serial). */
  name: string;
  /** path is an absolute path to a block device or a raw image file. */
  path: string;
  readOnly?: boolean;
  /** mountPath is where the guest's init mounts it (`capsule.vol=<name>:<mountPath>`); unset = not mounted. */
  mountPath?: string;
}

/** QemuSpec is everything {@link planQemuArgv} needs. */
export interface QemuSpec {
  /** name is the workload's name: a DNS label. */
  name: string;
  accel: "kvm" | "tcg";
  /** cpu is the `-cpu` model; default `host` for KVM, `max` for TCG. */
  cpu?: string;
  cpus: number;
  memoryMib: number;
  /** kernel is an absolute path to the guest kernel. */
  kernel: string;
  /** initrd is an absolute path to the initial ramdisk. */
  initrd?: string;
  /** cmdline is appended to the kernel command line after the `capsule.*` keys. */
  cmdline?: string;
  /** tap is the name of the existing TAP interface the guest's eth0 is wired to. */
  tap: string;
  /** mac is the guest's eth0 address: unicast, lower-case, colon-separated. */
  mac: string;
  /** address is the workload's fabric IPv4 (in 100.64.0.0/10). */
  address: string;
  /** gateway is the IPv4 the guest routes through (on-link). */
  gateway: string;
  /** gatewayMac is the MAC of the host side of the TAP (`capsule.gwmac=`): the guest pins it, as the host answers no ARP for the gateway. */
  gatewayMac?: string;
  volumes: QemuVolume[];
  /** qmpSocket is the unix socket path QEMU listens on for QMP. */
  qmpSocket: string;
  /** gaSocket is the unix socket path QEMU listens on for the guest agent channel. */
  gaSocket: string;
  /** serialLog is the file the guest console (ttyS0) is appended to. */
  serialLog: string;
  sandbox: boolean;
  /** runAs drops QEMU's privileges after start-up. */
  runAs?: { user: string; group?: string };
}

/** QEMU_MACHINE is the `-machine` value every microVM uses. */
export const QEMU_MACHINE = "microvm,x-option-roms=off,isa-serial=on,rtc=on";

/** QEMU_SANDBOX is the `-sandbox` value used when {@link QemuSpec.sandbox} is on. */
export const QEMU_SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/**
 * QEMU_SANDBOX_RUNAS is the `-sandbox` value when `runAs` is given too. QEMU 7.2 installs the
 * seccomp filter before it drops privileges, so `elevateprivileges=deny` kills it with SIGSYS
 * at its own setgid/setuid (verified). Allowing set*id costs little here: after the drop QEMU
 * has no capabilities left to regain, and `spawn=deny` stops it from exec'ing a setuid binary.
 */
export const QEMU_SANDBOX_RUNAS = "on,obsolete=deny,elevateprivileges=allow,spawn=deny,resourcecontrol=deny";

/** GUEST_AGENT_PORT is the virtio-serial port name qemu-guest-agent looks for. */
export const GUEST_AGENT_PORT = "org.qemu.guest_agent.0";

/** MAX_CPUS and MAX_MEMORY_MIB bound a microVM; MIN_MEMORY_MIB is what a Linux guest needs to boot. */
export const MAX_CPUS = 64;
export const MIN_MEMORY_MIB = 64;
export const MAX_MEMORY_MIB = 1024 * 1024;

const NAME = /^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$/;
/** MAX_VOLUME_NAME is the longest volume name a guest can find: the virtio-blk serial has 20 bytes. */
export const MAX_VOLUME_NAME = 20;
const VOLUME_NAME = /^[a-z0-9](?:[a-z0-9-]{0,18}[a-z0-9])?$/;
const IFNAME = /^[A-Za-z0-9_.-]{1,15}$/;
const MAC = /^[0-9a-f]{2}(?::[0-9a-f]{2}){5}$/;
const CPU_MODEL = /^[A-Za-z0-9][A-Za-z0-9_.-]*(?:,[+-]?[A-Za-z0-9_.-]+(?:=[A-Za-z0-9_.-]+)?)*$/;
const POSIX_NAME = /^[A-Za-z_][A-Za-z0-9_.-]{0,31}$/;
const NUMERIC = /^[0-9]{1,10}$/;
const MOUNT_PATH = /^\/[A-Za-z0-9_./-]{0,200}$/;

/** isGuestMountPath says whether `p` can travel on the kernel command line as a `capsule.vol` mount path (pure). */
export function isGuestMountPath(p: string): boolean {
  return MOUNT_PATH.test(p);
}

/** setsCapsuleKey says whether an extra kernel command line sets a `capsule.*` key, which only the spec may (pure). */
export function setsCapsuleKey(cmdline: string): boolean {
  return /(?:^|\s)capsule\./.test(cmdline);
}

/** qemuOptValue escapes a value for QEMU's `key=value,...` syntax: a comma is written twice. */
export function qemuOptValue(v: string): string {
  return v.replaceAll(",", ",,");
}

/** parseIPv4 returns the four octets of a dotted quad, or undefined. */
function parseIPv4(s: string): number[] | undefined {
  const parts = s.split(".");
  if (parts.length !== 4) return undefined;
  const out: number[] = [];
  for (const p of parts) {
    if (!/^(?:0|[1-9][0-9]{0,2})$/.test(p)) return undefined;
    const n = Number(p);
    if (n > 255) return undefined;
    out.push(n);
  }
  return out;
}

function checkPath(field: string, p: string, socket = false): void {
  if (!p.startsWith("/")) throw invalidArgument(field, `"${p}" is not an absolute path`);
  if (/[\0\n]/.test(p)) throw invalidArgument(field, "contains a NUL byte or a newline");
  if (socket && !socketPathFits(p))
    throw invalidArgument(field, `is longer than ${SOCKET_PATH_MAX} bytes`, "use a shorter socket path");
}

/** validateQemuSpec checks a spec before any effect; throws CAPSULE_INVALID_ARGUMENT naming the field. */
export function validateQemuSpec(spec: QemuSpec): void {
  if (!NAME.test(spec.name))
    throw invalidArgument("name", `"${spec.name}" is not a workload name`, "use a DNS label: a-z, 0-9, '-'");
  if ((spec.accel as string) !== "kvm" && (spec.accel as string) !== "tcg")
    throw invalidArgument(
      "accel",
      `"${String(spec.accel)}" is not kvm or tcg`,
      "run detectAccel; if it says none: apt-get install qemu-system-x86",
    );
  if (spec.cpu !== undefined && !CPU_MODEL.test(spec.cpu))
    throw invalidArgument("cpu", `"${spec.cpu}" is not a CPU model`, "e.g. host, max or qemu64");
  if (spec.cpu === "host" && spec.accel !== "kvm")
    throw invalidArgument("cpu", "host needs accel kvm", "use max with tcg");
  if (!Number.isInteger(spec.cpus) || spec.cpus < 1 || spec.cpus > MAX_CPUS)
    throw invalidArgument("cpus", `${spec.cpus} is not a whole number from 1 to ${MAX_CPUS}`);
  if (!Number.isInteger(spec.memoryMib) || spec.memoryMib < MIN_MEMORY_MIB || spec.memoryMib > MAX_MEMORY_MIB)
    throw invalidArgument(
      "memoryMib",
      `${spec.memoryMib} is not a whole number from ${MIN_MEMORY_MIB} to ${MAX_MEMORY_MIB}`,
    );
  checkPath("kernel", spec.kernel);
  if (spec.initrd !== undefined) checkPath("initrd", spec.initrd);
  if (spec.cmdline !== undefined) {
    if (/[\0\n]/.test(spec.cmdline)) throw invalidArgument("cmdline", "contains a NUL byte or a newline");
    if (setsCapsuleKey(spec.cmdline))
      throw invalidArgument("cmdline", "sets a capsule.* key", "capsule.* keys come from the spec");
  }
  if (!IFNAME.test(spec.tap))
    throw invalidArgument("tap", `"${spec.tap}" is not an interface name`, "1 to 15 of A-Z a-z 0-9 _ . -");
  if (!MAC.test(spec.mac))
    throw invalidArgument(
      "mac",
      `"${spec.mac}" is not a MAC address`,
      "six lower-case hex pairs, colon-separated",
    );
  if ((parseInt(spec.mac.slice(0, 2), 16) & 1) !== 0)
    throw invalidArgument(
      "mac",
      `"${spec.mac}" is a multicast address`,
      "clear the lowest bit of the first octet",
    );
  const addr = parseIPv4(spec.address);
  if (!addr) throw invalidArgument("address", `"${spec.address}" is not an IPv4 address`);
  if (addr[0] !== 100 || (addr[1]! & 0xc0) !== 64)
    throw invalidArgument("address", `${spec.address} is not in the fabric range 100.64.0.0/10`);
  if (!parseIPv4(spec.gateway)) throw invalidArgument("gateway", `"${spec.gateway}" is not an IPv4 address`);
  if (spec.gatewayMac !== undefined && !MAC.test(spec.gatewayMac))
    throw invalidArgument(
      "gatewayMac",
      `"${spec.gatewayMac}" is not a MAC address`,
      "six lower-case hex pairs, colon-separated",
    );
  if (spec.gateway === spec.address) throw invalidArgument("gateway", "is the workload's own address");
  const seen = new Set<string>();
  spec.volumes.forEach((v, i) => {
    if (!VOLUME_NAME.test(v.name))
      throw invalidArgument(
        `volumes[${i}].name`,
        `"${v.name}" is not a microVM volume name`,
        "use a DNS label of at most 20 characters (the virtio-blk serial)",
      );
    if (seen.has(v.name)) throw invalidArgument(`volumes[${i}].name`, `"${v.name}" is given twice`);
    seen.add(v.name);
    checkPath(`volumes[${i}].path`, v.path);
    if (v.mountPath !== undefined && !isGuestMountPath(v.mountPath))
      throw invalidArgument(
        `volumes[${i}].mountPath`,
        `"${v.mountPath}" is not a mount path the guest can take`,
        "an absolute path of letters, digits and / . _ -",
      );
  });
  checkPath("qmpSocket", spec.qmpSocket, true);
  checkPath("gaSocket", spec.gaSocket, true);
  if (spec.gaSocket === spec.qmpSocket) throw invalidArgument("gaSocket", "is the same path as qmpSocket");
  checkPath("serialLog", spec.serialLog);
  if (spec.runAs !== undefined) {
    const { user, group } = spec.runAs;
    if (group === undefined) {
      if (!POSIX_NAME.test(user) && !NUMERIC.test(user))
        throw invalidArgument("runAs.user", `"${user}" is not a user name`);
    } else {
      if (!NUMERIC.test(user))
        throw invalidArgument(
          "runAs.user",
          `"${user}" is not a numeric uid`,
          "QEMU 7.2 takes a group only as uid:gid",
        );
      if (!NUMERIC.test(group))
        throw invalidArgument(
          "runAs.group",
          `"${group}" is not a numeric gid`,
          "QEMU 7.2 takes a group only as uid:gid",
        );
    }
  }
}

/** kernelCmdline is the guest kernel's command line (pure); see the module comment. */
export function kernelCmdline(spec: QemuSpec): string {
  const parts = [
    "console=ttyS0",
    "reboot=t",
    "panic=1",
    `capsule.name=${spec.name}`,
    `capsule.ip=${spec.address}/32`,
    `capsule.gw=${spec.gateway}`,
    `capsule.mac=${spec.mac}`,
    ...(spec.gatewayMac ? [`capsule.gwmac=${spec.gatewayMac}`] : []),
    ...spec.volumes.flatMap((v) => (v.mountPath ? [`capsule.vol=${v.name}:${v.mountPath}`] : [])),
  ];
  const extra = spec.cmdline?.trim();
  if (extra) parts.push(extra);
  return parts.join(" ");
}

/** planQemuArgv is the full command line, `qemu-system-x86_64` first (pure); validates first. */
export function planQemuArgv(spec: QemuSpec): string[] {
  validateQemuSpec(spec);
  const o = qemuOptValue;
  const argv = [
    "qemu-system-x86_64",
    "-name",
    `guest=${spec.name},debug-threads=on`,
    "-machine",
    QEMU_MACHINE,
    "-accel",
    spec.accel,
    "-cpu",
    spec.cpu ?? (spec.accel === "kvm" ? "host" : "max"),
    "-smp",
    String(spec.cpus),
    "-m",
    `${spec.memoryMib}M`,
    "-nodefaults",
    "-no-user-config",
    "-display",
    "none",
    "-no-reboot",
  ];

  if (spec.sandbox) argv.push("-sandbox", spec.runAs === undefined ? QEMU_SANDBOX : QEMU_SANDBOX_RUNAS);
  if (spec.runAs !== undefined)
    argv.push(
      "-runas",
      spec.runAs.group === undefined ? spec.runAs.user : `${spec.runAs.user}:${spec.runAs.group}`,
    );
  argv.push("-kernel", spec.kernel);
  if (spec.initrd !== undefined) argv.push("-initrd", spec.initrd);
  argv.push(
    "-append",
    kernelCmdline(spec),
    "-chardev",
    `file,id=serial0,path=${o(spec.serialLog)},append=on`,
    "-serial",
    "chardev:serial0",
    "-chardev",
    `socket,id=qmp0,path=${o(spec.qmpSocket)},server=on,wait=off`,
    "-mon",
    "chardev=qmp0,mode=control",
    "-device",
    "virtio-serial-device,id=vser0",
    "-chardev",
    `socket,id=ga0,path=${o(spec.gaSocket)},server=on,wait=off`,
    "-device",
    `virtserialport,bus=vser0.0,chardev=ga0,name=${GUEST_AGENT_PORT}`,
    "-object",
    "rng-random,id=rng0,filename=/dev/urandom",
    "-device",
    "virtio-rng-device,rng=rng0",
    "-netdev",
    `tap,id=net0,ifname=${spec.tap},script=no,downscript=no`,
    "-device",
    `virtio-net-device,netdev=net0,mac=${spec.mac}`,
  );
  for (const v of spec.volumes) {
    argv.push(
      "-drive",
      `file=${o(v.path)},format=raw,if=none,id=vol-${v.name}${v.readOnly ? ",readonly=on" : ""}`,
      "-device",
      `virtio-blk-device,drive=vol-${v.name},serial=${v.name}`,
    );
  }
  return argv;
}
