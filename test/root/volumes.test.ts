// LoopVolumes against the real losetup/mkfs.ext4/mount. Loop devices are global, not per
// namespace: the teardown detaches exactly the loop devices backed by this test's image files
// (found with `losetup -j`) and unmounts what is under this test's temp dir, whatever happened.
import { existsSync, mkdtempSync, readFileSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import t from "tap";
import { ExecaRunner } from "../../src/node/host/runner.js";
import { Store } from "../../src/node/store/store.js";
import { LoopVolumes, parseLosetupJ } from "../../src/node/workloads/volumes.js";
import { isRoot, RecordingRunner, ROOT_SKIP } from "../helpers/ns.js";

const host = new ExecaRunner();

if (!isRoot()) {
  t.plan(0, ROOT_SKIP);
} else {
  const dir = mkdtempSync(join(tmpdir(), "capsule-vol-"));
  const img = join(dir, "volumes", "data.img");
  const loops = async () => parseLosetupJ((await host.run(["losetup", "-j", img])).stdout);
  const mounts = async () =>
    (await host.run(["findmnt", "-rn", "-o", "TARGET"])).stdout.split("\n").filter((m) => m.startsWith(dir));
  let store: Store | undefined;

  t.teardown(async () => {
    for (const m of (await mounts()).reverse()) await host.run(["umount", "-l", m], { allowFailure: true });
    if (existsSync(img))
      for (const d of await loops()) await host.run(["losetup", "-d", d], { allowFailure: true });
    store?.db.close();
    const left = [...(await mounts()), ...(existsSync(img) ? await loops() : [])];
    await host.run(["rm", "-rf", dir]);
    if (left.length) t.fail(`left behind: ${left.join(", ")}`);
  });

  store = Store.open(join(dir, "state.db"));
  const volumes = () => new LoopVolumes({ store: store!, runner: host, stateDir: dir });
  let v: LoopVolumes;

  t.test("create makes a sparse ext4 image; duplicates and tiny sizes are refused", async (t) => {
    v = volumes();
    t.same(await v.start(), [], "nothing to adopt");
    t.equal(v.backend.backend, "loop-ext4", `backend: ${v.backend.reason}`);
    const vol = await v.create("data", "32Mi");
    t.match(vol, {
      name: "data",
      sizeBytes: 32 * 1024 * 1024,
      backend: "loop-ext4",
      path: img,
      device: undefined,
      usedBy: undefined,
    });
    const st = statSync(img);
    t.equal(st.size, 32 * 1024 * 1024, "the image has the requested size");
    t.ok(st.blocks * 512 < st.size, "and is sparse");
    t.match((await host.run(["blkid", "-o", "value", "-s", "TYPE", img])).stdout.trim(), "ext4");
    await t.rejects(v.create("data", "32Mi"), { code: "CAPSULE_ALREADY_EXISTS" });
    await t.rejects(v.create("small", "8Mi"), { code: "CAPSULE_INVALID_ARGUMENT" });
    t.same((await loops()).length, 0, "create attaches no loop device");
  });

  t.test("attach mounts; one workload at a time; idempotent for the holder", async (t) => {
    const mnt = await v.attach("data", "web");
    t.equal(mnt, join(dir, "volumes", "mnt", "data"));
    writeFileSync(join(mnt, "hello.txt"), "still here\n");
    t.equal(await v.attach("data", "web"), mnt, "attach again returns the same directory");
    t.equal((await loops()).length, 1, "and makes no second loop device");
    t.doesNotThrow(() => v.check("data", "web"));
    t.throws(() => v.check("data", "db"), {
      code: "CAPSULE_FAILED_PRECONDITION",
      message: /in use by workload web/,
    });
    await t.rejects(v.attach("data", "db"), { code: "CAPSULE_FAILED_PRECONDITION" });
    t.throws(() => v.check("nope", "web"), { code: "CAPSULE_NOT_FOUND" });
    const [listed] = v.list();
    t.match(listed, { usedBy: "web", device: /^\/dev\/loop\d+$/ });
  });

  t.test("delete is refused while a workload holds the volume", async (t) => {
    await t.rejects(v.delete("data"), {
      code: "CAPSULE_FAILED_PRECONDITION",
      message: /in use by workload web/,
      hint: /stop or delete workload web/,
    });
    t.ok(existsSync(img));
  });

  t.test("a restarted capsuled adopts the mounted volume without touching it", async (t) => {
    const rec = new RecordingRunner(host);
    const again = new LoopVolumes({ store: store!, runner: rec, stateDir: dir });
    t.same(await again.start(), [], "nothing changed");
    t.notOk(
      rec.commands.some((c) => /^(umount|mount|losetup -d|losetup --find)/.test(c)),
      "no mount or loop changes",
    );
    const [listed] = again.list();
    t.match(listed, { usedBy: "web", device: (await loops())[0] });
    t.equal(readFileSync(join(again.mountPath("data"), "hello.txt"), "utf8"), "still here\n");
    v = again;
  });

  t.test("data survives detach and attach", async (t) => {
    await v.detach("data", "web");
    t.same(await mounts(), [], "unmounted");
    t.same(await loops(), [], "loop device released");
    t.match(v.list()[0], { usedBy: undefined, device: undefined });
    await v.detach("data", "web");
    t.pass("detach is idempotent");
    const mnt = await v.attach("data", "db");
    t.equal(readFileSync(join(mnt, "hello.txt"), "utf8"), "still here\n", "the file is still there");
    await v.detach("data", "db");
  });

  t.test("adopt releases a stray loop device of a volume nobody mounted", async (t) => {
    const stray = (await host.run(["losetup", "--find", "--show", img])).stdout.trim();
    const changes = await v.adopt();
    t.same(changes, [`volume data: detached stray loop device ${stray}`]);
    t.same(await loops(), []);
  });

  t.test("delete after detach removes the image", async (t) => {
    t.equal(await v.delete("data"), true);
    t.notOk(existsSync(img), "image removed");
    t.equal(await v.delete("data"), false, "delete again is a no-op");
    t.same(v.list(), []);
  });
}
