// The RPC client capsulectl dials with, against a server that accepts TCP and never speaks TLS:
// closing the client must close the connection stuck in its handshake (grpc-js alone leaves it
// open, and the process cannot exit), and a handshake must not wait for ever.
import { createServer, type Server, type Socket } from "node:net";
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
