import * as grpc from "@grpc/grpc-js";
import { CapsuleError, ErrorCode, type ErrorCodeValue } from "../errors.js";

/** Metadata keys that carry a CapsuleError's code and hint across the wire. */
export const ERROR_CODE_METADATA = "capsule-error-code";
export const ERROR_HINT_METADATA = "capsule-error-hint";

const GRPC_STATUS: Partial<Record<ErrorCodeValue, grpc.status>> = {
  [ErrorCode.InvalidArgument]: grpc.status.INVALID_ARGUMENT,
  [ErrorCode.NotFound]: grpc.status.NOT_FOUND,
  [ErrorCode.AlreadyExists]: grpc.status.ALREADY_EXISTS,
  [ErrorCode.ClaimClosed]: grpc.status.FAILED_PRECONDITION,
  [ErrorCode.FailedPrecondition]: grpc.status.FAILED_PRECONDITION,
  [ErrorCode.Unauthenticated]: grpc.status.UNAUTHENTICATED,
  [ErrorCode.UnknownOperator]: grpc.status.UNAUTHENTICATED,
  [ErrorCode.TokenExpired]: grpc.status.UNAUTHENTICATED,
  [ErrorCode.TokenReplayed]: grpc.status.UNAUTHENTICATED,
  [ErrorCode.PermissionDenied]: grpc.status.PERMISSION_DENIED,
  [ErrorCode.Unsupported]: grpc.status.UNIMPLEMENTED,
  [ErrorCode.Timeout]: grpc.status.DEADLINE_EXCEEDED,
};

/** grpcStatusFor maps a stable code to the gRPC status the server answers with. */
export function grpcStatusFor(code: ErrorCodeValue): grpc.status {
  return GRPC_STATUS[code] ?? grpc.status.INTERNAL;
}

/** toServiceError turns a CapsuleError into a gRPC error whose metadata keeps code and hint. */
export function toServiceError(e: CapsuleError): Partial<grpc.StatusObject> {
  const metadata = new grpc.Metadata();
  metadata.set(ERROR_CODE_METADATA, e.code);
  if (e.hint) metadata.set(ERROR_HINT_METADATA, e.hint.replace(/[\r\n]+/g, " "));
  return { code: grpcStatusFor(e.code), details: e.message.replace(/[\r\n]+/g, " "), metadata };
}

/** fromServiceError turns a gRPC client error back into a CapsuleError. */
export function fromServiceError(e: grpc.ServiceError, target: string): CapsuleError {
  const code = e.metadata?.get(ERROR_CODE_METADATA)[0]?.toString() as ErrorCodeValue | undefined;
  const hint = e.metadata?.get(ERROR_HINT_METADATA)[0]?.toString();
  if (code) return new CapsuleError(code, e.details || e.message, { hint, cause: e });
  switch (e.code) {
    case grpc.status.DEADLINE_EXCEEDED:
      return new CapsuleError(ErrorCode.Timeout, `${target}: no answer before the deadline`, {
        hint: "check that capsuled runs there and the address is reachable (firewall, NAT, VPN)",
        cause: e,
      });
    case grpc.status.UNAVAILABLE:
      return new CapsuleError(ErrorCode.Unreachable, `${target}: unreachable (${e.details || e.message})`, {
        hint: "check that capsuled runs there and listens on that address",
        cause: e,
      });
    case grpc.status.UNAUTHENTICATED:
      return new CapsuleError(ErrorCode.Unauthenticated, `${target}: ${e.details}`, { cause: e });
    default:
      return new CapsuleError(ErrorCode.Internal, `${target}: ${e.details || e.message}`, { cause: e });
  }
}
