import { X509Certificate } from "node:crypto";
import type { Socket } from "node:net";
import { connect as tlsConnect, type PeerCertificate } from "node:tls";
import * as grpc from "@grpc/grpc-js";
import { CapsuleError, ErrorCode } from "../errors.js";
import { fromServiceError } from "./errors.js";
import { spkiFingerprint } from "./fingerprint.js";
import { loadProto } from "./proto.js";
import { AUTH_METADATA, mintRpcToken, type Signer } from "./token.js";

/** TLS_SERVER_NAME is the SNI every client sends; identity comes from the key pin, never the name. */
export const TLS_SERVER_NAME = "capsule";

/**
 * HANDSHAKE_TIMEOUT_MS bounds one TLS handshake of a channel. grpc-js has no such bound: a
 * server that accepts TCP but never answers the ClientHello would hold a connection attempt
 * (and a long-lived channel's every later call) in CONNECTING for as long as the socket lives.
 */
export const HANDSHAKE_TIMEOUT_MS = 10_000;

/** Endpoint is a pinned capsule: where it listens, the certificate we trust and its key fingerprint. */
export interface Endpoint {
  /** address is "host:port" (required). */
  address: string;
  /** certPem is the capsule's self-signed certificate, the only trust anchor of the connection (required). */
  certPem: string;
  /** fingerprint pins the certificate's public key, "SHA256:<base64>" (required). */
  fingerprint: string;
  /** capsuleId is the token audience (required). */
  capsuleId: string;
  /** label names the target in errors (optional; defaults to address). */
  label?: string;
}

/** CallOptions: `deadlineMs` bounds one call (default 10 s); `token` overrides the minted token (tests). */
export interface CallOptions {
  deadlineMs?: number;
  token?: string | null;
}

/**
 * StreamCallOptions are {@link CallOptions} for the streaming calls: `deadlineMs` null means no
 * deadline at all (a followed log stream); `signal` (optional) cancels the call when it aborts,
 * which then fails with the signal's reason when that is an Error.
 */
export interface StreamCallOptions {
  deadlineMs?: number | null;
  token?: string | null;
  signal?: AbortSignal;
}

/** DEFAULT_DEADLINE_MS bounds a call whose options name no deadline. */
const DEFAULT_DEADLINE_MS = 10_000;

/** Prepared is one call made ready: the service client, the method function and its metadata. */
interface Prepared {
  svc: grpc.Client & Record<string, unknown>;
  fn: (...args: unknown[]) => unknown;
  md: grpc.Metadata;
}

type TokenSource = (method: string) => Promise<string | null>;

/**
 * pinCheck is installed as checkServerIdentity. Node only calls it once the chain verified
 * against `certPem` (rejectUnauthorized stays true), so a pin can never be skipped by a
 * self-signed chain; the check is on the key (SPKI), so a valid chain to another key fails.
 */
export function pinCheck(expected: string) {
  return (_host: string, cert: PeerCertificate): Error | undefined => {
    const got = cert.raw ? spkiFingerprint(new X509Certificate(cert.raw)) : "none";
    if (got !== expected) {
      return new CapsuleError(
        ErrorCode.FingerprintMismatch,
        `server key ${got} does not match the pinned ${expected}`,
      );
    }
    return undefined;
  };
}

/**
 * ClosingCredentials wraps grpc-js TLS credentials so that a connection still in its TLS
 * handshake dies with the channel. grpc-js (1.14) keeps the socket of a connection attempt in a
 * local variable of its connector until the handshake ends, and closing the channel never
 * reaches it: the attempt goes on, its socket stays referenced, and a process that dropped a
 * target at its deadline cannot exit. The one hook grpc-js does call on close is the secure
 * connector's `destroy()` (when the subchannel's last reference goes), so this connector
 * remembers the sockets it is handshaking on and destroys them there. It also bounds every
 * handshake by `handshakeTimeoutMs`, so a long-lived channel retries with backoff instead of
 * waiting on a mute server for ever.
 *
 * What it cannot reach: the TCP connect before the handshake (grpc-js owns that socket until
 * it is connected; a SYN to a black-holed address lives until the kernel gives up), and the
 * wait for the server's HTTP/2 SETTINGS after it (grpc-node issue 2785; the socket is grpc-js's
 * transport by then, and destroying it here would also cut calls a closed channel lets finish).
 * capsuled sends SETTINGS at once, so only a middlebox could stall there.
 */
class ClosingCredentials extends grpc.ChannelCredentials {
  constructor(
    private readonly inner: grpc.ChannelCredentials,
    private readonly handshakeTimeoutMs: number,
  ) {
    super();
  }

  override _isSecure(): boolean {
    return this.inner._isSecure();
  }

  override _equals(other: grpc.ChannelCredentials): boolean {
    return other === this;
  }

  override _createSecureConnector(
    ...args: Parameters<grpc.ChannelCredentials["_createSecureConnector"]>
  ): grpc.experimental.SecureConnector {
    const inner = this.inner._createSecureConnector(...args);
    // Each handshake in flight, by its TCP socket: `abort` destroys the socket and fails it.
    const handshaking = new Map<Socket, (why: Error) => void>();
    let destroyed = false;
    const timeoutMs = this.handshakeTimeoutMs;
    return {
      connect(socket) {
        if (destroyed) {
          // The channel closed while grpc-js was still connecting TCP.
          socket.destroy();
          return Promise.reject(new Error("channel closed"));
        }
        const attempt = inner.connect(socket);
        // Settled by the race below or never: either way, not an unhandled rejection.
        attempt.catch(() => {});
        let timer: NodeJS.Timeout | undefined;
        const aborted = new Promise<never>((_, reject) => {
          const abort = (why: Error) => {
            socket.destroy();
            reject(why);
          };
          handshaking.set(socket, abort);
          timer = setTimeout(() => abort(new Error(`no TLS handshake within ${timeoutMs} ms`)), timeoutMs);
        });
        return Promise.race([attempt, aborted]).finally(() => {
          clearTimeout(timer);
          handshaking.delete(socket);
        });
      },
      waitForReady: () => inner.waitForReady(),
      getCallCredentials: () => inner.getCallCredentials(),
      destroy() {
        destroyed = true;
        for (const abort of [...handshaking.values()]) abort(new Error("channel closed"));
        inner.destroy();
      },
    };
  }
}

/** RpcClientOptions: `handshakeTimeoutMs` bounds each TLS handshake (optional; default {@link HANDSHAKE_TIMEOUT_MS}). */
export interface RpcClientOptions {
  handshakeTimeoutMs?: number;
}

/**
 * RpcClient calls one capsule's services with a fresh token each call. {@link RpcClient.close}
 * releases everything, a connection still in its TLS handshake included, so a process that
 * closed its clients can exit.
 */
export class RpcClient {
  private readonly services = new Map<string, grpc.Client & Record<string, unknown>>();
  private readonly creds: grpc.ChannelCredentials;
  readonly endpoint: Endpoint;
  private readonly tokens: TokenSource;
  private readonly label: string;
  /** probes are the explain() probes in flight; close() aborts them. */
  private readonly probes = new Set<AbortController>();

  constructor(endpoint: Endpoint, signer: Signer | null, tokens?: TokenSource, opts: RpcClientOptions = {}) {
    this.endpoint = endpoint;
    this.label = endpoint.label ?? endpoint.address;
    this.tokens =
      tokens ?? (async (method) => (signer ? mintRpcToken(signer, endpoint.capsuleId, method) : null));
    this.creds = new ClosingCredentials(
      grpc.credentials.createSsl(Buffer.from(endpoint.certPem), null, null, {
        checkServerIdentity: pinCheck(endpoint.fingerprint),
      }),
      opts.handshakeTimeoutMs ?? HANDSHAKE_TIMEOUT_MS,
    );
  }

  private service(name: string): grpc.Client & Record<string, unknown> {
    let c = this.services.get(name);
    if (!c) {
      const ctor = (loadProto().capsule.v1 as unknown as Record<string, typeof grpc.Client | undefined>)[
        name
      ];
      if (!ctor) throw new CapsuleError(ErrorCode.Internal, `unknown service ${name}`);
      // All services share one channel: grpc-js pools subchannels by target and options.
      c = new ctor(this.endpoint.address, this.creds, {
        "grpc.ssl_target_name_override": TLS_SERVER_NAME,
        "grpc.default_authority": TLS_SERVER_NAME,
        "grpc.enable_retries": 0,
      }) as grpc.Client & Record<string, unknown>;
      this.services.set(name, c);
    }
    return c;
  }

  /**
   * prepare resolves "Service/Method" (or a bare Capsule method) to its client function and
   * mints the call's own token: every call, streaming or not, carries a fresh one.
   */
  private async prepare(method: string, token: string | null | undefined): Promise<Prepared> {
    const [svcName, methodName] = method.includes("/")
      ? (method.split("/") as [string, string])
      : ["Capsule", method];
    const path = `/capsule.v1.${svcName}/${methodName}`;
    const svc = this.service(svcName);
    const lower = methodName.charAt(0).toLowerCase() + methodName.slice(1);
    const fn = svc[lower] as Prepared["fn"] | undefined;
    if (typeof fn !== "function") throw new CapsuleError(ErrorCode.Internal, `unknown method ${method}`);
    const tok = token !== undefined ? token : await this.tokens(path);
    const md = new grpc.Metadata();
    if (tok) md.set(AUTH_METADATA, `Bearer ${tok}`);
    return { svc, fn, md };
  }

  /**
   * call invokes one unary method: "Service/Method" ("Fabric/Status"), or a bare method name
   * for the Capsule service ("Info").
   */
  async call<Res>(method: string, request: object, opts: CallOptions = {}): Promise<Res> {
    const { svc, fn, md } = await this.prepare(method, opts.token);
    const deadline = Date.now() + (opts.deadlineMs ?? DEFAULT_DEADLINE_MS);
    try {
      return await new Promise<Res>((resolve, reject) => {
        fn.call(svc, request, md, { deadline }, (err: grpc.ServiceError | null, res: Res) =>
          err ? reject(err) : resolve(res),
        );
      });
    } catch (e) {
      throw await this.explain(e as grpc.ServiceError, deadline);
    }
  }

  /**
   * callClientStream invokes a client-streaming method ("Images/Push"): it writes every message
   * of `chunks` in order, honouring backpressure, half-closes, and resolves with the one
   * answer. A failure of `chunks` cancels the call and rejects with that failure; a server
   * error ends the writing at once. Token, pin check, deadline and errors as {@link call}.
   */
  async callClientStream<Res>(
    method: string,
    chunks: AsyncIterable<object> | Iterable<object>,
    opts: StreamCallOptions = {},
  ): Promise<Res> {
    const { svc, fn, md } = await this.prepare(method, opts.token);
    const deadline = deadlineOf(opts);
    const signal = opts.signal;
    if (signal?.aborted) throw abortError(signal);
    let stream: grpc.ClientWritableStream<object> | undefined;
    const onAbort = () => stream?.cancel();
    signal?.addEventListener("abort", onAbort, { once: true });
    try {
      return await new Promise<Res>((resolve, reject) => {
        let settled = false;
        let wake: (() => void) | undefined;
        const settle = () => {
          settled = true;
          wake?.();
        };
        stream = fn.call(svc, md, { deadline }, (err: grpc.ServiceError | null, res: Res) => {
          settle();
          if (err) reject(err);
          else resolve(res);
        }) as grpc.ClientWritableStream<object>;
        const s = stream;
        const pump = async () => {
          for await (const chunk of chunks) {
            if (settled) return;
            if (!s.write(chunk)) {
              // Wait for room, or for the call to end (then drain never comes).
              await new Promise<void>((r) => {
                wake = r;
                s.once("drain", r);
              });
              s.removeListener("drain", wake as () => void);
              wake = undefined;
            }
          }
          if (!settled) s.end();
        };
        pump().catch((e: unknown) => {
          settle();
          s.cancel();
          reject(new LocalStreamError(e));
        });
      });
    } catch (e) {
      if (e instanceof LocalStreamError) throw e.inner;
      if (signal?.aborted) throw abortError(signal);
      throw await this.explain(e as grpc.ServiceError, deadline);
    } finally {
      signal?.removeEventListener("abort", onAbort);
    }
  }

  /**
   * callServerStream invokes a server-streaming method ("Workloads/Logs") and yields its
   * messages as they arrive. Breaking out of the loop cancels the call. `deadlineMs: null`
   * streams for as long as the server does (follow); `signal` cancels. Token, pin check and
   * errors as {@link call}.
   */
  async *callServerStream<Res>(
    method: string,
    request: object,
    opts: StreamCallOptions = {},
  ): AsyncGenerator<Res, void, undefined> {
    const { svc, fn, md } = await this.prepare(method, opts.token);
    const deadline = deadlineOf(opts);
    const signal = opts.signal;
    if (signal?.aborted) throw abortError(signal);
    const stream = fn.call(svc, request, md, { deadline }) as grpc.ClientReadableStream<Res>;
    const onAbort = () => stream.cancel();
    signal?.addEventListener("abort", onAbort, { once: true });
    let ended = false;
    try {
      for await (const msg of stream) yield msg as Res;
      ended = true;
    } catch (e) {
      ended = true;
      if (signal?.aborted) throw abortError(signal);
      throw await this.explain(e as grpc.ServiceError, deadline);
    } finally {
      signal?.removeEventListener("abort", onAbort);
      // The consumer stopped early: tell the server instead of leaving the stream open.
      if (!ended) stream.cancel();
    }
  }

  /**
   * callBidiStream invokes a bidirectional-streaming method ("Workloads/ExecStream"): it writes
   * every message of `input` in order (honouring backpressure) while yielding the server's
   * messages as they arrive; the end of `input` half-closes the call. Breaking out of the loop
   * cancels the call; a failure of `input` cancels it and is rethrown as is. `deadlineMs: null`
   * for no deadline (an interactive session); `signal` cancels. Token, pin check and errors as
   * {@link call}.
   */
  async *callBidiStream<Res>(
    method: string,
    input: AsyncIterable<object> | Iterable<object>,
    opts: StreamCallOptions = {},
  ): AsyncGenerator<Res, void, undefined> {
    const { svc, fn, md } = await this.prepare(method, opts.token);
    const deadline = deadlineOf(opts);
    const signal = opts.signal;
    if (signal?.aborted) throw abortError(signal);
    const stream = fn.call(svc, md, { deadline }) as grpc.ClientDuplexStream<object, Res>;
    const onAbort = () => stream.cancel();
    signal?.addEventListener("abort", onAbort, { once: true });
    let ended = false;
    let localError: { e: unknown } | undefined;
    const pump = async () => {
      for await (const m of input) {
        if (ended) return;
        if (!stream.write(m)) {
          await new Promise<void>((r) => {
            const done = () => {
              stream.off("drain", done);
              stream.off("close", done);
              r();
            };
            stream.on("drain", done);
            stream.on("close", done);
          });
        }
      }
      if (!ended) stream.end();
    };
    pump().catch((e: unknown) => {
      if (ended) return;
      localError = { e };
      stream.cancel();
    });
    try {
      for await (const msg of stream) yield msg as Res;
      ended = true;
    } catch (e) {
      ended = true;
      if (localError) throw localError.e;
      if (signal?.aborted) throw abortError(signal);
      throw await this.explain(e as grpc.ServiceError, deadline);
    } finally {
      signal?.removeEventListener("abort", onAbort);
      // The consumer stopped early: tell the server instead of leaving the stream open.
      if (!ended) {
        ended = true;
        stream.cancel();
      }
    }
  }

  /** explain turns a transport failure into the precise reason: a pin mismatch names both keys. */
  private async explain(e: grpc.ServiceError, deadline: number): Promise<CapsuleError> {
    const ce = fromServiceError(e, this.label);
    if (ce.code !== ErrorCode.Unreachable) return ce;
    // The handshake may have failed on the pin. Probe once, only to name what the server
    // presents: within what is left of the call's deadline (a pin failure is quick, so some is
    // left), and cut short by close().
    let probe: ProbeResult;
    const ac = new AbortController();
    this.probes.add(ac);
    try {
      probe = await probeCertificate(
        this.endpoint.address,
        Math.max(250, Math.min(3000, deadline - Date.now())),
        ac.signal,
      );
    } catch {
      return ce;
    } finally {
      this.probes.delete(ac);
    }
    if (probe.fingerprint !== this.endpoint.fingerprint) {
      return new CapsuleError(
        ErrorCode.FingerprintMismatch,
        `${this.label}: server presents key ${probe.fingerprint}, but ${this.endpoint.fingerprint} is pinned`,
        {
          hint: `if the capsule was reinstalled on purpose, re-pin: capsulectl context delete ${this.label} && capsulectl adopt ${this.endpoint.address} --name ${this.label} --fingerprint ${probe.fingerprint}`,
          cause: e,
          details: { pinned: this.endpoint.fingerprint, presented: probe.fingerprint },
        },
      );
    }
    return ce;
  }

  /**
   * close releases the channel, a connection still in its TLS handshake included (see
   * ClosingCredentials), and aborts a pin probe in flight. Idempotent.
   */
  close(): void {
    for (const c of this.services.values()) c.close();
    this.services.clear();
    for (const ac of this.probes) ac.abort();
    this.probes.clear();
  }
}

/** deadlineOf is the absolute deadline of a streaming call: Infinity (none) for `deadlineMs: null`. */
function deadlineOf(opts: StreamCallOptions): number {
  return opts.deadlineMs === null
    ? Number.POSITIVE_INFINITY
    : Date.now() + (opts.deadlineMs ?? DEFAULT_DEADLINE_MS);
}

/** abortError is what a call cancelled through its signal fails with: the signal's reason when it is an Error. */
function abortError(signal: AbortSignal): Error {
  const r: unknown = signal.reason;
  return r instanceof Error ? r : new CapsuleError(ErrorCode.Internal, "cancelled", { cause: r });
}

/** LocalStreamError carries a failure of the caller's own chunk source past the gRPC error mapping. */
class LocalStreamError extends Error {
  constructor(readonly inner: unknown) {
    super("local stream error");
  }
}

/** ProbeResult is what a server presents in its TLS handshake. */
export interface ProbeResult {
  fingerprint: string;
  certPem: string;
}

/**
 * probeCertificate connects without trusting anything, to show an operator the fingerprint
 * before pinning (TOFU) or to name a mismatch. It never sends a token or any request. It
 * gives up after `timeoutMs` (CAPSULE_TIMEOUT) or when `signal` aborts (its reason).
 */
export function probeCertificate(
  address: string,
  timeoutMs = 5000,
  signal?: AbortSignal,
): Promise<ProbeResult> {
  const { host, port } = splitHostPort(address);
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(signal.reason);
    const sock = tlsConnect({
      host,
      port,
      servername: TLS_SERVER_NAME,
      rejectUnauthorized: false,
      ALPNProtocols: ["h2"],
      minVersion: "TLSv1.3",
    });
    const timer = setTimeout(() => {
      signal?.removeEventListener("abort", onAbort);
      sock.destroy();
      reject(
        new CapsuleError(ErrorCode.Timeout, `${address}: no TLS handshake within ${timeoutMs} ms`, {
          hint: "check that capsuled runs there and the address is reachable",
        }),
      );
    }, timeoutMs);
    const onAbort = () => {
      clearTimeout(timer);
      sock.destroy();
      reject(signal?.reason);
    };
    signal?.addEventListener("abort", onAbort, { once: true });
    const settle = () => {
      clearTimeout(timer);
      signal?.removeEventListener("abort", onAbort);
    };
    sock.once("secureConnect", () => {
      settle();
      const raw = sock.getPeerCertificate().raw;
      sock.end();
      if (!raw)
        return reject(new CapsuleError(ErrorCode.Unreachable, `${address}: server presented no certificate`));
      const x = new X509Certificate(raw);
      resolve({ fingerprint: spkiFingerprint(x), certPem: x.toString() });
    });
    sock.once("error", (err) => {
      settle();
      reject(
        new CapsuleError(ErrorCode.Unreachable, `${address}: ${err.message}`, {
          hint: "check that capsuled runs there and listens on that address",
          cause: err,
        }),
      );
    });
  });
}

/** splitHostPort parses "host:port" or "[v6]:port"; port 0 ("any free port") only with `allowZero`. */
export function splitHostPort(
  address: string,
  opts: { allowZero?: boolean } = {},
): { host: string; port: number } {
  const m = /^\[([^\]]+)\]:(\d+)$/.exec(address) ?? /^([^:]+):(\d+)$/.exec(address);
  if (!m?.[1] || !m[2] || Number(m[2]) < (opts.allowZero ? 0 : 1) || Number(m[2]) > 65535) {
    throw new CapsuleError(ErrorCode.InvalidArgument, `address "${address}" is not HOST:PORT`, {
      hint: "write it as 192.0.2.10:50000",
    });
  }
  return { host: m[1], port: Number(m[2]) };
}
