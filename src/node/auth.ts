import { createPublicKey, type KeyObject } from "node:crypto";
import { decodeProtectedHeader, errors as joseErrors, type JWTPayload, jwtVerify } from "jose";
import {
  CLAIM_PROOF_TYP,
  CLOCK_SKEW_SECONDS,
  MAX_TOKEN_LIFETIME_SECONDS,
  publicKeyFromJwk,
  RPC_TOKEN_TYP,
} from "../api/token.js";
import { CapsuleError, ErrorCode } from "../errors.js";
import type { Clock } from "./host/clock.js";
import type { Store } from "./store/store.js";

/** Principal is who an authenticated call comes from. */
export interface Principal {
  /** kind: an operator (all methods) or an enrolled peer capsule (peer methods only). */
  kind: "operator" | "peer";
  /** id is the operator's key id, or the peer's capsule id. */
  id: string;
  name: string;
}

/** PeerKeyLookup finds an enrolled peer capsule by the key id of its signing key. */
export type PeerKeyLookup = (
  kid: string,
) => { capsuleId: string; name: string; peerKeyJwk: string } | undefined;

function unauth(message: string, hint?: string, cause?: unknown): CapsuleError {
  return new CapsuleError(ErrorCode.Unauthenticated, message, { hint, cause });
}

/**
 * Authenticator checks per-call EdDSA JWTs: algorithm pinned to EdDSA (never `none` or HMAC),
 * explicit `typ`, `aud` = this capsule's id, `mth` = the called method, short lifetime with at
 * most {@link CLOCK_SKEW_SECONDS} of skew, and a `jti` never accepted twice (persisted, so also
 * not after a restart). The jti is recorded only after every other check passed, so a refused
 * token has no side effect.
 */
export class Authenticator {
  constructor(
    private readonly store: Store,
    private readonly clock: Clock,
    private readonly audience: string,
    private readonly peerLookup: PeerKeyLookup = () => undefined,
  ) {}

  /** authenticate verifies the `authorization` value for a call of `method`; throws a CapsuleError when refused. */
  async authenticate(authorization: string | undefined, method: string): Promise<Principal> {
    if (!authorization) {
      throw unauth(
        "no token on the call",
        "adopt this capsule first: capsulectl adopt HOST:PORT --name NAME",
      );
    }
    const m = /^Bearer ([A-Za-z0-9_-]+\.[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*)$/.exec(authorization);
    if (!m?.[1]) throw unauth("malformed authorization header (want: Bearer <jwt>)");
    const token = m[1];
    const header = this.header(token, RPC_TOKEN_TYP);
    const op = this.store.getOperator(header.kid);
    const peer = op ? undefined : this.peerLookup(header.kid);
    if (!op && !peer) {
      throw new CapsuleError(
        ErrorCode.UnknownOperator,
        `operator key ${header.kid} is not enrolled on this capsule`,
        {
          hint: "ask an adopted operator to run: capsulectl operator add NAME --public-key-file KEY.jwk",
        },
      );
    }
    const jwk = op ? op.publicKeyJwk : peer!.peerKeyJwk;
    const payload = await this.verify(token, publicKeyFromJwk(jwk), RPC_TOKEN_TYP);
    if (payload["mth"] !== method) {
      throw unauth(`token was minted for ${String(payload["mth"])}, not ${method}`);
    }
    this.consume(payload);
    return op
      ? { kind: "operator", id: op.id, name: op.name }
      : { kind: "peer", id: peer!.capsuleId, name: peer!.name };
  }

  /**
   * verifyClaimProof checks the proof-of-possession JWT sent with Claim against the public key
   * being enrolled. Like {@link authenticate}, it records the jti only on success.
   */
  async verifyClaimProof(proof: string, publicKey: KeyObject, kid: string): Promise<void> {
    const header = this.header(proof, CLAIM_PROOF_TYP);
    if (header.kid !== kid) throw unauth("claim proof is not signed by the key being enrolled");
    const payload = await this.verify(proof, publicKey, CLAIM_PROOF_TYP);
    this.consume(payload);
  }

  private header(token: string, typ: string): { kid: string } {
    let h: ReturnType<typeof decodeProtectedHeader>;
    try {
      h = decodeProtectedHeader(token);
    } catch (e) {
      throw unauth("token is not a JWS", undefined, e);
    }
    if (h.alg !== "EdDSA") throw unauth(`token algorithm ${String(h.alg)} is not accepted (only EdDSA)`);
    if (h.typ !== typ) throw unauth(`token type ${String(h.typ)} is not accepted here (want ${typ})`);
    if (typeof h.kid !== "string" || h.kid.length === 0) throw unauth("token has no key id (kid)");
    return { kid: h.kid };
  }

  private async verify(token: string, key: KeyObject, typ: string): Promise<JWTPayload> {
    const nowMs = this.clock.now();
    let payload: JWTPayload;
    try {
      ({ payload } = await jwtVerify(token, key, {
        algorithms: ["EdDSA"],
        typ,
        audience: this.audience,
        clockTolerance: CLOCK_SKEW_SECONDS,
        currentDate: new Date(nowMs),
        requiredClaims: ["exp", "iat", "jti", "aud"],
      }));
    } catch (e) {
      if (e instanceof joseErrors.JWTExpired) {
        throw new CapsuleError(ErrorCode.TokenExpired, "token expired", {
          hint: "check this machine's clock against the capsule's (at most 60 s apart)",
          cause: e,
        });
      }
      if (e instanceof joseErrors.JWTClaimValidationFailed) {
        throw unauth(
          `token refused: ${e.claim} ${e.reason === "check_failed" ? "check failed" : e.reason}`,
          undefined,
          e,
        );
      }
      throw unauth(`token refused: ${(e as Error).message}`, undefined, e);
    }
    const { iat, exp, jti } = payload as { iat: number; exp: number; jti: unknown };
    if (typeof jti !== "string" || jti.length < 16 || jti.length > 128)
      throw unauth("token jti is missing or malformed");
    if (exp - iat > MAX_TOKEN_LIFETIME_SECONDS) {
      throw unauth(`token lives ${exp - iat} s; at most ${MAX_TOKEN_LIFETIME_SECONDS} s is accepted`);
    }
    if (iat * 1000 > nowMs + CLOCK_SKEW_SECONDS * 1000) {
      throw unauth("token was issued in the future", "check this machine's clock against the capsule's");
    }
    return payload;
  }

  private consume(payload: JWTPayload): void {
    const expiresAt = ((payload.exp as number) + CLOCK_SKEW_SECONDS) * 1000;
    if (!this.store.useToken(payload.jti as string, expiresAt)) {
      throw new CapsuleError(ErrorCode.TokenReplayed, "token was already used (replay refused)", {
        hint: "every call needs a fresh token; capsulectl mints one per call",
      });
    }
  }
}

/** publicKeyPemToJwk accepts an SPKI PEM for `operator add` convenience. */
export function publicKeyPemToJwk(pem: string): string {
  return JSON.stringify(createPublicKey(pem).export({ format: "jwk" }));
}
