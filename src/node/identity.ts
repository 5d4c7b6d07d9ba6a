import { randomBytes, webcrypto, X509Certificate as NodeX509 } from "node:crypto";
import { existsSync, readFileSync, renameSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import type * as X509 from "@peculiar/x509";
import { spkiFingerprint } from "../api/fingerprint.js";
import type { Store } from "./store/store.js";

/** loadX509 loads @peculiar/x509 only when a certificate is made (first start): it is heavy to keep resident. */
async function loadX509(): Promise<typeof X509> {
  await import("reflect-metadata"); // @peculiar/x509 (tsyringe) needs the polyfill loaded first
  const x509 = await import("@peculiar/x509");
  x509.cryptoProvider.set(webcrypto as unknown as Parameters<typeof x509.cryptoProvider.set>[0]);
  return x509;
}

/** Identity is who this capsule is: a stable id, its TLS key pair and certificate, and their fingerprint. */
export interface Identity {
  id: string;
  keyPem: string;
  certPem: string;
  fingerprint: string;
  /** created is true when this start generated the key (first start). */
  created: boolean;
}

/** TLS_KEY_FILE and TLS_CERT_FILE live in the state dir; the key is mode 0600 and never leaves the box. */
export const TLS_KEY_FILE = "tls.key";
export const TLS_CERT_FILE = "tls.crt";

const ALG = { name: "ECDSA", namedCurve: "P-256", hash: "SHA-256" } as const;

function writeAtomic(path: string, data: string, mode: number): void {
  const tmp = `${path}.tmp-${process.pid}`;
  writeFileSync(tmp, data, { mode });
  renameSync(tmp, path);
}

/**
 * loadOrCreateIdentity returns the capsule's identity, generating it on first start.
 * Idempotent: later starts load the same id, key and certificate (so the fingerprint is stable).
 * The id is stored in the database and written as the certificate's CN so a client can learn
 * it from the handshake before it holds any token.
 */
export async function loadOrCreateIdentity(stateDir: string, store: Store): Promise<Identity> {
  const keyPath = join(stateDir, TLS_KEY_FILE);
  const certPath = join(stateDir, TLS_CERT_FILE);
  let id = store.getMeta("capsule_id");
  if (!id) {
    id = `cap-${randomBytes(8).toString("hex")}`;
    store.setMeta("capsule_id", id);
  }
  if (existsSync(keyPath) && existsSync(certPath)) {
    const keyPem = readFileSync(keyPath, "utf8");
    const certPem = readFileSync(certPath, "utf8");
    return { id, keyPem, certPem, fingerprint: spkiFingerprint(new NodeX509(certPem)), created: false };
  }
  const keys = (await webcrypto.subtle.generateKey(ALG, true, ["sign", "verify"])) as webcrypto.CryptoKeyPair;
  const pkcs8 = Buffer.from(await webcrypto.subtle.exportKey("pkcs8", keys.privateKey));
  const x509 = await loadX509();
  const keyPem = x509.PemConverter.encode(pkcs8, "PRIVATE KEY");
  const certPem = (await selfSignedCertificate(id, keys)).toString("pem");
  writeAtomic(keyPath, `${keyPem}\n`, 0o600);
  writeAtomic(certPath, `${certPem}\n`, 0o644);
  return { id, keyPem, certPem, fingerprint: spkiFingerprint(new NodeX509(certPem)), created: true };
}

/** selfSignedCertificate makes the capsule's long-lived certificate; identity is the key pin, not the dates. */
export async function selfSignedCertificate(
  id: string,
  keys: webcrypto.CryptoKeyPair,
): Promise<X509.X509Certificate> {
  const x509 = await loadX509();
  const now = Date.now();
  return x509.X509CertificateGenerator.createSelfSigned({
    serialNumber: randomBytes(16)
      .toString("hex")
      .replace(/^[89a-f]/, "1"),
    name: `CN=${id}`,
    notBefore: new Date(now - 24 * 3600_000),
    notAfter: new Date(now + 20 * 365 * 24 * 3600_000),
    signingAlgorithm: ALG,
    keys,
    extensions: [
      new x509.BasicConstraintsExtension(false, undefined, true),
      new x509.KeyUsagesExtension(x509.KeyUsageFlags.digitalSignature, true),
      new x509.ExtendedKeyUsageExtension([
        x509.ExtendedKeyUsage.serverAuth,
        x509.ExtendedKeyUsage.clientAuth,
      ]),
      new x509.SubjectAlternativeNameExtension([{ type: "dns", value: "capsule" }]),
    ],
  });
}

/** fingerprintOfStateDir reads the fingerprint from a state dir without opening the database. */
export function fingerprintOfStateDir(stateDir: string): string {
  return spkiFingerprint(new NodeX509(readFileSync(join(stateDir, TLS_CERT_FILE))));
}
