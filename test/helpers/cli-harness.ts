// The in-process capsulectl harness shared by the CLI unit tests: run() with a fake dialer that
// records every call (unary and streaming) against a throwaway config dir.
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Readable } from "node:stream";
import t from "tap";
import type { Endpoint } from "../../src/api/client.js";
import { spkiFingerprint } from "../../src/api/fingerprint.js";
import { loadOrCreateOperatorKey, saveConfig } from "../../src/cli/config.js";
import { run } from "../../src/cli/main.js";
import type { CliIO, Dial, RpcCaller } from "../../src/cli/session.js";
import { FakeTerminal } from "../../src/cli/terminal.js";

export const CERT = `-----BEGIN CERTIFICATE-----
MIIBQDCB86ADAgECAhRVhw7n//0m5Yphai9Sk5a5+FwYajAFBgMrZXAwFTETMBEG
A1UEAwwKY2FwLXRlc3QtMTAgFw0yNjExMjMwODI2MzVaGA8yMTI2MTAzMDA4MjYz
NVowFTETMBEGA1UEAwwKY2FwLXRlc3QtMTAqMAUGAytlcAMhAFrAivJVIeX/2adu
CeP6e3hP6lSlBObroBT3J9VYONlQo1MwUTAdBgNVHQ4EFgQU8zcHI8xnMVw0RtfJ
MawzVyO+RYgwHwYDVR0jBBgwFoAU8zcHI8xnMVw0RtfJMawzVyO+RYgwDwYDVR0T
AQH/BAUwAwEB/zAFBgMrZXADQQCs0+x7OiJHxBy437B2BFOIP+PnSXcSKpk2BN1B
b3fICi1U77qmiajPg289wP+wsNH9JWvda0MlkSGW5vfVVs4P
-----END CERTIFICATE-----
`;

export interface Call {
  label: string;
  method: string;
  req: Record<string, unknown>;
  /** chunks are the messages of a client stream, in order. */
  chunks?: Record<string, unknown>[];
  opts?: Record<string, unknown>;
}
/** Handler answers a unary or client-stream call (with the chunks in req.chunks). */
export type Handler = (method: string, req: Record<string, unknown>, label: string) => Promise<unknown>;
/**
 * Streamer answers a server-stream call with its messages; `signal` is the call's. A
 * bidirectional call gets the client's messages as `req.input` (an AsyncIterable).
 */
export type Streamer = (
  method: string,
  req: Record<string, unknown>,
  label: string,
  signal: AbortSignal | undefined,
) => AsyncIterable<unknown>;

export function fakeDial(handler: Handler, streamer: Streamer, calls: Call[]): Dial {
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
      callBidiStream: (method: string, input: AsyncIterable<object>, opts?: { signal?: AbortSignal }) => {
        // The streamer reads the client's messages from req.input; they are recorded as chunks.
        const got: Record<string, unknown>[] = [];
        calls.push({ label, method, req: {}, chunks: got, opts: opts as Record<string, unknown> });
        const tapped = (async function* () {
          for await (const m of input) {
            got.push(m as Record<string, unknown>);
            yield m;
          }
        })();
        return streamer(method, { input: tapped }, label, opts?.signal);
      },
      close: () => {},
    } as unknown as RpcCaller;
  };
}

/** tmpDirs are removed when the test file ends; tests add their own temp dirs too. */
export const tmpDirs: string[] = [];
t.teardown(() => Promise.all(tmpDirs.map((d) => rm(d, { recursive: true, force: true }))));

export const NOW = new Date("2026-11-23T12:00:00.000Z");

export async function harness(
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
        terminal: new FakeTerminal(),
        ...extra,
      });
      return { code, out, err };
    },
  };
}

export const steps = (calls: Call[]) => calls.map((c) => `${c.label} ${c.method}`);
