// capsulectl volume create/list/delete driven in-process through run() with a fake dialer.
import t from "tap";
import { parseSize } from "../../src/cli/commands/volume.js";
import { CapsuleError, ErrorCode } from "../../src/errors.js";
import { harness } from "../helpers/cli-harness.js";

// ---------------------------------------------------------------- harness (fake dialer)

const VOL = {
  name: "data",
  size: String(2 ** 30),
  backend: "lvm-thin",
  device: "/dev/capsule/data",
  usedBy: "db",
  createdAt: "2026-11-23T11:00:00Z",
};

t.test("parseSize: bytes, decimal or binary units, 16Mi..16Ti; anything else names --size", async (t) => {
  t.equal(parseSize("33554432"), 32 * 2 ** 20);
  t.equal(parseSize("100M"), 100e6);
  t.equal(parseSize("1G"), 1e9);
  t.equal(parseSize("512Mi"), 512 * 2 ** 20);
  t.equal(parseSize("1Gi"), 2 ** 30);
  t.equal(parseSize("2Ti"), 2 * 2 ** 40);
  for (const bad of ["1GB", "1.5Gi", "0", "", "-1Gi", "Gi", "1Mi", "17Ti"]) {
    t.throws(() => parseSize(bad), { code: ErrorCode.InvalidArgument, message: /^--size: / }, bad);
  }
});

t.test("volume create: checks the size first, sends name and size, prints the result", async (t) => {
  const h = await harness(async (method, req) => {
    t.equal(method, "Volumes/Create");
    t.same(req, { name: "data", size: "1Gi" });
    return { ...VOL, usedBy: "" };
  });
  const r = await h.cli(["volume", "create", "data", "--size", "1Gi"]);
  t.equal(r.code, 0, r.err);
  t.equal(r.out, "volume/data created (1.00 GiB, lvm-thin)\n");
  const bad = await h.cli(["volume", "create", "data", "--size", "1GB"]);
  t.equal(bad.code, 1);
  t.match(bad.err, 'error: --size: "1GB" is not a size\nhint: use bytes or a unit');
  t.equal(h.calls.length, 1);
  const missing = await h.cli(["volume", "create", "data"]);
  t.equal(missing.code, 2, "--size is required");
});

t.test("volume list: NAME, SIZE, BACKEND, USED-BY; wide adds device; fan-out", async (t) => {
  const h = await harness(async (method, _req, label) => {
    t.equal(method, "Volumes/List");
    if (label === "homeB")
      throw new CapsuleError(ErrorCode.Unreachable, "homeB: unreachable", { hint: "is it up?" });
    return {
      volumes: [
        VOL,
        { ...VOL, name: "scratch", size: "536870912", backend: "loop-ext4", usedBy: "", device: "" },
      ],
    };
  });
  const r = await h.cli(["volume", "list"]);
  t.equal(r.code, 0, r.err);
  t.equal(
    r.out,
    [
      "NAME      SIZE         BACKEND     USED-BY",
      "data      1.00 GiB     lvm-thin    db",
      "scratch   512.00 MiB   loop-ext4   <none>",
      "",
    ].join("\n"),
  );
  const wide = await h.cli(["volume", "list", "-o", "wide"]);
  t.match(wide.out, /USED-BY\s+DEVICE\s+CREATED\n/);
  t.match(wide.out, /db\s+\/dev\/capsule\/data\s+2026-11-23T11:00:00Z\n/);
  const multi = await h.cli(["--all", "volume", "list"]);
  t.equal(multi.code, 1);
  t.match(multi.out, /^CAPSULE\s+NAME\s+SIZE/);
  t.match(multi.out, /\nhomeB\s+error: homeB: unreachable\n/);
  t.equal(multi.err, "hint: is it up?\n");
});

t.test("volume delete: deleted, or not found (idempotent); errors exit 1", async (t) => {
  const h = await harness(async (method, req) => {
    t.equal(method, "Volumes/Delete");
    if (req.name === "busy")
      throw new CapsuleError(ErrorCode.FailedPrecondition, "volume busy is mounted by db", {
        hint: "delete or stop db first",
      });
    return { deleted: req.name === "data" };
  });
  const r = await h.cli(["volume", "delete", "data"]);
  t.equal(r.out, "volume/data deleted\n");
  t.same(h.calls[0]?.req, { name: "data" });
  const gone = await h.cli(["volume", "delete", "ghost"]);
  t.equal(gone.code, 0);
  t.equal(gone.out, "volume/ghost not found\n");
  const busy = await h.cli(["volume", "delete", "busy"]);
  t.equal(busy.code, 1);
  t.equal(busy.err, "error: volume busy is mounted by db\nhint: delete or stop db first\n");
});
