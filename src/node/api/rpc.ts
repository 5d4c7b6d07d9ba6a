import type * as grpc from "@grpc/grpc-js";
import type { Logger } from "pino";
import { toServiceError } from "../../api/errors.js";
import { AUTH_METADATA } from "../../api/token.js";
import { CapsuleError, ErrorCode, toCapsuleError } from "../../errors.js";
import type { Authenticator, Principal } from "../auth.js";
import type { Metrics } from "../metrics.js";

/** RpcContext is what a handler gets besides its request. */
export interface RpcContext {
  /** principal is the authenticated caller; null only for unauthenticated methods (Claim). */
  principal: Principal | null;
  method: string;
}

/** Handler implements one unary method. */
export type Handler<Req, Res> = (req: Req, ctx: RpcContext) => Promise<Res> | Res;

/** RpcDeps are what every wrapped method needs. */
export interface RpcDeps {
  auth: Authenticator;
  metrics: Metrics;
  log: Logger;
}

/** refused records a failed call (metrics, one log line) and returns it as a CapsuleError. */
function refused(deps: RpcDeps, path: string, finish: (code: string) => void, e: unknown): CapsuleError {
  const ce = toCapsuleError(e);
  finish(ce.code);
  deps.log.info({ method: path, code: ce.code, err: ce.message }, "rpc refused");
  return ce;
}

/** settle answers a single-response call with the outcome of `work`, recording it. */
function settle<Res>(
  deps: RpcDeps,
  path: string,
  finish: (code: string) => void,
  work: Promise<Res>,
  callback: grpc.sendUnaryData<Res>,
): void {
  work.then(
    (res) => {
      finish("OK");
      callback(null, res);
    },
    (e: unknown) => callback(toServiceError(refused(deps, path, finish, e))),
  );
}

/**
 * authorize checks the call's token for `path` (unless `public`) and returns the caller; peer
 * capsules pass only methods marked `peer`. Shared by {@link unary} and the streaming wrappers.
 */
export async function authorize(
  deps: RpcDeps,
  path: string,
  metadata: grpc.Metadata,
  opts: { public?: boolean; peer?: boolean } = {},
): Promise<Principal | null> {
  if (opts.public) return null;
  const header = metadata.get(AUTH_METADATA)[0];
  const principal = await deps.auth.authenticate(header === undefined ? undefined : String(header), path);
  if (principal.kind === "peer" && !opts.peer) {
    throw new CapsuleError(ErrorCode.PermissionDenied, `peer capsules may not call ${path}`);
  }
  return principal;
}

/** rpcMeter starts timing a call; the returned function records it with its final code. */
export function rpcMeter(deps: RpcDeps, path: string): (code: string) => void {
  const started = process.hrtime.bigint();
  return (code: string) => {
    deps.metrics.rpcRequests.inc({ method: path, code });
    deps.metrics.rpcDuration.observe({ method: path }, Number(process.hrtime.bigint() - started) / 1e9);
  };
}

/**
 * unary wraps a handler with authentication (unless `public`), metrics and error mapping.
 * Peer capsules may call only methods marked `peer`; operators may call every method.
 * Every method of every service goes through it, so no path skips the token check.
 */
export function unary<Req, Res>(
  deps: RpcDeps,
  path: string,
  handler: Handler<Req, Res>,
  opts: { public?: boolean; peer?: boolean } = {},
): grpc.handleUnaryCall<Req, Res> {
  return (call, callback) => {
    const finish = rpcMeter(deps, path);
    settle(
      deps,
      path,
      finish,
      (async () => {
        const principal = await authorize(deps, path, call.metadata, opts);
        return handler(call.request, { principal, method: path });
      })(),
      callback,
    );
  };
}

/**
 * clientStream wraps a client-streaming handler exactly like {@link unary} wraps a unary one:
 * authentication before the first byte is read, metrics, error mapping.
 */
export function clientStream<Req, Res>(
  deps: RpcDeps,
  path: string,
  handler: (stream: AsyncIterable<Req>, ctx: RpcContext) => Promise<Res>,
): grpc.handleClientStreamingCall<Req, Res> {
  return (call, callback) => {
    const finish = rpcMeter(deps, path);
    settle(
      deps,
      path,
      finish,
      (async () => {
        const principal = await authorize(deps, path, call.metadata);
        return handler(call as AsyncIterable<Req>, { principal, method: path });
      })(),
      callback,
    );
  };
}

/**
 * serverStream wraps a server-streaming handler exactly like {@link unary} wraps a unary one
 * (authentication, metrics, error mapping). The handler yields messages; a cancelled call
 * aborts `signal`. Writes wait for the client (backpressure).
 */
export function serverStream<Req, Res>(
  deps: RpcDeps,
  path: string,
  handler: (req: Req, ctx: RpcContext, signal: AbortSignal) => AsyncIterable<Res>,
): grpc.handleServerStreamingCall<Req, Res> {
  return (call) => {
    streamOut(deps, path, call, (ctx, signal) => handler(call.request, ctx, signal));
  };
}

/**
 * bidiStream wraps a bidirectional-streaming handler exactly like {@link unary} wraps a unary
 * one: authentication before the first message is read, metrics, error mapping. The handler
 * reads the client's messages from `input` and yields its own; a cancelled call aborts
 * `signal`. Writes wait for the client (backpressure).
 */
export function bidiStream<Req, Res>(
  deps: RpcDeps,
  path: string,
  handler: (input: AsyncIterable<Req>, ctx: RpcContext, signal: AbortSignal) => AsyncIterable<Res>,
): grpc.handleBidiStreamingCall<Req, Res> {
  return (call) => {
    // Not the stream's own iterator: that destroys the call when the client half-closes, and
    // with it everything the handler still has to send.
    const input = call.iterator({ destroyOnReturn: false }) as AsyncIterable<Req>;
    streamOut(deps, path, call, (ctx, signal) => handler(input, ctx, signal));
  };
}

/** streamOut authorizes a streaming call, writes what `produce` yields, and ends or fails the call (both server-streaming wrappers). */
function streamOut<Res>(
  deps: RpcDeps,
  path: string,
  call: grpc.ServerWritableStream<unknown, Res> | grpc.ServerDuplexStream<unknown, Res>,
  produce: (ctx: RpcContext, signal: AbortSignal) => AsyncIterable<Res>,
): void {
  const finish = rpcMeter(deps, path);
  const abort = new AbortController();
  call.on("cancelled", () => abort.abort());
  call.on("close", () => abort.abort());
  (async () => {
    const principal = await authorize(deps, path, call.metadata);
    for await (const msg of produce({ principal, method: path }, abort.signal)) {
      if (abort.signal.aborted) break;
      if (!call.write(msg)) {
        await new Promise<void>((r) => {
          call.once("drain", r);
          abort.signal.addEventListener("abort", () => r(), { once: true });
        });
      }
    }
  })().then(
    () => {
      finish(abort.signal.aborted ? "CANCELLED" : "OK");
      if (!abort.signal.aborted) call.end();
    },
    (e: unknown) => {
      const ce = refused(deps, path, finish, e);
      // grpc-js turns an "error" event into the call's status (code, details, metadata).
      call.emit("error", Object.assign(new Error(ce.message), toServiceError(ce)));
    },
  );
}

/** needRuntime throws CAPSULE_FAILED_PRECONDITION when the workload runtime is not available. */
export function needRuntime<T>(rt: T | undefined): T {
  if (rt === undefined) {
    throw new CapsuleError(ErrorCode.FailedPrecondition, "workloads are not available on this capsule", {
      hint: "they need the fabric (capsuled without --no-fabric) and containerd; see capsuled's log",
    });
  }
  return rt;
}
