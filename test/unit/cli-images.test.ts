// capsulectl image push/list driven in-process through run() with a fake dialer whose
// client stream records every chunk: chunking, first-chunk metadata, fan-out and tables.
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Readable } from "node:stream";
import t from "tap";
import type { Endpoint } from "../../src/api/client.js";
import { spkiFingerprint } from "../../src/api/fingerprint.js";
import { CHUNK_SIZE, imageChunks, shortDigest } from "../../src/cli/commands/image.js";
import { loadOrCreateOperatorKey, saveConfig } from "../../src/cli/config.js";
import { run } from "../../src/cli/main.js";
import type { CliIO, Dial, RpcCaller } from "../../src/cli/session.js";
import { CapsuleError, ErrorCode } from "../../src/errors.js";

// ---------------------------------------------------------------- harness (fake dialer)

const CERT = `-----BEGIN CERTIFICATE-----
MIIBQDCB86ADAgECAhRVhw7n//0m5Yphai9Sk5a5+FwYajAFBgMrZXAwFTETMBEG
A1UEAwwKY2FwLXRlc3QtMTAgFw0yNjExMjMwODI2MzVaGA8yMTI2MTAzMDA4MjYz
NVowFTETMBEGA1UEAwwKY2FwLXRlc3QtMTAqMAUGAytlcAMhAFrAivJVIeX/2adu
CeP6e3hP6lSlBObroBT3J9VYONlQo1MwUTAdBgNVHQ4EFgQU8zcHI8xnMVw0RtfJ
MawzVyO+RYgwHwYDVR0jBBgwFoAU8zcHI8xnMVw0RtfJMawzVyO+RYgwDwYDVR0T
AQH/BAUwAwEB/zAFBgMrZXADQQCs0+x7OiJHxBy437B2BFOIP+PnSXcSKpk2BN1B
b3fICi1U77qmiajPg289wP+wsNH9JWvda0MlkSGW5vfVVs4P
-----END CERTIFICATE-----
`;

interface Call {
  label: string;
  method: string;
  req: Record<string, unknown>;
  /** chunks are the messages of a client stream, in order. */
  chunks?: Record<string, unknown>[];
  opts?: Record<string, unknown>;
}
/** Handler answers a unary or client-stream call (with the chunks in req.chunks). */
type Handler = (method: string, req: Record<string, unknown>, label: string) => Promise<unknown>;
/** Streamer answers a server-stream call with its messages; `signal` is the call's. */
type Streamer = (
  method: string,
  req: Record<string, unknown>,
  label: string,
  signal: AbortSignal | undefined,
) => AsyncIterable<unknown>;

function fakeDial(handler: Handler, streamer: Streamer, calls: Call[]): Dial {
  return (endpoint: Endpoint) => {
    const label = endpoint.label ?? endpoint.address;
    return {
      call: async (method: string, req: object, opts?: object) => {
        calls.push({
          label,
          method,
          req: req as Record<string, unknown>,
          opts: opts as Record<string, unknown>,
        });
        return handler(method, req as Record<string, unknown>, label);
      },
      callClientStream: async (method: string, chunks: AsyncIterable<object>, opts?: object) => {
        const got: Record<string, unknown>[] = [];
        for await (const c of chunks) got.push(c as Record<string, unknown>);
        calls.push({ label, method, req: {}, chunks: got, opts: opts as Record<string, unknown> });
        return handler(method, { chunks: got }, label);
      },
      callServerStream: (method: string, req: object, opts?: { signal?: AbortSignal }) => {
        calls.push({
          label,
          method,
          req: req as Record<string, unknown>,
          opts: opts as Record<string, unknown>,
        });
        return streamer(method, req as Record<string, unknown>, label, opts?.signal);
      },
      close: () => {},
    } as unknown as RpcCaller;
  };
}

const tmpDirs: string[] = [];
t.teardown(() => Promise.all(tmpDirs.map((d) => rm(d, { recursive: true, force: true }))));

const NOW = new Date("2026-11-23T12:00:00.000Z");

async function harness(
  handler: Handler,
  streamer: Streamer = async function* () {
    yield* [];
    throw new Error("no streams in this test");
  },
) {
  const root = await mkdtemp(join(tmpdir(), "capsulectl-wl-"));
  tmpDirs.push(root);
  const dir = join(root, "cfg");
  await loadOrCreateOperatorKey(dir);
  await saveConfig(dir, {
    currentContext: "homeA",
    contexts: ["homeA", "homeB"].map((name, i) => ({
      name,
      address: `192.0.2.${10 + i}:50000`,
      capsuleId: `cap-${name}`,
      fingerprint: spkiFingerprint(CERT),
      certPem: CERT,
      addedAt: "2026-11-23T12:00:00.000Z",
    })),
  });
  const calls: Call[] = [];
  return {
    root,
    calls,
    async cli(argv: string[], extra: Partial<CliIO> = {}) {
      let out = "";
      let err = "";
      const code = await run(argv, {
        stdout: {
          write: (s: string | Uint8Array) => (out += typeof s === "string" ? s : Buffer.from(s).toString()),
        },
        stderr: {
          write: (s: string | Uint8Array) => (err += typeof s === "string" ? s : Buffer.from(s).toString()),
        },
        env: { CAPSULE_CONFIG_DIR: dir },
        stdin: Object.assign(Readable.from([]), { isTTY: false }),
        dial: fakeDial(handler, streamer, calls),
        probe: async () => {
          throw new Error("no probe in these tests");
        },
        now: () => NOW,
        onInterrupt: () => () => {},
        sleep: async () => {},
        ...extra,
      });
      return { code, out, err };
    },
  };
}

const steps = (calls: Call[]) => calls.map((c) => `${c.label} ${c.method}`);

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
