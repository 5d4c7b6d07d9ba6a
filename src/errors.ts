/**
 * Errors: one module, one class a family, each with a stable string `code` callers match on,
 * a one-line `message`, an optional `hint` (what to do next) and `cause`.
 *
 * The CLI prints `error: <message>` and, when present, `hint: <hint>`; the API maps
 * codes to gRPC status codes (see {@link grpcStatusFor}) and carries the code and hint
 * in trailing metadata so a remote error reaches the user intact.
 */

/** ErrorCode lists every stable error code. Never rename one: scripts match on them. */
export const ErrorCode = {
  Internal: "CAPSULE_INTERNAL",
  InvalidArgument: "CAPSULE_INVALID_ARGUMENT",
  InvalidConfig: "CAPSULE_INVALID_CONFIG",
  NotFound: "CAPSULE_NOT_FOUND",
  AlreadyExists: "CAPSULE_ALREADY_EXISTS",
  UnknownContext: "CAPSULE_UNKNOWN_CONTEXT",
  NoContext: "CAPSULE_NO_CONTEXT",
  Unreachable: "CAPSULE_UNREACHABLE",
  Timeout: "CAPSULE_TIMEOUT",
  FingerprintMismatch: "CAPSULE_FINGERPRINT_MISMATCH",
  FingerprintRejected: "CAPSULE_FINGERPRINT_REJECTED",
  ClaimClosed: "CAPSULE_CLAIM_CLOSED",
  Unauthenticated: "CAPSULE_UNAUTHENTICATED",
  UnknownOperator: "CAPSULE_UNKNOWN_OPERATOR",
  TokenExpired: "CAPSULE_TOKEN_EXPIRED",
  TokenReplayed: "CAPSULE_TOKEN_REPLAYED",
  PermissionDenied: "CAPSULE_PERMISSION_DENIED",
  FailedPrecondition: "CAPSULE_FAILED_PRECONDITION",
  CommandFailed: "CAPSULE_COMMAND_FAILED",
  StateCorrupt: "CAPSULE_STATE_CORRUPT",
  Unsupported: "CAPSULE_UNSUPPORTED",
} as const;

/** ErrorCodeValue is the union of the stable codes. */
export type ErrorCodeValue = (typeof ErrorCode)[keyof typeof ErrorCode];

/** CapsuleErrorOptions: `hint` and `cause` are optional; `details` is extra structured context. */
export interface CapsuleErrorOptions {
  hint?: string | undefined;
  cause?: unknown;
  details?: Record<string, unknown>;
}

/** CapsuleError is the base of every error Capsule raises on purpose. */
export class CapsuleError extends Error {
  override name = "CapsuleError";
  readonly code: ErrorCodeValue;
  readonly hint: string | undefined;
  readonly details: Record<string, unknown> | undefined;

  constructor(code: ErrorCodeValue, message: string, opts: CapsuleErrorOptions = {}) {
    super(message, opts.cause === undefined ? undefined : { cause: opts.cause });
    this.code = code;
    this.hint = opts.hint;
    this.details = opts.details;
  }
}

/** isCapsuleError reports whether `e` is a CapsuleError, optionally with the given code. */
export function isCapsuleError(e: unknown, code?: ErrorCodeValue): e is CapsuleError {
  return e instanceof CapsuleError && (code === undefined || e.code === code);
}

/** invalidArgument names the offending field and the fix. */
export function invalidArgument(field: string, problem: string, hint?: string): CapsuleError {
  return new CapsuleError(ErrorCode.InvalidArgument, `${field}: ${problem}`, { hint, details: { field } });
}

/** CommandError is a failed subprocess: it carries the argument list, exit code and output. */
export class CommandError extends CapsuleError {
  override name = "CommandError";
  readonly argv: readonly string[];
  readonly exitCode: number | undefined;
  readonly stdout: string;
  readonly stderr: string;

  constructor(
    argv: readonly string[],
    exitCode: number | undefined,
    stdout: string,
    stderr: string,
    cause?: unknown,
  ) {
    const out = (stderr || stdout).trim().split("\n").slice(-3).join(" | ");
    super(ErrorCode.CommandFailed, `${argv.join(" ")}: exit ${exitCode ?? "?"}${out ? `: ${out}` : ""}`, {
      cause,
    });
    this.argv = argv;
    this.exitCode = exitCode;
    this.stdout = stdout;
    this.stderr = stderr;
  }
}

/** toCapsuleError wraps anything thrown into a CapsuleError (Internal unless it already is one). */
export function toCapsuleError(e: unknown): CapsuleError {
  if (e instanceof CapsuleError) return e;
  const msg = e instanceof Error ? e.message : String(e);
  return new CapsuleError(ErrorCode.Internal, msg, { cause: e });
}

/** formatError renders an error as the one line (plus hint line) the user sees. */
export function formatError(e: unknown): string {
  const ce = toCapsuleError(e);
  return ce.hint ? `error: ${ce.message}\nhint: ${ce.hint}` : `error: ${ce.message}`;
}
