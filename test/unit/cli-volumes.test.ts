// capsulectl volume create/list/delete driven in-process through run() with a fake dialer.
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Readable } from "node:stream";
import t from "tap";
import type { Endpoint } from "../../src/api/client.js";
import { spkiFingerprint } from "../../src/api/fingerprint.js";
import { parseSize } from "../../src/cli/commands/volume.js";
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
