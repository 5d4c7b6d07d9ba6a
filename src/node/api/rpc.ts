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
    const started = process.hrtime.bigint();
    const finish = (code: string) => {
      deps.metrics.rpcRequests.inc({ method: path, code });
      deps.metrics.rpcDuration.observe({ method: path }, Number(process.hrtime.bigint() - started) / 1e9);
    };
    (async () => {
      let principal: Principal | null = null;
      if (!opts.public) {
        const header = call.metadata.get(AUTH_METADATA)[0];
        principal = await deps.auth.authenticate(header === undefined ? undefined : String(header), path);
        if (principal.kind === "peer" && !opts.peer) {
          throw new CapsuleError(ErrorCode.PermissionDenied, `peer capsules may not call ${path}`);
        }
      }
      return handler(call.request, { principal, method: path });
    })().then(
      (res) => {
        finish("OK");
        callback(null, res);
      },
      (e: unknown) => {
        const ce = toCapsuleError(e);
        finish(ce.code);
        deps.log.info({ method: path, code: ce.code, err: ce.message }, "rpc refused");
        callback(toServiceError(ce));
      },
    );
  };
}
