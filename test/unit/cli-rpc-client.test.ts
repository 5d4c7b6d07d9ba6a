// The RPC client capsulectl dials with, against a server that accepts TCP and never speaks TLS:
// closing the client must close the connection stuck in its handshake (grpc-js alone leaves it
// open, and the process cannot exit), and a handshake must not wait for ever.
import { createServer, type Server, type Socket } from "node:net";
import type { sendUnaryData, ServerReadableStream, ServerWritableStream } from "@grpc/grpc-js";
import t from "tap";
import { RpcClient } from "../../src/api/client.js";
import type { CapsuleError } from "../../src/errors.js";

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

/** mute listens on loopback, accepts, and never writes; `closed` resolves when the n-th accepted socket closes. */
async function mute(): Promise<{
  server: Server;
  port: number;
  accepted: Socket[];
  closed(i: number): Promise<number>;
}> {
  const accepted: Socket[] = [];
  const closes: Promise<number>[] = [];
  const server = createServer((s) => {
    s.on("error", () => {});
    s.resume(); // read (and drop) the ClientHello, so the peer's close is seen
    accepted.push(s);
    closes.push(new Promise((r) => s.once("close", () => r(Date.now()))));
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  const port = (server.address() as { port: number }).port;
  const closed = async (i: number) => {
    const until = Date.now() + 5000;
    while (!closes[i] && Date.now() < until) await new Promise((r) => setTimeout(r, 10));
    return closes[i] ?? Promise.reject(new Error(`no connection #${i}`));
  };
  return { server, port, accepted, closed };
}

function client(port: number, handshakeTimeoutMs?: number): RpcClient {
  return new RpcClient(
    {
      address: `127.0.0.1:${port}`,
      certPem: CERT,
      fingerprint: "SHA256:x",
      capsuleId: "cap-x",
      label: "mute",
    },
    null,
    undefined,
    handshakeTimeoutMs === undefined ? {} : { handshakeTimeoutMs },
  );
}

/** within settles like `p`, or fails after `ms`; its timer never outlives it. */
async function within<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<never>((_, rej) => {
    timer = setTimeout(() => rej(new Error(`${what}: not within ${ms} ms`)), ms);
  });
  try {
    return await Promise.race([p, late]);
  } finally {
    clearTimeout(timer);
  }
}

t.test("close() closes a connection stuck in its TLS handshake", async (t) => {
  const m = await mute();
  t.teardown(() => {
    for (const s of m.accepted) s.destroy();
    m.server.close();
  });
  const c = client(m.port);
  const err = (await c.call("Info", {}, { deadlineMs: 300 }).catch((e: unknown) => e)) as CapsuleError;
  t.equal(err.code, "CAPSULE_TIMEOUT");
  t.equal(m.accepted.length, 1, "one connection, still open at the deadline");
  const closedAt = m.closed(0);
  const t0 = Date.now();
  c.close();
  const at = await within(closedAt, 2000, "the server sees the connection close");
  t.ok(at - t0 < 1000, `closed ${at - t0} ms after close()`);
  c.close(); // idempotent
});

t.test("a handshake is bounded; close() cuts short the pin probe that follows", async (t) => {
  const m = await mute();
  t.teardown(() => {
    for (const s of m.accepted) s.destroy();
    m.server.close();
  });
  const c = client(m.port, 200);
  const t0 = Date.now();
  const call = c.call("Info", {}, { deadlineMs: 8000 }).catch((e: unknown) => e as CapsuleError);
  const first = await within(m.closed(0), 3000, "the first handshake is given up");
  t.ok(first - t0 < 1500, `first handshake given up after ${first - t0} ms (bound 200 ms)`);
  // The call now fails as unreachable and probes the server to name a pin mismatch; that
  // probe meets the same mute server. close() must end it rather than wait it out.
  await new Promise((r) => setTimeout(r, 100));
  c.close();
  const err = (await within(call, 1500, "the call settles after close()")) as CapsuleError;
  t.ok(Date.now() - t0 < 3000, "well before the call's 8 s deadline");
  t.match(err.code, /^CAPSULE_(UNREACHABLE|INTERNAL)$/);
  for (let i = 0; i < m.accepted.length; i++) await within(m.closed(i), 2000, `connection #${i} closes`);
});

// ---------------------------------------------------------------- streaming calls, end to end

/** streamingServer serves Images/Push and Workloads/Logs over TLS with a fresh pinned key. */
async function streamingServer() {
  const { webcrypto } = await import("node:crypto");
  const grpc = await import("@grpc/grpc-js");
  const { selfSignedCertificate } = await import("../../src/node/identity.js");
  const { loadProto } = await import("../../src/api/proto.js");
  const { toServiceError } = await import("../../src/api/errors.js");
  const { CapsuleError: CE } = await import("../../src/errors.js");
  const { spkiFingerprint } = await import("../../src/api/fingerprint.js");
  const alg = { name: "ECDSA", namedCurve: "P-256", hash: "SHA-256" } as const;
  const keys = (await webcrypto.subtle.generateKey(alg, true, [
    "sign",
    "verify",
  ])) as import("node:crypto").webcrypto.CryptoKeyPair;
  const certPem = (await selfSignedCertificate("cap-s", keys)).toString("pem");
  const pkcs8 = Buffer.from(await webcrypto.subtle.exportKey("pkcs8", keys.privateKey));
  const keyPem = `-----BEGIN PRIVATE KEY-----\n${pkcs8.toString("base64").replace(/.{64}/g, "$&\n")}\n-----END PRIVATE KEY-----\n`;
  const auth: string[] = [];
  const pushed: { filename: string; totalSize: string; size: number }[] = [];
  const cancelled: string[] = [];
  const v1 = loadProto().capsule.v1;
  const server = new grpc.Server();
  server.addService(v1.Images.service, {
    Push: (call: ServerReadableStream<object, object>, cb: sendUnaryData<object>) => {
      auth.push(String(call.metadata.get("authorization")[0]));
      let first: { filename: string; totalSize: string } | undefined;
      let size = 0;
      call.on("data", (c: { data: Buffer; filename: string; totalSize: string }) => {
        first ??= { filename: c.filename, totalSize: c.totalSize };
        size += c.data.length;
      });
      call.on("end", () => {
        pushed.push({ ...(first ?? { filename: "", totalSize: "" }), size });
        if (first?.filename === "bad.tar")
          return cb(
            toServiceError(
              new CE("CAPSULE_INVALID_ARGUMENT", "bad.tar: not an archive", { hint: "use docker save" }),
            ),
          );
        cb(null, { images: [{ ref: "demo/x:1", digest: "sha256:ab", size: String(size) }] });
      });
    },
    List: (_c: unknown, cb: sendUnaryData<object>) => cb(null, { images: [] }),
  });
  server.addService(v1.Workloads.service, {
    Logs: (call: ServerWritableStream<object, object>) => {
      auth.push(String(call.metadata.get("authorization")[0]));
      const req = call.request as { name: string; follow: boolean };
      if (req.name === "ghost") {
        call.emit("error", toServiceError(new CE("CAPSULE_NOT_FOUND", "workload ghost does not exist")));
        return;
      }
      call.write({ data: Buffer.from("one\n") });
      call.write({ data: Buffer.from("two\n") });
      if (!req.follow) return call.end();
      // A follow streams until the client cancels.
      const timer = setInterval(() => call.write({ data: Buffer.from("tick\n") }), 20);
      call.on("cancelled", () => {
        clearInterval(timer);
        cancelled.push(req.name);
      });
    },
  });
  const port = await new Promise<number>((res, rej) =>
    server.bindAsync(
      "127.0.0.1:0",
      grpc.ServerCredentials.createSsl(null, [
        { private_key: Buffer.from(keyPem), cert_chain: Buffer.from(certPem) },
      ]),
      (e, p) => (e ? rej(e) : res(p)),
    ),
  );
  const tokens = async (method: string) => `tok-${method}-${auth.length}`;
  const client = new RpcClient(
    {
      address: `127.0.0.1:${port}`,
      certPem,
      fingerprint: spkiFingerprint(certPem),
      capsuleId: "cap-s",
      label: "s",
    },
    null,
    tokens,
  );
  return { server, client, auth, pushed, cancelled };
}

t.test("callClientStream and callServerStream against a real TLS server", async (t) => {
  const s = await streamingServer();
  t.teardown(() => {
    s.client.close();
    s.server.forceShutdown();
  });

  async function* chunks(name: string) {
    yield { data: Buffer.alloc(1000, 1), filename: name, totalSize: "1500" };
    yield { data: Buffer.alloc(500, 2) };
  }
  const res = await s.client.callClientStream<{ images: { size: string }[] }>("Images/Push", chunks("x.tar"));
  t.equal(res.images[0]?.size, "1500");
  t.same(s.pushed[0], { filename: "x.tar", totalSize: "1500", size: 1500 });
  t.match(s.auth[0], /^Bearer tok-\/capsule\.v1\.Images\/Push/, "a token on the stream");

  const bad = (await s.client
    .callClientStream("Images/Push", chunks("bad.tar"))
    .catch((e: unknown) => e)) as CapsuleError;
  t.equal(bad.code, "CAPSULE_INVALID_ARGUMENT");
  t.equal(bad.message, "bad.tar: not an archive");
  t.equal(bad.hint, "use docker save");

  async function* broken() {
    yield { data: Buffer.alloc(10), filename: "y.tar", totalSize: "20" };
    throw new Error("disk read failed");
  }
  const local = (await s.client.callClientStream("Images/Push", broken()).catch((e: unknown) => e)) as Error;
  t.equal(local.message, "disk read failed", "a failing source fails the call with its own error");

  const got: string[] = [];
  for await (const c of s.client.callServerStream<{ data: Buffer }>("Workloads/Logs", { name: "web" })) {
    got.push(c.data.toString());
  }
  t.same(got, ["one\n", "two\n"]);
  t.not(s.auth.at(-1), s.auth.at(-2), "a fresh token per call");

  const missing: string[] = [];
  const nf = await (async () => {
    for await (const c of s.client.callServerStream<{ data: Buffer }>("Workloads/Logs", { name: "ghost" }))
      missing.push(c.data.toString());
  })().catch((e: unknown) => e as CapsuleError);
  t.equal(nf?.code, "CAPSULE_NOT_FOUND");

  // A follow has no deadline and ends when its signal aborts.
  const ac = new AbortController();
  const why = new Error("interrupted");
  let ticks = 0;
  const follow = (async () => {
    for await (const c of s.client.callServerStream<{ data: Buffer }>(
      "Workloads/Logs",
      { name: "tail", follow: true },
      { deadlineMs: null, signal: ac.signal },
    )) {
      if (c.data.toString() === "tick\n" && ++ticks === 3) ac.abort(why);
    }
  })().catch((e: unknown) => e);
  t.equal(await within(follow, 3000, "the follow ends on abort"), why);
  await within(
    (async () => {
      while (!s.cancelled.includes("tail")) await new Promise((r) => setTimeout(r, 10));
    })(),
    2000,
    "the server sees the cancel",
  );

  // Breaking out of the loop cancels the stream too.
  for await (const _ of s.client.callServerStream(
    "Workloads/Logs",
    { name: "early", follow: true },
    { deadlineMs: null },
  ))
    break;
  await within(
    (async () => {
      while (!s.cancelled.includes("early")) await new Promise((r) => setTimeout(r, 10));
    })(),
    2000,
    "the server sees the early stop",
  );
});
