/**
 * Shell scripts the QEMU lab runs inside its guests (through qemu-ga) to exercise what the host
 * kernel lacks: dm-thin, the LIO iSCSI target (configfs directly, no targetcli), the open-iscsi
 * initiator and dm-clone. Pure: each function only builds text; the smoke test and the CLI run
 * them. Every script is `set -e` and bounded (no unbounded waits), and prints `key=value` lines
 * that {@link parseKv} reads back.
 *
 * Disk layout of the initiator guest's `/dev/vda` (sectors of 512 bytes), see {@link LAYOUT}:
 * thin metadata, thin data, clone metadata, clone destination, one after another.
 */
import { dmCloneTable } from "./dmclone.js";

/** LAYOUT places the dm targets on the initiator guest's /dev/vda (start, length in sectors). */
export const LAYOUT = {
  thinMeta: { start: 0, len: 16384 },
  thinData: { start: 16384, len: 131072 },
  cloneMeta: { start: 147456, len: 8192 },
  cloneDest: { start: 155648, len: 32768 },
} as const;

/** CLONE_REGION_SECTORS is dm-clone's region size (64 KiB). */
export const CLONE_REGION_SECTORS = 128;

/** ISCSI_MAGIC is what the target guest writes at offset 0 of the exported disk. */
export const ISCSI_MAGIC = "CAPSULE-ISCSI-HELLO";

/** DM_ENV makes dmsetup work without udev (the guests run none). */
const DM_ENV = "export DM_DISABLE_UDEV=1";

/** parseKv reads `key=value` lines (other lines are ignored). */
export function parseKv(stdout: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const line of stdout.split("\n")) {
    const m = /^([a-z_][a-z0-9_]*)=(.*)$/.exec(line.trim());
    if (m?.[1]) out[m[1]] = m[2] ?? "";
  }
  return out;
}

const linear = (name: string, dev: string, r: { start: number; len: number }) =>
  `dmsetup create ${name} --table "0 ${r.len} linear ${dev} ${r.start}"`;

/**
 * thinScript builds a thin pool on `dev` (metadata and data as in {@link LAYOUT}), a thin volume
 * twice the pool's size (over-provisioned), writes `mib` MiB of random data through it with
 * O_DIRECT, reads it back, and prints both hashes and the pool's status.
 */
export function thinScript(dev = "/dev/vda", mib = 4): string {
  const virt = LAYOUT.thinData.len * 2;
  return `set -e
${DM_ENV}
modprobe dm_thin_pool
${linear("thinmeta", dev, LAYOUT.thinMeta)}
${linear("thindata", dev, LAYOUT.thinData)}
dd if=/dev/zero of=/dev/mapper/thinmeta bs=4096 count=1 2>/dev/null
dmsetup create pool --table "0 ${LAYOUT.thinData.len} thin-pool /dev/mapper/thinmeta /dev/mapper/thindata 128 0"
dmsetup message pool 0 "create_thin 0"
dmsetup create thin0 --table "0 ${virt} thin /dev/mapper/pool 0"
head -c ${mib * 1048576} /dev/urandom > /root/thin.pat
dd if=/root/thin.pat of=/dev/mapper/thin0 bs=1M seek=8 oflag=direct 2>/dev/null
echo "written=$(sha256sum < /root/thin.pat | cut -c1-64)"
echo "read=$(dd if=/dev/mapper/thin0 bs=1M skip=8 count=${mib} iflag=direct 2>/dev/null | sha256sum | cut -c1-64)"
echo "virtual_sectors=$(blockdev --getsz /dev/mapper/thin0)"
echo "pool_status=$(dmsetup status pool)"
echo "thin_status=$(dmsetup status thin0)"
`;
}

/** iscsiIqn is the target name guest `name` exports. */
export function iscsiIqn(name: string): string {
  return `iqn.2024-01.test.capsule:${name}.disk0`;
}

/**
 * iscsiTargetScript (target guest): write {@link ISCSI_MAGIC} plus `mib - 1` MiB of random data
 * at the start of `dev`, export `dev` through LIO (iblock backstore, one iSCSI TPG on
 * `ip:3260`, no authentication, demo-mode ACLs) by writing configfs, and print the data's hash.
 */
export function iscsiTargetScript(name: string, ip: string, dev = "/dev/vda", mib = 16): string {
  const t = "/sys/kernel/config/target";
  const tpg = `${t}/iscsi/${iscsiIqn(name)}/tpgt_1`;
  return `set -e
modprobe -a target_core_mod target_core_iblock iscsi_target_mod
grep -q ' /sys/kernel/config ' /proc/mounts || mount -t configfs configfs /sys/kernel/config
head -c ${mib * 1048576} /dev/urandom > /root/export.img
printf '%s' '${ISCSI_MAGIC}' | dd of=/root/export.img conv=notrunc 2>/dev/null
dd if=/root/export.img of=${dev} bs=1M oflag=direct 2>/dev/null
rm /root/export.img
echo "written=$(dd if=${dev} bs=1M count=${mib} iflag=direct 2>/dev/null | sha256sum | cut -c1-64)"
mkdir -p ${t}/core/iblock_0/disk0
echo udev_path=${dev} > ${t}/core/iblock_0/disk0/control
echo 1 > ${t}/core/iblock_0/disk0/enable
mkdir -p ${tpg}/lun/lun_0
ln -s ${t}/core/iblock_0/disk0 ${tpg}/lun/lun_0/disk0
mkdir ${tpg}/np/${ip}:3260
echo 0 > ${tpg}/attrib/authentication
echo 1 > ${tpg}/attrib/generate_node_acls
echo 0 > ${tpg}/attrib/demo_mode_write_protect
echo 1 > ${tpg}/enable
echo "iqn=${iscsiIqn(name)}"
echo "enabled=$(cat ${tpg}/enable)"
`;
}

/**
 * iscsiLoginScript (initiator guest): start iscsid, discover `ip`, log in to the target of
 * `targetName`, wait (bounded) for its disk, and print the device, the magic and the first
 * `mib` MiB's hash as read over iSCSI.
 */
export function iscsiLoginScript(targetName: string, ip: string, mib = 16): string {
  const iqn = iscsiIqn(targetName);
  return `set -e
modprobe -a iscsi_tcp sd_mod
mkdir -p /var/lib/iscsi /run/lock/iscsi
iscsid 2>/dev/null || true # a second start fails: one is running already
i=0
until out=$(iscsiadm -m discovery -t sendtargets -p ${ip}:3260 2>&1); do
  i=$((i+1)); [ $i -lt 20 ] || { echo "$out" >&2; exit 1; }; sleep 0.5
done
echo "discovered=$(echo "$out" | grep -c '${iqn}')"
iscsiadm -m node -T ${iqn} -p ${ip}:3260 --login >/dev/null
dev=""; i=0
while [ -z "$dev" ] && [ $i -lt 60 ]; do
  dev=$(iscsiadm -m session -P3 2>/dev/null | sed -n 's/.*Attached scsi disk \\([a-z]*\\).*/\\1/p' | head -n1)
  [ -n "$dev" ] && [ -b /dev/$dev ] || { dev=""; i=$((i+1)); sleep 0.5; }
done
[ -n "$dev" ] || { echo "no iSCSI disk appeared" >&2; exit 1; }
echo "dev=/dev/$dev"
echo "magic=$(head -c ${ISCSI_MAGIC.length} /dev/$dev)"
echo "read=$(dd if=/dev/$dev bs=1M count=${mib} iflag=direct 2>/dev/null | sha256sum | cut -c1-64)"
`;
}

/**
 * cloneCreateScript (initiator guest): insmod `ko` (after its in-tree dependencies), create a
 * dm-clone device `clone0` whose source is `source` (the iSCSI disk) and destination and
 * metadata are on `dev` ({@link LAYOUT}), with hydration off; read the data through it and
 * print its hash and status.
 */
export function cloneCreateScript(ko: string, source: string, dev = "/dev/vda"): string {
  const len = LAYOUT.cloneDest.len;
  const table = dmCloneTable({
    sectors: len,
    metadata: "/dev/mapper/clonemeta",
    destination: "/dev/mapper/clonedest",
    source,
    regionSectors: CLONE_REGION_SECTORS,
    features: ["no_hydration"],
  });
  return `set -e
${DM_ENV}
modprobe -a dm_mod dm_persistent_data
grep -q '^dm_clone ' /proc/modules || insmod ${ko}
echo "target=$(dmsetup targets | grep -c '^clone ')"
${linear("clonemeta", dev, LAYOUT.cloneMeta)}
${linear("clonedest", dev, LAYOUT.cloneDest)}
dd if=/dev/zero of=/dev/mapper/clonemeta bs=4096 count=1 2>/dev/null
dmsetup create clone0 --table "${table}"
echo "status_before=$(dmsetup status clone0)"
echo "magic=$(head -c ${ISCSI_MAGIC.length} /dev/mapper/clone0)"
echo "read=$(dd if=/dev/mapper/clone0 bs=1M count=${len / 2048} iflag=direct 2>/dev/null | sha256sum | cut -c1-64)"
echo "status_after_read=$(dmsetup status clone0)"
`;
}

/** cloneHydrateScript starts background hydration of `clone0`. */
export function cloneHydrateScript(): string {
  return `set -e\n${DM_ENV}\ndmsetup message clone0 0 enable_hydration\n`;
}

/** cloneStatusScript prints clone0's status. */
export function cloneStatusScript(): string {
  return `dmsetup status clone0`;
}

/** cloneDestScript hashes the destination device directly (what hydration copied). */
export function cloneDestScript(): string {
  return `echo "dest=$(dd if=/dev/mapper/clonedest bs=1M count=${LAYOUT.cloneDest.len / 2048} iflag=direct 2>/dev/null | sha256sum | cut -c1-64)"\n`;
}
