import { randomUUID } from "node:crypto";
import { SignJWT } from "jose";
import t from "tap";
import { generateSigner, mintClaimProof, mintRpcToken, RPC_TOKEN_TYP } from "../../src/api/token.js";
import { Authenticator } from "../../src/node/auth.js";
import { FakeClock } from "../../src/node/host/clock.js";
import { Store } from "../../src/node/store/store.js";

const AUD = "cap-test";
const M = "/capsule.v1.Capsule/Info";

async function setup() {
  const store = Store.open(":memory:");
  const clock = new FakeClock(Date.UTC(2026, 10, 23, 12));
  const auth = new Authenticator(store, clock, AUD);
  const { signer } = await generateSigner();
  store.putOperator({
    id: signer.kid,
    name: "alice",
    publicKeyJwk: JSON.stringify(signer.publicJwk),
    addedAt: "x",
    addedBy: "claim",
  });
  return { store, clock, auth, signer };
}

t.test("a fresh token is accepted once", async (t) => {
  const { auth, clock, signer } = await setup();
  const tok = await mintRpcToken(signer, AUD, M, clock.now());
  const p = await auth.authenticate(`Bearer ${tok}`, M);
  t.same(p, { kind: "operator", id: signer.kid, name: "alice" });
  await t.rejects(auth.authenticate(`Bearer ${tok}`, M), { code: "CAPSULE_TOKEN_REPLAYED" });
});

t.test("clock skew: 60 s tolerated, more refused", async (t) => {
  const { auth, clock, signer } = await setup();
  const tok1 = await mintRpcToken(signer, AUD, M, clock.now());
  clock.advance(115_000); // exp = iat + 60 s; 55 s past exp is within the 60 s skew
  await auth.authenticate(`Bearer ${tok1}`, M);
  const tok2 = await mintRpcToken(signer, AUD, M, clock.now());
  clock.advance(125_000);
  await t.rejects(auth.authenticate(`Bearer ${tok2}`, M), { code: "CAPSULE_TOKEN_EXPIRED" });
  const future = await mintRpcToken(signer, AUD, M, clock.now() + 90_000);
  await t.rejects(auth.authenticate(`Bearer ${future}`, M), { code: "CAPSULE_UNAUTHENTICATED" });
});

t.test("a refused token does not burn its jti", async (t) => {
  const { auth, clock, signer, store } = await setup();
  const jti = randomUUID();
  const now = Math.floor(clock.now() / 1000);
  const wrongMethod = await new SignJWT({ mth: "/capsule.v1.Capsule/AddOperator" })
    .setProtectedHeader({ alg: "EdDSA", typ: RPC_TOKEN_TYP, kid: signer.kid })
    .setAudience(AUD)
    .setIssuedAt(now)
    .setExpirationTime(now + 60)
    .setJti(jti)
    .sign(signer.privateKey);
  await t.rejects(auth.authenticate(`Bearer ${wrongMethod}`, M), { code: "CAPSULE_UNAUTHENTICATED" });
  t.equal(store.useToken(jti, clock.now() + 1000), true, "jti still unused after the refusal");
});

t.test("malformed headers", async (t) => {
  const { auth } = await setup();
  await t.rejects(auth.authenticate(undefined, M), { code: "CAPSULE_UNAUTHENTICATED" });
  await t.rejects(auth.authenticate("Basic abc", M), { code: "CAPSULE_UNAUTHENTICATED" });
  await t.rejects(auth.authenticate("Bearer a.b.c", M), { code: "CAPSULE_UNAUTHENTICATED" });
});

t.test("claim proof must be signed by the key being enrolled", async (t) => {
  const { auth, clock } = await setup();
  const a = (await generateSigner()).signer;
  const b = (await generateSigner()).signer;
  const proof = await mintClaimProof(a, AUD, clock.now());
  await t.rejects(auth.verifyClaimProof(proof, b.privateKey, b.kid), { code: "CAPSULE_UNAUTHENTICATED" });
  const { createPublicKey } = await import("node:crypto");
  await auth.verifyClaimProof(proof, createPublicKey(a.privateKey), a.kid);
  await t.rejects(auth.verifyClaimProof(proof, createPublicKey(a.privateKey), a.kid), {
    code: "CAPSULE_TOKEN_REPLAYED",
  });
  const rpc = await mintRpcToken(a, AUD, M, clock.now());
  await t.rejects(
    auth.verifyClaimProof(rpc, createPublicKey(a.privateKey), a.kid),
    {
      code: "CAPSULE_UNAUTHENTICATED",
    },
    "an RPC token is not a claim proof (typ)",
  );
});
