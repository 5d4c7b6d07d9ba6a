// capsulectl image push/list driven in-process through run() with a fake dialer whose
// client stream records every chunk: chunking, first-chunk metadata, fan-out and tables.
import { mkdtemp, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import t from "tap";
import { CHUNK_SIZE, imageChunks, shortDigest } from "../../src/cli/commands/image.js";
import { CapsuleError, ErrorCode } from "../../src/errors.js";
import { harness, steps, tmpDirs } from "../helpers/cli-harness.js";

// ---------------------------------------------------------------- harness (fake dialer)

const DIGEST = `sha256:${"0123456789abcdef".repeat(4)}`;
const IMAGE = { ref: "demo/httpd:1", digest: DIGEST, size: String(5 * 2 ** 20) };

/** archive writes a file of `size` bytes whose byte i is i mod 251, so chunk order shows. */
async function archive(root: string, size: number): Promise<string> {
  const p = join(root, "httpd.tar");
  await writeFile(p, Buffer.from(Array.from({ length: size }, (_, i) => i % 251)));
  return p;
}

t.test("image push: 1 MiB chunks, the first with file name and total size, in order", async (t) => {
  const h = await harness(async (method) => {
    t.equal(method, "Images/Push");
    return { images: [IMAGE] };
  });
  const size = 2 * CHUNK_SIZE + 12345;
  const file = await archive(h.root, size);
  const r = await h.cli(["image", "push", file]);
  t.equal(r.code, 0, r.err);
  t.equal(r.err, "", "no progress bar when stderr is not a terminal");
  const chunks = h.calls[0]?.chunks ?? [];
  t.same(
    chunks.map((c) => (c.data as Buffer).length),
    [CHUNK_SIZE, CHUNK_SIZE, 12345],
  );
  t.same(Object.keys(chunks[0] ?? {}).sort(), ["data", "filename", "totalSize"]);
  t.equal(chunks[0]?.filename, "httpd.tar");
  t.equal(chunks[0]?.totalSize, String(size));
  t.same(Object.keys(chunks[1] ?? {}), ["data"], "later chunks carry only data");
  const whole = Buffer.concat(chunks.map((c) => c.data as Buffer));
  t.equal(whole.length, size);
  t.equal(whole[CHUNK_SIZE + 7], (CHUNK_SIZE + 7) % 251, "bytes in order");
  t.equal(h.calls[0]?.opts?.deadlineMs, 600_000, "a push has its own, longer deadline");
  t.equal(
    r.out,
    "IMAGE          DIGEST                SIZE\ndemo/httpd:1   sha256:0123456789ab   5.00 MiB\n",
  );
});

t.test("image push to several capsules: pushes to each, one table, a failure exits 1", async (t) => {
  const h = await harness(async (_m, _req, label) => {
    if (label === "homeB")
      throw new CapsuleError(
        ErrorCode.InvalidArgument,
        "httpd.tar: not an OCI layout or docker-save archive",
      );
    return { images: [IMAGE] };
  });
  const file = await archive(h.root, 100);
  const r = await h.cli(["--all", "image", "push", file, "--push-timeout", "1m"]);
  t.equal(r.code, 1);
  t.same(steps(h.calls).sort(), ["homeA Images/Push", "homeB Images/Push"], "in parallel, to each");
  t.same(
    h.calls.map((c) => c.chunks?.length),
    [1, 1],
  );
  t.equal(h.calls[0]?.opts?.deadlineMs, 60_000);
  t.equal(
    r.out,
    [
      "CAPSULE   IMAGE          DIGEST                SIZE",
      "homeA     demo/httpd:1   sha256:0123456789ab   5.00 MiB",
      "homeB     error: httpd.tar: not an OCI layout or docker-save archive",
      "",
    ].join("\n"),
  );
});

t.test("image push: a missing or empty archive sends nothing", async (t) => {
  const h = await harness(async () => t.fail("nothing may be sent"));
  const r = await h.cli(["image", "push", join(h.root, "nope.tar")]);
  t.equal(r.code, 1);
  t.match(r.err, /^error: ARCHIVE: .*nope\.tar: no such file\n/);
  const empty = await archive(h.root, 0);
  const e = await h.cli(["image", "push", empty]);
  t.equal(e.code, 1);
  t.match(e.err, "is empty");
  t.equal(h.calls.length, 0);
});

t.test("image push: a progress bar on stderr when it is a terminal", async (t) => {
  const h = await harness(async () => ({ images: [IMAGE] }));
  const file = await archive(h.root, CHUNK_SIZE + 1);
  let err = "";
  const r = await h.cli(["image", "push", file], {
    stderr: { write: (s: string | Uint8Array) => (err += String(s)), isTTY: true },
  });
  t.equal(r.code, 0);
  t.match(err, "homeA");
  t.match(err, "100%");
});

t.test("imageChunks: an exact multiple of the chunk size ends without an empty chunk", async (t) => {
  const root = await mkdtemp(join(tmpdir(), "capsulectl-chunks-"));
  tmpDirs.push(root);
  const file = await archive(root, 8);
  const seen: number[] = [];
  const sizes: number[] = [];
  for await (const c of imageChunks(file, "x.tar", 8, (n) => seen.push(n), 4))
    sizes.push((c.data as Buffer).length);
  t.same(sizes, [4, 4]);
  t.same(seen, [4, 4]);
});

t.test("image list: reference, short digest, human size; wide the full digest; fan-out", async (t) => {
  const h = await harness(async (method) => {
    t.equal(method, "Images/List");
    return { images: [IMAGE, { ref: "demo/db:1", digest: "sha256:ffff", size: "512" }] };
  });
  const r = await h.cli(["image", "list"]);
  t.equal(
    r.out,
    [
      "IMAGE          DIGEST                SIZE",
      "demo/httpd:1   sha256:0123456789ab   5.00 MiB",
      "demo/db:1      sha256:ffff           512 B",
      "",
    ].join("\n"),
  );
  const wide = await h.cli(["image", "list", "-o", "wide"]);
  t.match(wide.out, DIGEST);
  const multi = await h.cli(["--all", "image", "list", "-o", "json"]);
  t.same(
    JSON.parse(multi.out).map((x: { capsule: string }) => x.capsule),
    ["homeA", "homeB"],
  );
  t.equal(shortDigest("weird"), "weird");
});

t.test("image pull: one Pull call with the reference and --plain-http, the push table", async (t) => {
  const h = await harness(async (method, req) => {
    t.equal(method, "Images/Pull");
    t.same(req, { ref: "reg.lan:5000/demo/httpd:1", plainHttp: true });
    return { images: [{ ...IMAGE, ref: "reg.lan:5000/demo/httpd:1" }] };
  });
  const r = await h.cli(["image", "pull", "reg.lan:5000/demo/httpd:1", "--plain-http"]);
  t.equal(r.code, 0, r.err);
  t.match(r.out, /^IMAGE\s+DIGEST\s+SIZE\nreg\.lan:5000\/demo\/httpd:1\s+sha256:0123456789ab\s+5\.00 MiB\n$/);
  t.equal(h.calls[0]?.opts?.deadlineMs, 630_000, "the node's 10 min bound plus a margin");
  await h.cli(["--timeout", "20m", "image", "pull", "reg.lan:5000/demo/httpd:1", "--plain-http"]);
  t.equal(h.calls[1]?.opts?.deadlineMs, 1_200_000, "a longer --timeout wins");
});
