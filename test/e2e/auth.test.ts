// End-to-end: real capsuled processes on loopback, driven through the real API client with
// real and deliberately crafted tokens. Every refused call must leave the operator list as it was.
import { createHmac, generateKeyPairSync, randomUUID } from "node:crypto";
import { connect as tlsConnect } from "node:tls";
import { execFileSync } from "node:child_process";
import { rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { SignJWT } from "jose";
import t from "tap";
import { probeCertificate, RpcClient } from "../../src/api/client.js";
import { spkiFingerprint } from "../../src/api/fingerprint.js";
import {
  generateSigner,
  mintClaimProof,
  mintRpcToken,
  RPC_TOKEN_TYP,
  type Signer,
} from "../../src/api/token.js";
import type { CapsuleError } from "../../src/errors.js";
import { type Daemon, removeDir, startDaemon, tempDir } from "../helpers/capsuled.js";

const b64 = (o: object) => Buffer.from(JSON.stringify(o)).toString("base64url");

async function claim(d: Daemon, signer: Signer, name = "alice"): Promise<RpcClient> {
  const probe = await probeCertificate(d.address);
  const c = new RpcClient(
    { address: d.address, certPem: probe.certPem, fingerprint: probe.fingerprint, capsuleId: d.id },
    signer,
  );
  await c.call(
    "Claim",
    {
      operator: { id: signer.kid, name, publicKeyJwk: JSON.stringify(signer.publicJwk) },
      proof: await mintClaimProof(signer, d.id),
    },
    { token: null },
  );
  return c;
}

async function craft(
  signer: Signer,
  over: { header?: object; claims?: object; iat?: number; key?: Signer["privateKey"] },
): Promise<string> {
  const iat = over.iat ?? Math.floor(Date.now() / 1000);
  return new SignJWT({ mth: "/capsule.v1.Capsule/AddOperator", ...over.claims })
    .setProtectedHeader({ alg: "EdDSA", typ: RPC_TOKEN_TYP, kid: signer.kid, ...over.header })
    .setIssuedAt(iat)
    .setExpirationTime(iat + 60)
    .setJti(randomUUID())
    .setAudience((over.claims as { aud?: string } | undefined)?.aud ?? "")
    .sign(over.key ?? signer.privateKey);
}

t.test("adopt, tokens, replay, restart", async (t) => {
  const dir = tempDir();
  t.teardown(() => removeDir(dir));
  let d = await startDaemon({ stateDir: dir });
  t.teardown(() => d.kill("SIGKILL"));
  const { signer } = await generateSigner();
  const client = await claim(d, signer);
  t.teardown(() => client.close());

  const info = await client.call<{
    id: string;
    fingerprint: string;
    claimOpen: boolean;
    operatorCount: number;
  }>("Info", {});
  t.equal(info.id, d.id);
  t.equal(info.fingerprint, d.fingerprint);
  t.equal(info.claimOpen, false, "claim window closes once an operator is enrolled");
  t.equal(info.operatorCount, 1);

  // A second claim, even by the same key, is refused: the window is closed for good.
  await t.rejects(claim(d, (await generateSigner()).signer, "mallory"), { code: "CAPSULE_CLAIM_CLOSED" });

  const other = (await generateSigner()).signer;
  const addReq = { operator: { name: "bob", publicKeyJwk: JSON.stringify(other.publicJwk) } };
  const count = async () =>
    (await client.call<{ operators: unknown[] }>("ListOperators", {})).operators.length;

  const now = Math.floor(Date.now() / 1000);
  const good = () => craft(signer, { claims: { aud: d.id } });
  const bad: [string, () => Promise<string> | string, string][] = [
    ["expired", () => craft(signer, { claims: { aud: d.id }, iat: now - 600 }), "CAPSULE_TOKEN_EXPIRED"],
    [
      "not yet valid",
      () => craft(signer, { claims: { aud: d.id, nbf: now + 600 }, iat: now + 600 }),
      "CAPSULE_UNAUTHENTICATED",
    ],
    [
      "wrong audience",
      () => craft(signer, { claims: { aud: "cap-someoneelse" } }),
      "CAPSULE_UNAUTHENTICATED",
    ],
    [
      "wrong method",
      () => craft(signer, { claims: { aud: d.id, mth: "/capsule.v1.Capsule/Info" } }),
      "CAPSULE_UNAUTHENTICATED",
    ],
    ["unknown key", () => craft(other, { claims: { aud: d.id } }), "CAPSULE_UNKNOWN_OPERATOR"],
    [
      "wrong key, known kid",
      () => craft(signer, { claims: { aud: d.id }, key: other.privateKey }),
      "CAPSULE_UNAUTHENTICATED",
    ],
    [
      "wrong typ",
      () => craft(signer, { claims: { aud: d.id }, header: { typ: "JWT" } }),
      "CAPSULE_UNAUTHENTICATED",
    ],
    [
      "too long-lived",
      async () => {
        return new SignJWT({ mth: "/capsule.v1.Capsule/AddOperator" })
          .setProtectedHeader({ alg: "EdDSA", typ: RPC_TOKEN_TYP, kid: signer.kid })
          .setIssuedAt(now)
          .setExpirationTime(now + 3600)
          .setJti(randomUUID())
          .setAudience(d.id)
          .sign(signer.privateKey);
      },
      "CAPSULE_UNAUTHENTICATED",
    ],
    [
      "alg none",
      () => {
        const body = b64({
          mth: "/capsule.v1.Capsule/AddOperator",
          aud: d.id,
          iat: now,
          exp: now + 60,
          jti: randomUUID(),
        });
        return `${b64({ alg: "none", typ: RPC_TOKEN_TYP, kid: signer.kid })}.${body}.`;
      },
      "CAPSULE_UNAUTHENTICATED",
    ],
    [
      "HMAC keyed with the public key",
      () => {
        const h = b64({ alg: "HS256", typ: RPC_TOKEN_TYP, kid: signer.kid });
        const body = b64({
          mth: "/capsule.v1.Capsule/AddOperator",
          aud: d.id,
          iat: now,
          exp: now + 60,
          jti: randomUUID(),
        });
        const secret = JSON.stringify(signer.publicJwk);
        return `${h}.${body}.${createHmac("sha256", secret).update(`${h}.${body}`).digest("base64url")}`;
      },
      "CAPSULE_UNAUTHENTICATED",
    ],
    [
      "unsigned (signature stripped)",
      async () => (await good()).replace(/\.[^.]+$/, "."),
      "CAPSULE_UNAUTHENTICATED",
    ],
    ["no token", () => "", "CAPSULE_UNAUTHENTICATED"],
  ];
  for (const [label, make, code] of bad) {
    const tok = await make();
    await t.rejects(client.call("AddOperator", addReq, { token: tok || null }), { code }, label);
  }
  t.equal(await count(), 1, "no refused token had a side effect");

  // Replay in the same process.
  const once = await good();
  await client.call("AddOperator", addReq, { token: once });
  t.equal(await count(), 2, "a good crafted token works once");
  await t.rejects(client.call("AddOperator", addReq, { token: once }), { code: "CAPSULE_TOKEN_REPLAYED" });

  // Replay after SIGKILL + restart; identity, fingerprint and operators survive.
  const replay = await mintRpcToken(signer, d.id, "/capsule.v1.Capsule/Info");
  await client.call("Info", {}, { token: replay });
  const before = { id: d.id, fingerprint: d.fingerprint };
  await d.kill("SIGKILL");
  d = await startDaemon({ stateDir: dir, port: d.port });
  t.same({ id: d.id, fingerprint: d.fingerprint }, before, "identity and fingerprint survive SIGKILL");
  const client2 = new RpcClient(
    {
      address: d.address,
      certPem: (await probeCertificate(d.address)).certPem,
      fingerprint: before.fingerprint,
      capsuleId: d.id,
    },
    signer,
  );
  t.teardown(() => client2.close());
  await t.rejects(
    client2.call("Info", {}, { token: replay }),
    { code: "CAPSULE_TOKEN_REPLAYED" },
    "replay after restart",
  );
  t.equal(
    (await client2.call<{ operators: unknown[] }>("ListOperators", {})).operators.length,
    2,
    "operators survive",
  );

  // Removing keys: the last one cannot go.
  await client2.call("RemoveOperator", { id: other.kid });
  await t.rejects(client2.call("RemoveOperator", { id: signer.kid }), {
    code: "CAPSULE_FAILED_PRECONDITION",
  });
});

t.test("claim window closes on its timer, also across restart", async (t) => {
  const dir = tempDir();
  t.teardown(() => removeDir(dir));
  let d = await startDaemon({ stateDir: dir, args: ["--claim-window", "1s"] });
  t.teardown(() => d.kill("SIGKILL"));
  await new Promise((r) => setTimeout(r, 1300));
  const { signer } = await generateSigner();
  await t.rejects(claim(d, signer), { code: "CAPSULE_CLAIM_CLOSED" });
  await d.kill("SIGKILL");
  d = await startDaemon({ stateDir: dir, args: ["--claim-window", "1h"] });
  await t.rejects(
    claim(d, signer),
    { code: "CAPSULE_CLAIM_CLOSED" },
    "a restart with a longer window does not reopen it",
  );
});

t.test("TLS: 1.3 only, pin on the key", async (t) => {
  const dir = tempDir();
  t.teardown(() => removeDir(dir));
  let d = await startDaemon({ stateDir: dir });
  t.teardown(() => d.kill("SIGKILL"));
  const { signer } = await generateSigner();
  const probe = await probeCertificate(d.address);
  (await claim(d, signer)).close();

  const tls12 = await new Promise<string>((resolve) => {
    const s = tlsConnect({
      host: "127.0.0.1",
      port: d.port,
      maxVersion: "TLSv1.2",
      rejectUnauthorized: false,
    });
    s.once("secureConnect", () => {
      s.destroy();
      resolve("connected");
    });
    s.once("error", (e) => resolve(e.message));
  });
  t.not(tls12, "connected", "a TLS 1.2 client is refused");

  // The server regenerates its key: the pinned client refuses and names both keys.
  await d.kill("SIGKILL");
  rmSync(join(dir, "tls.key"));
  rmSync(join(dir, "tls.crt"));
  d = await startDaemon({ stateDir: dir, port: d.port });
  t.not(d.fingerprint, probe.fingerprint);
  const pinned = new RpcClient(
    {
      address: d.address,
      certPem: probe.certPem,
      fingerprint: probe.fingerprint,
      capsuleId: d.id,
      label: "home",
    },
    signer,
  );
  t.teardown(() => pinned.close());
  const err = (await pinned.call("Info", {}).catch((e: unknown) => e)) as CapsuleError;
  t.equal(err.code, "CAPSULE_FINGERPRINT_MISMATCH");
  t.match(err.message, probe.fingerprint);
  t.match(err.message, d.fingerprint);
  t.match(err.hint, /adopt/);
});

t.test("TLS: a valid chain to another key is refused by the pin", async (t) => {
  const dir = tempDir();
  t.teardown(() => removeDir(dir));
  // A CA the client trusts, and a leaf it signed with a key that is not the pinned one.
  const ssl = (...a: string[]) => execFileSync("openssl", a, { cwd: dir, stdio: "pipe" });
  ssl(
    "req",
    "-x509",
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:P-256",
    "-nodes",
    "-keyout",
    "ca.key",
    "-out",
    "ca.crt",
    "-days",
    "2",
    "-subj",
    "/CN=lab-ca",
    "-addext",
    "basicConstraints=critical,CA:TRUE",
    "-addext",
    "keyUsage=critical,keyCertSign",
  );
  ssl(
    "req",
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:P-256",
    "-nodes",
    "-keyout",
    "tls.key",
    "-out",
    "leaf.csr",
    "-subj",
    "/CN=cap-x",
  );
  writeFileSync(join(dir, "ext"), "subjectAltName=DNS:capsule\nextendedKeyUsage=serverAuth\n");
  ssl(
    "x509",
    "-req",
    "-in",
    "leaf.csr",
    "-CA",
    "ca.crt",
    "-CAkey",
    "ca.key",
    "-CAcreateserial",
    "-out",
    "tls.crt",
    "-days",
    "2",
    "-extfile",
    "ext",
  );
  const d = await startDaemon({ stateDir: dir });
  t.teardown(() => d.kill("SIGKILL"));
  const { signer } = await generateSigner();
  const caPem = execFileSync("cat", [join(dir, "ca.crt")]).toString();
  const elsewhere = spkiFingerprint(
    execFileSync("openssl", [
      "req",
      "-x509",
      "-newkey",
      "ec",
      "-pkeyopt",
      "ec_paramgen_curve:P-256",
      "-nodes",
      "-keyout",
      "/dev/null",
      "-subj",
      "/CN=x",
      "-days",
      "1",
    ]),
  );

  // Control: the chain verifies and the right pin passes (so the refusal below is the pin's).
  const right = new RpcClient(
    { address: d.address, certPem: caPem, fingerprint: d.fingerprint, capsuleId: d.id },
    signer,
  );
  t.teardown(() => right.close());
  await t.rejects(
    right.call("Info", {}),
    { code: "CAPSULE_UNKNOWN_OPERATOR" },
    "handshake passes; only the token is refused",
  );

  const wrong = new RpcClient(
    { address: d.address, certPem: caPem, fingerprint: elsewhere, capsuleId: d.id },
    signer,
  );
  t.teardown(() => wrong.close());
  await t.rejects(wrong.call("Info", {}), { code: "CAPSULE_FINGERPRINT_MISMATCH" });
  void generateKeyPairSync;
});
