import t from "tap";
import { volumeService } from "../../src/node/api/volume-service.js";
import { FakeRunner } from "../../src/node/host/runner.js";
import { Store } from "../../src/node/store/store.js";
import {
  detectBackend,
  LoopVolumes,
  parseLosetupJ,
  parseSize,
  validateVolumeName,
} from "../../src/node/workloads/volumes.js";

const S = "/var/lib/capsule";
const IMG = `${S}/volumes/data.img`;
const MNT = `${S}/volumes/mnt/data`;
const NOW = () => new Date("2026-01-02T03:04:05.000Z");

/**
 * HostModel answers findmnt and losetup like a host would, from a little model of mounts and
 * loop devices that the recorded mount/umount/losetup commands update.
 */
function hostModel() {
  const mounts = new Map<string, string>(); // target -> source
  const loops = new Map<string, string>(); // device -> file
  let next = 7;
  const fake = new FakeRunner().on((argv) => {
    const [cmd, ...a] = argv;
    if (cmd === "findmnt") {
      const src = mounts.get(a[a.length - 1]!);
      return src ? { stdout: `${src}\n` } : { exitCode: 1 };
    }
    if (cmd === "losetup" && a[0] === "-j")
      return {
        stdout: [...loops]
          .filter(([, f]) => f === a[1])
          .map(([d, f]) => `${d}: []: (${f})\n`)
          .join(""),
      };
    if (cmd === "losetup" && a[0] === "--find") {
      const dev = `/dev/loop${next++}`;
      loops.set(dev, a[2]!);
      return { stdout: `${dev}\n` };
    }
    if (cmd === "losetup" && a[0] === "-d") loops.delete(a[1]!);
    if (cmd === "mount") mounts.set(a[a.length - 1]!, a[a.length - 2]!);
    if (cmd === "umount") mounts.delete(a[0]!);
    return undefined;
  });
  return { fake, mounts, loops };
}

const setup = () => {
  const store = Store.open(":memory:");
  const h = hostModel();
  const v = new LoopVolumes({ store, runner: h.fake, stateDir: S, now: NOW });
  return { store, v, ...h };
};

t.test("parseSize", async (t) => {
  t.equal(parseSize("1Gi"), 1024 ** 3);
  t.equal(parseSize("512Mi"), 512 * 1024 ** 2);
  t.equal(parseSize("100M"), 100e6);
  t.equal(parseSize("16Mi"), 16 * 1024 ** 2, "the minimum is allowed");
  t.equal(parseSize("33554432"), 33554432);
  t.equal(parseSize("2G"), 2e9);
  for (const bad of ["", "1.5Gi", "1gi", "-1", "1 Gi", "1GiB", "15Mi", "16M", "17Ti", "99999999999999999"])
    t.throws(() => parseSize(bad), { code: "CAPSULE_INVALID_ARGUMENT" }, bad);
});

t.test("volume names are DNS labels", async (t) => {
  t.doesNotThrow(() => validateVolumeName("pg-data-1"));
  for (const bad of ["", "Data", "-a", "a-", "a_b", "a.b", "../x", "a".repeat(64)])
    t.throws(() => validateVolumeName(bad), { code: "CAPSULE_INVALID_ARGUMENT" }, bad);
});

t.test("parseLosetupJ", async (t) => {
  t.same(parseLosetupJ("/dev/loop12: [2049]:55 (/x.img)\n/dev/loop3: [2049]:55 (/x.img)\n"), [
    "/dev/loop3",
    "/dev/loop12",
  ]);
  t.same(parseLosetupJ(""), []);
});

t.test("detectBackend: loop unless a configured thin pool is there", async (t) => {
  const none = new FakeRunner();
  t.match(await detectBackend(none, undefined), {
    backend: "loop-ext4",
    reason: "no LVM thin pool configured",
  });
  t.same(none.commands, [], "no thin pool configured: lvs is not even run");
  const missing = new FakeRunner().on(() => ({ exitCode: 5, stderr: 'Volume group "vg0" not found\n' }));
  t.match(await detectBackend(missing, "vg0/thin"), { backend: "loop-ext4", reason: /vg0.*not found/ });
  const notThin = new FakeRunner().on(() => ({ stdout: "  -wi-a-----\n" }));
  t.match(await detectBackend(notThin, "vg0/thin"), { backend: "loop-ext4", reason: /not a thin pool/ });
  const thin = new FakeRunner().on(() => ({ stdout: "  twi-a-tz--\n" }));
  t.same(await detectBackend(thin, "vg0/thin"), {
    backend: "lvm-thin",
    thinPool: "vg0/thin",
    reason: "thin pool vg0/thin",
  });
  t.same(thin.commands, ["lvs --noheadings -o lv_attr vg0/thin"]);
  await t.rejects(detectBackend(thin, "vg0/thin; rm"), { code: "CAPSULE_INVALID_ARGUMENT" });
});

t.test("create: sparse file, ext4, one row; refusals change nothing", async (t) => {
  const { v, fake } = setup();
  await v.start();
  const vol = await v.create("data", "32Mi");
  t.same(vol, {
    name: "data",
    sizeBytes: 33554432,
    backend: "loop-ext4",
    path: IMG,
    device: undefined,
    usedBy: undefined,
    createdAt: "2026-01-02T03:04:05.000Z",
  });
  t.same(fake.commands, [
    `mkdir -p -m 700 ${S}/volumes`,
    `rm -f ${IMG}`,
    `truncate -s 33554432 ${IMG}`,
    `mkfs.ext4 -q -F -L data ${IMG}`,
  ]);
  fake.commands.length = 0;
  await t.rejects(v.create("data", "1Gi"), { code: "CAPSULE_ALREADY_EXISTS" });
  await t.rejects(v.create("Bad", "1Gi"), { code: "CAPSULE_INVALID_ARGUMENT" });
  await t.rejects(v.create("small", "1Mi"), { code: "CAPSULE_INVALID_ARGUMENT" });
  t.same(fake.commands, [], "nothing ran");
});

t.test("create: a failed mkfs removes the image and records nothing", async (t) => {
  const { v, fake } = setup();
  fake.on((argv) => (argv[0] === "mkfs.ext4" ? { exitCode: 1, stderr: "no space" } : undefined));
  await t.rejects(v.create("data", "32Mi"), { code: "CAPSULE_COMMAND_FAILED" });
  t.equal(fake.commands.at(-1), `rm -f ${IMG}`);
  t.same(v.list(), []);
});

t.test("create on lvm-thin", async (t) => {
  const store = Store.open(":memory:");
  const fake = new FakeRunner().on((argv) => (argv[0] === "lvs" ? { stdout: "twi-a-tz--" } : undefined));
  const v = new LoopVolumes({ store, runner: fake, stateDir: S, thinPool: "vg0/thin", now: NOW });
  await v.start();
  const vol = await v.create("data", "1Gi");
  t.match(vol, { backend: "lvm-thin", path: "/dev/vg0/capsule-data" });
  t.same(fake.commands.slice(-2), [
    "lvcreate -q -T vg0/thin -V 1073741824b -n capsule-data",
    "mkfs.ext4 -q -F -L data /dev/vg0/capsule-data",
  ]);
  fake.commands.length = 0;
  t.equal(await v.attach("data", "web"), MNT);
  t.same(fake.commands.slice(-2), [
    `mkdir -p ${MNT}`,
    `mount -t ext4 -o nodev,nosuid /dev/vg0/capsule-data ${MNT}`,
  ]);
  await v.detach("data", "web");
  fake.commands.length = 0;
  t.equal(await v.delete("data"), true);
  t.ok(fake.commands.includes("lvremove -q -y vg0/capsule-data"));
});

t.test("attach / detach: exact commands, holder persisted, one workload at a time", async (t) => {
  const { store, v, fake, mounts, loops } = setup();
  await v.create("data", "32Mi");
  fake.commands.length = 0;
  t.equal(await v.attach("data", "web"), MNT);
  t.same(fake.commands, [
    `findmnt -rn -o SOURCE --mountpoint ${MNT}`,
    `mkdir -p ${MNT}`,
    `losetup -j ${IMG}`,
    `losetup --find --show ${IMG}`,
    `mount -t ext4 -o nodev,nosuid /dev/loop7 ${MNT}`,
  ]);
  t.match(v.list(), [{ name: "data", device: "/dev/loop7", usedBy: "web" }]);
  t.same(store.db.prepare("SELECT used_by FROM volumes").get(), { used_by: "web" }, "holder is in SQLite");

  fake.commands.length = 0;
  t.equal(await v.attach("data", "web"), MNT, "idempotent");
  t.same(fake.commands, [`findmnt -rn -o SOURCE --mountpoint ${MNT}`], "only looks");

  t.throws(() => v.check("data", "db"), {
    code: "CAPSULE_FAILED_PRECONDITION",
    details: { workload: "web" },
  });
  await t.rejects(v.attach("data", "db"), { code: "CAPSULE_FAILED_PRECONDITION" });
  await t.rejects(v.attach("nope", "db"), { code: "CAPSULE_NOT_FOUND" });
  await t.rejects(v.delete("data"), {
    code: "CAPSULE_FAILED_PRECONDITION",
    message: "volume data is in use by workload web",
    hint: /stop or delete workload web/,
  });

  fake.commands.length = 0;
  await v.detach("data", "db");
  t.same(fake.commands, [], "detach by a non-holder changes nothing");
  await v.detach("data", "web");
  t.same(fake.commands, [
    `findmnt -rn -o SOURCE --mountpoint ${MNT}`,
    `sync -f ${MNT}`,
    `umount ${MNT}`,
    `losetup -j ${IMG}`,
    "losetup -d /dev/loop7",
  ]);
  t.equal(mounts.size + loops.size, 0);
  t.match(v.list(), [{ device: undefined, usedBy: undefined }]);
  fake.commands.length = 0;
  await v.detach("data", "web");
  t.same(fake.commands, [], "detach again is a no-op");
});

t.test("attach: a failed mount undoes the claim and the new loop device", async (t) => {
  const { v, fake, loops } = setup();
  await v.create("data", "32Mi");
  fake.on((argv) => (argv[0] === "mount" ? { exitCode: 32, stderr: "wrong fs type" } : undefined));
  await t.rejects(v.attach("data", "web"), { code: "CAPSULE_COMMAND_FAILED" });
  t.equal(fake.commands.at(-1), "losetup -d /dev/loop7");
  t.equal(loops.size, 0);
  t.match(v.list(), [{ usedBy: undefined }]);
  t.doesNotThrow(() => v.check("data", "db"), "free for anyone again");
});

t.test("adopt: keeps held mounts, frees stray loops, unmounts ownerless mounts", async (t) => {
  const { store, fake, mounts, loops } = setup();
  const first = new LoopVolumes({ store, runner: fake, stateDir: S, now: NOW });
  for (const n of ["a", "b", "c"]) await first.create(n, "16Mi");
  await first.attach("a", "web");
  // b: a crash between losetup and mount left a loop device; c: mounted outside our records.
  loops.set("/dev/loop20", `${S}/volumes/b.img`);
  loops.set("/dev/loop21", `${S}/volumes/c.img`);
  mounts.set(`${S}/volumes/mnt/c`, "/dev/loop21");

  const again = new LoopVolumes({ store, runner: fake, stateDir: S, now: NOW });
  fake.commands.length = 0;
  t.same(await again.start(), [
    "volume b: detached stray loop device /dev/loop20",
    "volume c: unmounted (no workload holds it)",
  ]);
  t.notOk(
    fake.commands.some((c) => c.includes("mnt/a") && !c.startsWith("findmnt")),
    "a's mount is left alone",
  );
  t.match(again.list(), [
    { name: "a", device: "/dev/loop7", usedBy: "web" },
    { name: "b", device: undefined, usedBy: undefined },
    { name: "c", device: undefined, usedBy: undefined },
  ]);
  t.same([...loops.keys()], ["/dev/loop7"]);
  t.same([...mounts.keys()], [`${S}/volumes/mnt/a`]);
  fake.commands.length = 0;
  t.same(await again.adopt(), [], "adopt again changes nothing");
  t.notOk(
    fake.commands.some((c) => !/^(findmnt|losetup -j)/.test(c)),
    "only looks",
  );
});

t.test("delete: removes loop leftovers, the image and the row; missing is false", async (t) => {
  const { v, fake } = setup();
  await v.create("data", "32Mi");
  fake.commands.length = 0;
  t.equal(await v.delete("data"), true);
  t.same(fake.commands, [
    `findmnt -rn -o SOURCE --mountpoint ${MNT}`,
    `losetup -j ${IMG}`,
    `rm -f ${IMG}`,
    `rmdir ${MNT}`,
  ]);
  t.equal(await v.delete("data"), false);
});

t.test("volumeService: handlers map to LoopVolumes; no volumes = FAILED_PRECONDITION", async (t) => {
  const { v } = setup();
  const deps = {
    auth: { authenticate: async () => ({ kind: "operator", id: "op" }) },
    metrics: { rpcRequests: { inc() {} }, rpcDuration: { observe() {} } },
    log: { info() {} },
  } as unknown as Parameters<typeof volumeService>[0];
  const call = <Req, Res>(h: unknown, request: Req) =>
    new Promise<{ err: { details?: string; code?: number } | null; res: Res | undefined }>((resolve) =>
      (h as (c: unknown, cb: (e: unknown, r?: Res) => void) => void)(
        { request, metadata: { get: () => ["token"] } },
        (err, res) => resolve({ err: err as { details?: string; code?: number } | null, res }),
      ),
    );
  const svc = volumeService({ ...deps, volumes: v });
  const created = await call(svc.Create, { name: "data", size: "32Mi" });
  t.same(created.res, {
    name: "data",
    size: "33554432",
    backend: "loop-ext4",
    device: "",
    usedBy: "",
    createdAt: "2026-01-02T03:04:05.000Z",
  });
  t.match((await call(svc.List, {})).res, { volumes: [{ name: "data" }] });
  t.same((await call(svc.Delete, { name: "data" })).res, { deleted: true });
  t.same((await call(svc.Delete, { name: "data" })).res, { deleted: false });
  const off = volumeService({ ...deps, volumes: undefined });
  t.match((await call(off.List, {})).err, { code: 9, details: "workloads are not running on this capsule" });
  t.match((await call(svc.Create, { name: "", size: "1Gi" })).err, { code: 3, details: "name: missing" });
});
