import { createPrivateKey, createPublicKey, generateKeyPairSync } from "node:crypto";

/** WgKeyPair is a WireGuard (Curve25519) key pair in wg's base64 form. */
export interface WgKeyPair {
  privateKey: string;
  publicKey: string;
}

const b64 = (b64url: string) => Buffer.from(b64url, "base64url").toString("base64");

/** generateWgKey makes a fresh X25519 key pair on this box (the private key never leaves it). */
export function generateWgKey(): WgKeyPair {
  const { privateKey } = generateKeyPairSync("x25519");
  const jwk = privateKey.export({ format: "jwk" });
  return { privateKey: b64(jwk.d!), publicKey: b64(jwk.x!) };
}

/** wgPublicKey derives the public key from a base64 private key (what `wg pubkey` does). */
export function wgPublicKey(privateKey: string): string {
  const d = Buffer.from(privateKey, "base64");
  if (d.length !== 32) throw new Error("WireGuard private key must be 32 bytes of base64");
  // PKCS#8 wrapper for a raw X25519 private key.
  const der = Buffer.concat([Buffer.from("302e020100300506032b656e04220420", "hex"), d]);
  const pub = createPublicKey(createPrivateKey({ key: der, format: "der", type: "pkcs8" }));
  return b64(pub.export({ format: "jwk" }).x!);
}

/** isWgKey reports whether s is 32 bytes of base64 (a WireGuard key). */
export function isWgKey(s: string): boolean {
  return /^[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=$/.test(s);
}
