import { createHash, X509Certificate } from "node:crypto";

/**
 * spkiFingerprint returns "SHA256:<base64>" (unpadded, as OpenSSH prints) of a certificate's
 * SubjectPublicKeyInfo. Pinning the key rather than the certificate lets a capsule renew its
 * certificate without breaking clients, and refuses any other key whatever chain it presents.
 */
export function spkiFingerprint(cert: X509Certificate | Buffer | string): string {
  const x = cert instanceof X509Certificate ? cert : new X509Certificate(cert);
  const der = x.publicKey.export({ type: "spki", format: "der" });
  return `SHA256:${createHash("sha256").update(der).digest("base64").replace(/=+$/, "")}`;
}

/** isFingerprint reports whether `s` has the "SHA256:<base64>" form. */
export function isFingerprint(s: string): boolean {
  return /^SHA256:[A-Za-z0-9+/]{43}$/.test(s);
}
