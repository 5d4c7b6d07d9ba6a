// The QEMU capsule lab (lab/qemu/vmlab.ts) end to end: two Debian-kernel guests under TCG, each
// a full capsule (root = the host's / over virtio-9p under a tmpfs overlay, running capsuled),
// on a bridge in a throwaway namespace. Proves inside the guests what the host kernel lacks:
// kernel WireGuard (capsuled reports mode "kernel"; the capsules are adopted and enrolled from
// the namespace and ping each other's fabric address over capsule0), dm-thin (pool + thin
// volume, data written and read back), the LIO iSCSI target on guest A and the open-iscsi
// initiator on guest B (B reads what A wrote), and dm-clone (dm-clone.ko built from Debian's
// linux-source against the guest kernel's headers, source = the iSCSI disk, destination local;
// data read through it, hydration progresses to completion). Every wait is bounded; teardown
// kills QEMU and deletes the namespace even when a step fails. Timings go to t.comment.
import { existsSync } from "node:fs";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import t from "tap";
import { parseDmCloneStatus } from "../../lab/qemu/dmclone.js";
import {
  cloneCreateScript,
  cloneDestScript,
  cloneHydrateScript,
  cloneStatusScript,
  ISCSI_MAGIC,
  iscsiLoginScript,
  iscsiTargetScript,
  parseKv,
  thinScript,
} from "../../lab/qemu/scenarios.js";
import { CAPSULED_PORT, planVmLab, prepareBoot, QEMU, VmLab } from "../../lab/qemu/vmlab.js";

const CACHE = process.env.CAPSULE_GUEST_DIR ?? join(tmpdir(), "capsule-guest");
const REPO = fileURLToPath(new URL("../..", import.meta.url)).replace(/\/$/, "");
const CTL = join(REPO, "dist", "src", "cli", "main.js");
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

// A cold cache downloads the kernel and ~150 MB of source/headers and builds dm-clone.ko.
t.setTimeout(900_000);

const missing = [QEMU, "/usr/bin/apt-get", "/usr/sbin/iscsiadm", "/usr/sbin/dmsetup", CTL].filter(
  (f) => !existsSync(f),
);
if (process.getuid?.() !== 0) {
  t.plan(0, "requires superuser privileges (network namespace, TAP)");
} else if (missing.length > 0) {
  t.plan(0, `needs ${missing.join(", ")} (scripts/setup.sh)`);
} else {
  const t0 = Date.now();
  let work = "";
  let lab: VmLab | undefined;
  let boot: Awaited<ReturnType<typeof prepareBoot>> | undefined;
  let ready = false;
  const timings: Record<string, number> = {};
  const time = async <T>(key: string, f: () => Promise<T>): Promise<T> => {
    const s = Date.now();
    try {
      return await f();
    } finally {
      timings[key] = Date.now() - s;
    }
  };

  t.teardown(async () => {
    await lab?.stop();
    if (work) await rm(work, { recursive: true, force: true });
    t.comment(`timings (ms): ${JSON.stringify({ ...timings, total: Date.now() - t0 })}`);
  });

  const A = "capsmk-a";
  const B = "capsmk-b";

  t.test("two capsule guests boot under TCG", async (t) => {
    boot = await time("bootFiles", () => prepareBoot(CACHE));
    t.comment(`boot files (ms): ${JSON.stringify(boot.timings)}`);
    work = await mkdtemp(join(tmpdir(), "capsmk-"));
    const plan = planVmLab({ workDir: work, count: 2, prefix: `capsmk`, repo: REPO });
    t.same(
      plan.guests.map((g) => g.name),
      [A, B],
    );
    lab = new VmLab(plan);
    await time("start", () => lab!.start(boot!));
    const r = await time("ready", () => lab!.waitReady(300_000));
    t.comment(`ready (ms since QEMU start): ${JSON.stringify(r)}`);
    for (const g of plan.guests) {
      const u = await lab.agent(g.name).exec("uname -r; hostname");
      t.equal(u.stdout, `${boot.release}\n${g.name}\n`, `${g.name} runs ${boot.release}`);
    }
    ready = true;
  });

  t.test("kernel WireGuard: capsuled in each guest, adopted, enrolled, pinging over capsule0", async (t) => {
    if (!ready || !lab) return t.fail("guests are not up");
    const l = lab;
    const ctl = (args: string[], allowFailure = false) =>
      l.nsRun(["node", CTL, "--config-dir", join(work, "operator"), "--timeout", "60s", ...args], {
        timeoutMs: 120_000,
        allowFailure,
      });
    const g = (n: string) => l.guest(n);
    await time("adopt", async () => {
      for (const n of [A, B]) {
        // capsuled is started by the guest's init; wait (bounded) for its API to accept the adopt.
        let last = "";
        for (let i = 0; i < 60; i++) {
          const r = await ctl(["adopt", `${g(n).ip}:${CAPSULED_PORT}`, "--name", n, "--yes"], true);
          if (r.exitCode === 0) {
            last = "";
            break;
          }
          last = `${r.stdout}${r.stderr}`;
          await sleep(2_000);
        }
        t.equal(last, "", `adopted ${n}`);
      }
    });
    const info = JSON.parse((await ctl(["--all", "capsule", "info", "-o", "json"])).stdout) as {
      capsule: string;
      wireguardMode: string;
      kernel: string;
    }[];
    for (const n of [A, B]) {
      const i = info.find((x) => x.capsule === n);
      t.equal(i?.wireguardMode, "kernel", `${n}: capsule info says wireguard mode "kernel"`);
      t.equal(i?.kernel, boot?.release, `${n}: capsule info shows the guest kernel`);
    }
    const enroll = await time("enroll", () => ctl(["fabric", "enroll", A, B]));
    t.match(enroll.stdout, /enrolled/, "fabric enroll a b");
    const after = JSON.parse((await ctl(["--all", "capsule", "info", "-o", "json"])).stdout) as {
      capsule: string;
      fabricAddress: string;
    }[];
    const fb = after.find((x) => x.capsule === B)?.fabricAddress ?? "";
    t.match(fb, /^100\.\d+\.\d+\.\d+$/, `${B} has a fabric address (${fb})`);
    const a = l.agent(A);
    const link = await a.exec("ip -d link show capsule0; cat /sys/module/wireguard/initstate");
    t.match(link.stdout, /wireguard/, "capsule0 is a kernel wireguard link");
    t.match(link.stdout, /live/, "the wireguard module is loaded");
    const ping = await time("fabricPing", () =>
      a.exec(`busybox ping -c 3 -W 5 -I capsule0 ${fb}`, { allowFailure: true, timeoutMs: 60_000 }),
    );
    t.equal(ping.exitCode, 0, `${A} pings ${B}'s fabric address over capsule0`, { out: ping.stdout });
    const hs = await a.exec("wg show capsule0 latest-handshakes");
    t.match(hs.stdout, /\t[1-9]\d*\n/, "a WireGuard handshake happened", { out: hs.stdout });
  });

  t.test("dm-thin: pool, over-provisioned thin volume, data written and read back", async (t) => {
    if (!ready || !lab) return t.fail("guests are not up");
    const r = parseKv((await time("thin", () => lab!.agent(B).exec(thinScript()))).stdout);
    t.comment(`pool: ${r.pool_status}; thin: ${r.thin_status}`);
    t.ok(r.written && r.written === r.read, "the thin volume returns what was written");
    t.match(r.pool_status, /thin-pool \d+ \d+\/\d+ [1-9]\d*\/\d+ /, "the pool has allocated data blocks");
    t.equal(Number(r.virtual_sectors), 262144, "the thin volume is twice the pool's data size");
  });

  let iscsiDev = "";
  let exported = "";
  t.test("LIO iSCSI target on A, open-iscsi initiator on B reads A's bytes", async (t) => {
    if (!ready || !lab) return t.fail("guests are not up");
    const tg = parseKv(
      (await time("iscsiTarget", () => lab!.agent(A).exec(iscsiTargetScript(A, lab!.guest(A).ip)))).stdout,
    );
    t.equal(tg.enabled, "1", "the target portal group is enabled");
    exported = tg.written ?? "";
    const li = parseKv(
      (await time("iscsiLogin", () => lab!.agent(B).exec(iscsiLoginScript(A, lab!.guest(A).ip)))).stdout,
    );
    t.equal(li.discovered, "1", "sendtargets discovery finds A's target");
    t.match(li.dev, /^\/dev\/sd[a-z]$/, `the iSCSI disk appeared (${li.dev})`);
    t.equal(li.magic, ISCSI_MAGIC, "B reads A's magic over iSCSI");
    t.equal(li.read, exported, "B reads the same 16 MiB A wrote");
    iscsiDev = li.dev ?? "";
  });

  t.test("dm-clone (built module): source over iSCSI, local destination, hydration", async (t) => {
    if (!ready || !lab || !boot || !iscsiDev) return t.fail("no iSCSI disk to clone from");
    const b = lab.agent(B);
    const c = parseKv(
      (await time("cloneCreate", () => b.exec(cloneCreateScript(boot!.dmClone, iscsiDev)))).stdout,
    );
    t.equal(c.target, "1", "dmsetup targets lists clone after insmod dm-clone.ko");
    t.equal(c.magic, ISCSI_MAGIC, "reads through the clone see the source's bytes");
    t.equal(c.read, exported, "the clone reads as the remote source");
    const before = parseDmCloneStatus(c.status_before ?? "");
    t.equal(before.hydrated, 0, "nothing hydrated while hydration is off");
    await b.exec(cloneHydrateScript());
    const samples: number[] = [];
    await time("hydration", async () => {
      const deadline = Date.now() + 180_000;
      for (;;) {
        const s = parseDmCloneStatus((await b.exec(cloneStatusScript())).stdout);
        samples.push(s.hydrated);
        if (s.hydrated === s.total || Date.now() > deadline) break;
        await sleep(300);
      }
    });
    t.comment(`hydrated regions over time: ${samples.join(" ")} (of ${before.total})`);
    t.ok(
      samples.some((v) => v > 0 && v < before.total),
      "hydration was seen in progress",
    );
    t.ok(
      samples.every((v, i) => i === 0 || v >= (samples[i - 1] ?? 0)),
      "hydrated count never goes down",
    );
    t.equal(samples.at(-1), before.total, "every region hydrated");
    const d = parseKv((await b.exec(cloneDestScript())).stdout);
    t.equal(d.dest, exported, "the local destination now holds the source's data");
  });
}
