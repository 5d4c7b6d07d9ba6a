import {
  createPrivateKey,
  createPublicKey,
  generateKeyPairSync,
  type KeyObject,
  randomUUID,
} from "node:crypto";
import { calculateJwkThumbprint, type JWK, SignJWT } from "jose";

/** RPC_TOKEN_TYP is the JWT `typ` of a per-call token; the server refuses any other. */
export const RPC_TOKEN_TYP = "capsule-rpc+jwt";
/** CLAIM_PROOF_TYP is the JWT `typ` of the proof-of-possession sent with Claim. */
export const CLAIM_PROOF_TYP = "capsule-claim+jwt";
/** TOKEN_TTL_SECONDS is how long a minted token lives. */
export const TOKEN_TTL_SECONDS = 60;
/** MAX_TOKEN_LIFETIME_SECONDS is the longest exp - iat a server accepts. */
export const MAX_TOKEN_LIFETIME_SECONDS = 120;
/** CLOCK_SKEW_SECONDS is the clock tolerance applied to exp/nbf/iat. */
export const CLOCK_SKEW_SECONDS = 60;
/** AUTH_METADATA is the gRPC metadata key carrying "Bearer <jwt>". */
export const AUTH_METADATA = "authorization";

/** Signer is an Ed25519 private key and the key id (JWK thumbprint) servers know it by. */
export interface Signer {
  kid: string;
  privateKey: KeyObject;
  publicJwk: JWK;
}

/** generateSigner makes a fresh Ed25519 key pair. */
export async function generateSigner(): Promise<{ signer: Signer; privatePem: string }> {
  const { privateKey } = generateKeyPairSync("ed25519");
  const privatePem = privateKey.export({ type: "pkcs8", format: "pem" }).toString();
  return { signer: await signerFromPem(privatePem), privatePem };
}

/** signerFromPem loads an Ed25519 PKCS#8 PEM private key. */
export async function signerFromPem(pem: string): Promise<Signer> {
  const privateKey = createPrivateKey(pem);
  if (privateKey.asymmetricKeyType !== "ed25519") throw new Error("operator key must be Ed25519");
  const publicJwk = createPublicKey(privateKey).export({ format: "jwk" }) as JWK;
  const kid = await calculateJwkThumbprint(publicJwk, "sha256");
  return { kid, privateKey, publicJwk };
}

/** publicKeyFromJwk parses a public Ed25519 JWK (JSON text or object); throws on any other key type. */
export function publicKeyFromJwk(jwk: string | JWK): KeyObject {
  const obj = typeof jwk === "string" ? (JSON.parse(jwk) as JWK) : jwk;
  if (obj.kty !== "OKP" || obj.crv !== "Ed25519" || typeof obj.x !== "string" || "d" in obj) {
    throw new Error("public key must be an Ed25519 public JWK (kty OKP, crv Ed25519)");
  }
  return createPublicKey({ key: { kty: "OKP", crv: "Ed25519", x: obj.x }, format: "jwk" });
}

/** jwkThumbprint is the RFC 7638 SHA-256 thumbprint used as key id. */
export async function jwkThumbprint(jwk: JWK): Promise<string> {
  return calculateJwkThumbprint({ kty: jwk.kty, crv: jwk.crv, x: jwk.x } as JWK, "sha256");
}

/**
 * mintRpcToken makes a fresh token for one call: `aud` the capsule id, `mth` the full gRPC
 * method path ("/capsule.v1.Capsule/Info"), a random `jti`, and a short `exp`.
 */
export async function mintRpcToken(
  signer: Signer,
  audience: string,
  method: string,
  nowMs = Date.now(),
): Promise<string> {
  const iat = Math.floor(nowMs / 1000);
  return new SignJWT({ mth: method })
    .setProtectedHeader({ alg: "EdDSA", typ: RPC_TOKEN_TYP, kid: signer.kid })
    .setAudience(audience)
    .setIssuer(signer.kid)
    .setJti(randomUUID())
    .setIssuedAt(iat)
    .setNotBefore(iat)
    .setExpirationTime(iat + TOKEN_TTL_SECONDS)
    .sign(signer.privateKey);
}

/** mintClaimProof proves possession of the operator key to a capsule in its claim window. */
export async function mintClaimProof(signer: Signer, audience: string, nowMs = Date.now()): Promise<string> {
  const iat = Math.floor(nowMs / 1000);
  return new SignJWT({})
    .setProtectedHeader({ alg: "EdDSA", typ: CLAIM_PROOF_TYP, kid: signer.kid })
    .setAudience(audience)
    .setIssuer(signer.kid)
    .setJti(randomUUID())
    .setIssuedAt(iat)
    .setExpirationTime(iat + TOKEN_TTL_SECONDS)
    .sign(signer.privateKey);
}
