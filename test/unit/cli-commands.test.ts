// capsulectl driven in-process through run(): a fake TLS probe and a fake RPC dialer stand in
// for the network, so every command's argv -> RPC request -> output -> exit code is checked.
import { generateKeyPairSync } from "node:crypto";
import { access, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Readable } from "node:stream";
import { decodeJwt, decodeProtectedHeader, jwtVerify } from "jose";
import t from "tap";
import type { Endpoint, ProbeResult } from "../../src/api/client.js";
import { spkiFingerprint } from "../../src/api/fingerprint.js";
import { CLAIM_PROOF_TYP, publicKeyFromJwk } from "../../src/api/token.js";
import { askYesNo, capsuleIdFromCert, decideTrust, planAdopt } from "../../src/cli/commands/adopt.js";
import { parsePublicKey } from "../../src/cli/commands/operator.js";
import {
  type CapsuleConfig,
  type Context,
  loadConfig,
  loadOrCreateOperatorKey,
  saveConfig,
} from "../../src/cli/config.js";
import { run } from "../../src/cli/main.js";
import type { CliIO, Dial, RpcCaller } from "../../src/cli/session.js";
import { CapsuleError, ErrorCode } from "../../src/errors.js";

// Self-signed Ed25519 certificates made with openssl: CN=cap-test-1, CN=cap-test-2, and one without a CN.
const CERT1 = `-----BEGIN CERTIFICATE-----
MIIBQDCB86ADAgECAhRVhw7n//0m5Yphai9Sk5a5+FwYajAFBgMrZXAwFTETMBEG
A1UEAwwKY2FwLXRlc3QtMTAgFw0yNjExMjMwODI2MzVaGA8yMTI2MTAzMDA4MjYz
NVowFTETMBEGA1UEAwwKY2FwLXRlc3QtMTAqMAUGAytlcAMhAFrAivJVIeX/2adu
CeP6e3hP6lSlBObroBT3J9VYONlQo1MwUTAdBgNVHQ4EFgQU8zcHI8xnMVw0RtfJ
MawzVyO+RYgwHwYDVR0jBBgwFoAU8zcHI8xnMVw0RtfJMawzVyO+RYgwDwYDVR0T
AQH/BAUwAwEB/zAFBgMrZXADQQCs0+x7OiJHxBy437B2BFOIP+PnSXcSKpk2BN1B
b3fICi1U77qmiajPg289wP+wsNH9JWvda0MlkSGW5vfVVs4P
-----END CERTIFICATE-----
`;
const CERT2 = `-----BEGIN CERTIFICATE-----
MIIBQDCB86ADAgECAhQn+gm123E3dD1NWIQJDc7O+b2hrTAFBgMrZXAwFTETMBEG
A1UEAwwKY2FwLXRlc3QtMjAgFw0yNjExMjMwODI2MzVaGA8yMTI2MTAzMDA4MjYz
NVowFTETMBEGA1UEAwwKY2FwLXRlc3QtMjAqMAUGAytlcAMhAOEi/3cgTRMWqYGd
Nou5aE1dBZQzMQDnhVzvAPD5plRBo1MwUTAdBgNVHQ4EFgQURNJGEaEdyfp01SDe
vz76S6G3e74wHwYDVR0jBBgwFoAURNJGEaEdyfp01SDevz76S6G3e74wDwYDVR0T
AQH/BAUwAwEB/zAFBgMrZXADQQBR+a9K8jE3rBvqgrG01vW8gRIi1N5ItUhW2Mnv
+JyVLHOQI3d1G8kKEYl4BJgGaCRimmfaZJcmnxZvWdAuGQAN
-----END CERTIFICATE-----
`;
const CERT_NO_CN = `-----BEGIN CERTIFICATE-----
MIIBODCB66ADAgECAhRFOCBMN8ywURYPG5IDySvMpaRA1DAFBgMrZXAwETEPMA0G
A1UECgwGbm9ib2R5MCAXDTI2MTEyMzA4MjYzNVoYDzIxMjYxMDMwMDgyNjM1WjAR
MQ8wDQYDVQQKDAZub2JvZHkwKjAFBgMrZXADIQBhrtdsdoILK4yOVcAVDjNHwqtM
20ZsyFOxYBGH3JSk16NTMFEwHQYDVR0OBBYEFLiOokDeUHkSDPTTYtzdraL7iV+O
MB8GA1UdIwQYMBaAFLiOokDeUHkSDPTTYtzdraL7iV+OMA8GA1UdEwEB/wQFMAMB
Af8wBQYDK2VwA0EApgGtmgTZhbqv3Ajzm6dCu9JrXba5asTShhuXCxFmHJqbxchl
yrw0A/DW63BHcokzcOc0KhSt/FC7YIDmgMXiDw==
-----END CERTIFICATE-----
`;
const FP1 = spkiFingerprint(CERT1);
const FP2 = spkiFingerprint(CERT2);
const ADDR1 = "192.0.2.10:50000";
const ADDR2 = "192.0.2.20:50000";

// ---------------------------------------------------------------- pure adopt logic

t.test("decideTrust: --fingerprint decides alone, then --yes, then a TTY prompt, else refuse", async (t) => {
  const base = { address: ADDR1, presented: FP1, yes: false, interactive: false };
  t.same(decideTrust({ ...base, expected: FP1 }), { kind: "accept", because: "fingerprint-matches" });
  const mismatch = decideTrust({ ...base, expected: FP2, yes: true, interactive: true });
  t.equal(mismatch.kind, "reject", "a mismatch rejects even with --yes");
  if (mismatch.kind === "reject") {
    t.equal(mismatch.error.code, ErrorCode.FingerprintMismatch);
    t.match(mismatch.error.message, FP1);
    t.match(mismatch.error.message, FP2);
  }
  t.same(decideTrust({ ...base, yes: true }), { kind: "accept", because: "yes" });
  t.same(decideTrust({ ...base, interactive: true }), { kind: "ask" });
  const blind = decideTrust(base);
  t.equal(blind.kind, "reject");
  if (blind.kind === "reject") {
    t.equal(blind.error.code, ErrorCode.FingerprintRejected);
    t.match(blind.error.hint, /--yes/);
    t.match(blind.error.hint, /--fingerprint/);
  }
});

function ctx(name: string, address: string, fingerprint = FP1): Context {
  return { name, address, capsuleId: "id", fingerprint, certPem: CERT1, addedAt: "2026-01-01T00:00:00Z" };
}

t.test("planAdopt: new, already, or a clear refusal", async (t) => {
  const cfg: CapsuleConfig = { currentContext: "box1", contexts: [ctx("box1", ADDR1)] };
  t.same(planAdopt(cfg, { name: "box2", address: ADDR2 }), { kind: "new" });
  t.same(
    planAdopt(cfg, { name: "box1", address: ADDR1 }),
    { kind: "new" },
    "not probed yet: no verdict on the key",
  );
  t.same(planAdopt(cfg, { name: "box1", address: ADDR1, fingerprint: FP1 }), {
    kind: "already",
    context: cfg.contexts[0],
  });
  t.throws(() => planAdopt(cfg, { name: "box1", address: ADDR2 }), {
    code: ErrorCode.AlreadyExists,
    hint: /context delete box1/,
  });
  t.throws(() => planAdopt(cfg, { name: "box1", address: ADDR1, fingerprint: FP2 }), {
    code: ErrorCode.FingerprintMismatch,
    hint: /context delete box1/,
  });
  t.throws(() => planAdopt(cfg, { name: "other", address: ADDR1 }), {
    code: ErrorCode.AlreadyExists,
    message: `${ADDR1} is already adopted as context "box1"`,
  });
});

t.test("the capsule id is the certificate's CN", async (t) => {
  t.equal(capsuleIdFromCert(CERT1), "cap-test-1");
  t.equal(capsuleIdFromCert(CERT2), "cap-test-2");
  t.throws(() => capsuleIdFromCert(CERT_NO_CN), { code: ErrorCode.FailedPrecondition });
});

const ttyIn = (text: string) => Object.assign(Readable.from([text]), { isTTY: true });

t.test("askYesNo: only y/yes is yes; end of input is no", async (t) => {
  const io = { stderr: { write: () => true }, stdin: ttyIn("y\n") } as unknown as CliIO;
  t.equal(await askYesNo(io, "? "), true);
  t.equal(await askYesNo({ ...io, stdin: ttyIn("YES\n") }, "? "), true);
  t.equal(await askYesNo({ ...io, stdin: ttyIn("n\n") }, "? "), false);
  t.equal(await askYesNo({ ...io, stdin: ttyIn("yep\n") }, "? "), false);
  t.equal(await askYesNo({ ...io, stdin: ttyIn("") }, "? "), false);
});

t.test("parsePublicKey: JWK, whoami output, PEM; never a private key", async (t) => {
  const { publicKey, privateKey } = generateKeyPairSync("ed25519");
  const jwk = publicKey.export({ format: "jwk" });
  const want = { kty: "OKP", crv: "Ed25519", x: jwk.x };
  t.same(parsePublicKey(JSON.stringify(jwk), "k.json"), want);
  t.same(
    parsePublicKey(JSON.stringify({ id: "x", name: "bob", publicKeyJwk: JSON.stringify(jwk) }), "k.json"),
    want,
  );
  t.same(parsePublicKey(publicKey.export({ type: "spki", format: "pem" }).toString(), "k.pem"), want);
  t.throws(() => parsePublicKey(privateKey.export({ type: "pkcs8", format: "pem" }).toString(), "k.pem"), {
    code: ErrorCode.InvalidArgument,
    message: "k.pem: is a private key; pass the public key",
  });
  t.throws(() => parsePublicKey(JSON.stringify(privateKey.export({ format: "jwk" })), "k.json"), {
    message: /k\.json: .*private/,
  });
  const rsa = generateKeyPairSync("rsa", { modulusLength: 1024 }).publicKey.export({
    type: "spki",
    format: "pem",
  });
  t.throws(() => parsePublicKey(rsa.toString(), "r.pem"), { message: /not Ed25519/ });
  t.throws(() => parsePublicKey("ssh-ed25519 AAAA", "k"), { code: ErrorCode.InvalidArgument });
});

// ---------------------------------------------------------------- run() with fakes

// Every temp dir a test makes, removed when the file is done.
const tmpDirs: string[] = [];
t.teardown(() => Promise.all(tmpDirs.map((d) => rm(d, { recursive: true, force: true }))));
async function tmp(prefix: string): Promise<string> {
  const d = await mkdtemp(join(tmpdir(), prefix));
  tmpDirs.push(d);
  return d;
}

interface Call {
  address: string;
  label: string | undefined;
  method: string;
  req: Record<string, unknown>;
  signed: boolean;
  deadlineMs: number | undefined;
}
type Handler = (method: string, req: Record<string, unknown>, endpoint: Endpoint) => Promise<unknown>;

function fakeDial(handler: Handler, calls: Call[]): Dial {
  return (endpoint, signer) =>
    ({
      call: async (method: string, req: object, opts?: { deadlineMs?: number }) => {
        calls.push({
          address: endpoint.address,
          label: endpoint.label,
          method,
          req: req as Record<string, unknown>,
          signed: signer !== null,
          deadlineMs: opts?.deadlineMs,
        });
        return handler(method, req as Record<string, unknown>, endpoint);
      },
      close: () => {},
    }) as unknown as RpcCaller;
}

interface Harness {
  dir: string;
  calls: Call[];
  probes: string[];
  cli(argv: string[], extra?: Partial<CliIO>): Promise<{ code: number; out: string; err: string }>;
}

async function harness(
  handler: Handler = async () => ({}),
  certs: Record<string, string> = {},
): Promise<Harness> {
  const dir = join(await tmp("capsulectl-run-"), "cfg");
  const calls: Call[] = [];
  const probes: string[] = [];
  const probe = async (address: string): Promise<ProbeResult> => {
    probes.push(address);
    const certPem = certs[address];
    if (!certPem) throw new CapsuleError(ErrorCode.Unreachable, `${address}: connect ECONNREFUSED`);
    return { certPem, fingerprint: spkiFingerprint(certPem) };
  };
  return {
    dir,
    calls,
    probes,
    async cli(argv, extra = {}) {
      let out = "";
      let err = "";
      const code = await run(argv, {
        stdout: { write: (s: string) => (out += s) },
        stderr: { write: (s: string) => (err += s) },
        env: { CAPSULE_CONFIG_DIR: dir, USER: "alice" },
        stdin: Object.assign(Readable.from([]), { isTTY: false }),
        dial: fakeDial(handler, calls),
        probe,
        now: () => new Date("2026-11-23T12:00:00.000Z"),
        ...extra,
      });
      return { code, out, err };
    },
  };
}

const claimOk: Handler = async (method, _req, ep) => {
  if (method === "Claim") return { id: ep.capsuleId, name: ep.label, fingerprint: ep.fingerprint };
  throw new Error(`unexpected ${method}`);
};

const exists = (p: string) =>
  access(p).then(
    () => true,
    () => false,
  );

t.test("adopt --yes: probes, claims with a proof for the CN, saves and selects the context", async (t) => {
  const h = await harness(claimOk, { [ADDR1]: CERT1 });
  const r = await h.cli(["adopt", ADDR1, "--name", "box1", "--yes"]);
  t.equal(r.code, 0, r.err);
  t.equal(r.out, `adopted box1 (cap-test-1) at ${ADDR1}, fingerprint ${FP1}\n`);
  t.match(r.err, `${ADDR1} presents key fingerprint ${FP1}`);
  t.same(await loadConfig(h.dir), {
    currentContext: "box1",
    contexts: [
      {
        name: "box1",
        address: ADDR1,
        capsuleId: "cap-test-1",
        fingerprint: FP1,
        certPem: CERT1,
        addedAt: "2026-11-23T12:00:00.000Z",
      },
    ],
  });

  t.equal(h.calls.length, 1);
  const claim = h.calls[0]!;
  t.equal(claim.method, "Claim");
  t.equal(claim.signed, false, "Claim carries no token");
  const { signer } = await loadOrCreateOperatorKey(h.dir);
  const op = claim.req.operator as { id: string; name: string; publicKeyJwk: string };
  t.equal(op.id, signer.kid);
  t.match(op.name, /^alice@/);
  t.same(JSON.parse(op.publicKeyJwk), signer.publicJwk);
  const proof = claim.req.proof as string;
  t.equal(decodeProtectedHeader(proof).typ, CLAIM_PROOF_TYP);
  t.equal(decodeJwt(proof).aud, "cap-test-1", "the proof's audience is the certificate CN");
  await jwtVerify(proof, publicKeyFromJwk(op.publicKeyJwk), { audience: "cap-test-1" });

  // Again: already adopted, no second claim, nothing changes.
  const again = await h.cli(["adopt", ADDR1, "--name", "box1"]);
  t.equal(again.code, 0, again.err);
  t.equal(again.out, `box1 is already adopted (cap-test-1) at ${ADDR1}\n`);
  t.equal(h.calls.length, 1);
});

t.test("adopt --fingerprint: exact match adopts, a mismatch names both and saves nothing", async (t) => {
  const h = await harness(claimOk, { [ADDR1]: CERT1 });
  const bad = await h.cli(["adopt", ADDR1, "--name", "box1", "--fingerprint", FP2, "--yes"]);
  t.equal(bad.code, 1);
  t.match(bad.err, `error: ${ADDR1} presents key ${FP1}, not the expected ${FP2}; nothing saved\nhint: `);
  t.equal(h.calls.length, 0, "no claim");
  t.equal(await exists(join(h.dir, "config.yaml")), false);
  t.equal(await exists(join(h.dir, "operator.key")), false, "no key made for a refused adopt");

  const malformed = await h.cli(["adopt", ADDR1, "--name", "box1", "--fingerprint", "abc"]);
  t.equal(malformed.code, 1);
  t.match(malformed.err, /--fingerprint: "abc" is not SHA256/);
  t.same(h.probes, [ADDR1], "a malformed flag is refused before the network");

  const good = await h.cli(["adopt", ADDR1, "--name", "box1", "--fingerprint", FP1]);
  t.equal(good.code, 0, good.err);
  t.equal((await loadConfig(h.dir)).contexts[0]?.fingerprint, FP1);
});

t.test("adopt without --yes: refuses off a TTY, asks on one", async (t) => {
  const h = await harness(claimOk, { [ADDR1]: CERT1, [ADDR2]: CERT2 });
  const blind = await h.cli(["adopt", ADDR1, "--name", "box1"]);
  t.equal(blind.code, 1);
  t.match(blind.err, /key not trusted \(stdin is not a terminal.*nothing saved\nhint: pass --fingerprint/);
  t.equal(h.calls.length, 0);

  const no = await h.cli(["adopt", ADDR1, "--name", "box1"], { stdin: ttyIn("n\n") });
  t.equal(no.code, 1);
  t.match(no.err, "Trust this capsule? [y/N] ");
  t.match(no.err, /the answer was not yes/);
  t.equal(await exists(join(h.dir, "config.yaml")), false);

  const yes = await h.cli(["adopt", ADDR1, "--name", "box1"], { stdin: ttyIn("y\n") });
  t.equal(yes.code, 0, yes.err);

  // A second capsule is saved but does not take over as current.
  const second = await h.cli(["adopt", ADDR2, "--name", "box2", "--yes", "-o", "json"]);
  t.equal(second.code, 0, second.err);
  t.same(JSON.parse(second.out), {
    name: "box2",
    address: ADDR2,
    capsuleId: "cap-test-2",
    fingerprint: FP2,
    addedAt: "2026-11-23T12:00:00.000Z",
  });
  const cfg = await loadConfig(h.dir);
  t.equal(cfg.currentContext, "box1");
  t.same(
    cfg.contexts.map((c) => c.name),
    ["box1", "box2"],
  );
});

t.test("adopt: a closed claim window reaches the user as the server said it; nothing saved", async (t) => {
  const h = await harness(
    async () => {
      throw new CapsuleError(
        ErrorCode.ClaimClosed,
        "claim window is closed: this capsule already has its operators",
        {
          hint: "ask an adopted operator to add your key (capsulectl operator add)",
        },
      );
    },
    { [ADDR1]: CERT1 },
  );
  const r = await h.cli(["adopt", ADDR1, "--name", "box1", "--yes"]);
  t.equal(r.code, 1);
  t.match(
    r.err,
    "error: claim window is closed: this capsule already has its operators\nhint: ask an adopted operator to add your key (capsulectl operator add)\n",
  );
  t.equal(await exists(join(h.dir, "config.yaml")), false);
});

t.test("adopt refuses a name pinned elsewhere before touching the network", async (t) => {
  const h = await harness(claimOk, { [ADDR1]: CERT1, [ADDR2]: CERT2 });
  t.equal((await h.cli(["adopt", ADDR1, "--name", "box1", "--yes"])).code, 0);
  const r = await h.cli(["adopt", ADDR2, "--name", "box1", "--yes"]);
  t.equal(r.code, 1);
  t.match(r.err, `error: context "box1" already pins ${ADDR1}\nhint: capsulectl context delete box1`);
  t.same(h.probes, [ADDR1]);
  const badName = await h.cli(["adopt", ADDR2, "--name", "a:b", "--yes"]);
  t.equal(badName.code, 1);
  t.match(badName.err, /not a valid context name/);
});

t.test("adopt: a certificate without a CN is not a capsule", async (t) => {
  const h = await harness(claimOk, { [ADDR1]: CERT_NO_CN });
  const r = await h.cli(["adopt", ADDR1, "--name", "box1", "--yes"]);
  t.equal(r.code, 1);
  t.match(r.err, /no subject CN/);
  t.equal(h.calls.length, 0);
});

async function twoContexts(h: Harness) {
  await loadOrCreateOperatorKey(h.dir);
  await saveConfig(h.dir, {
    currentContext: "box1",
    contexts: [
      {
        name: "box1",
        address: ADDR1,
        capsuleId: "cap-test-1",
        fingerprint: FP1,
        certPem: CERT1,
        addedAt: "2026-11-23T12:00:00.000Z",
      },
      {
        name: "box2",
        address: ADDR2,
        capsuleId: "cap-test-2",
        fingerprint: FP2,
        certPem: CERT2,
        addedAt: "2026-11-23T13:00:00.000Z",
      },
    ],
  });
}

t.test("usage errors exit 2; --version and --help exit 0", async (t) => {
  const h = await harness();
  for (const argv of [
    [],
    ["nope"],
    ["context"],
    ["context", "frob"],
    ["context", "list", "--bogus"],
    ["-o", "xml", "context", "list"],
    ["--timeout", "soon", "capsule", "info"],
    ["--all", "--capsule", "a", "capsule", "info"],
    ["adopt", ADDR1],
    ["context", "use"],
    ["context", "use", "a", "b"],
  ]) {
    const r = await h.cli(argv);
    t.equal(r.code, 2, `${argv.join(" ")} -> ${r.err.split("\n")[0]}`);
  }
  const bad = await h.cli(["nope"]);
  t.match(bad.err, "error: unknown command 'nope'");
  const v = await h.cli(["--version"]);
  t.equal(v.code, 0);
  t.equal(
    v.out,
    `${JSON.parse(await readFile(new URL("../../package.json", import.meta.url), "utf8")).version}\n`,
  );
  const help = await h.cli(["capsule", "--help"]);
  t.equal(help.code, 0);
  t.match(help.out, "info");
});

t.test("no context: a clear error and an adopt hint", async (t) => {
  const h = await harness();
  const r = await h.cli(["capsule", "info"]);
  t.equal(r.code, 1);
  t.equal(
    r.err,
    "error: no capsule selected: no contexts yet\nhint: capsulectl adopt HOST:PORT --name NAME, then it becomes the current context\n",
  );
  const u = await h.cli(["context", "use", "ghost"]);
  t.equal(u.code, 1);
  t.match(u.err, 'error: unknown context "ghost"');
});

t.test("context list / use / show / delete", async (t) => {
  const h = await harness();
  await twoContexts(h);
  const list = await h.cli(["context", "list"]);
  t.equal(
    list.out,
    [
      "CURRENT   NAME   ADDRESS            CAPSULE-ID   FINGERPRINT",
      `*         box1   ${ADDR1}   cap-test-1   ${FP1}`,
      `          box2   ${ADDR2}   cap-test-2   ${FP2}`,
      "",
    ].join("\n"),
  );
  t.equal((await h.cli(["context", "use", "box2"])).out, 'switched to context "box2"\n');
  t.equal((await loadConfig(h.dir)).currentContext, "box2");

  const show = await h.cli(["context", "show"]);
  t.equal(
    show.out,
    `Name:          box2\nAddress:       ${ADDR2}\nCapsule ID:    cap-test-2\nFingerprint:   ${FP2}\nAdded:         2026-11-23T13:00:00.000Z\nCurrent:       yes\n`,
  );
  t.notMatch(show.out, "CERTIFICATE");
  const yaml = await h.cli(["context", "show", "box1", "-o", "yaml"]);
  t.match(yaml.out, "certPem: |");
  t.match(yaml.out, "current: false");

  const del = await h.cli(["context", "delete", "box2"]);
  t.equal(del.code, 0);
  t.equal(del.out, 'deleted context "box2"\n');
  t.same(await loadConfig(h.dir).then((c) => [c.currentContext, c.contexts.map((x) => x.name)]), [
    null,
    ["box1"],
  ]);
  t.equal((await h.cli(["context", "delete", "box2"])).code, 1, "deleting twice names the unknown context");
});

const INFO = (name: string, id: string) => ({
  name,
  id,
  version: "0.1.0",
  fabricAddress: "",
  uptimeSeconds: 3725.4,
  kernel: "6.8.0",
  wireguardMode: "kernel",
  fingerprint: "SHA256:x",
  claimOpen: false,
  claimClosesAt: "",
  operatorCount: 2,
  startedAt: "2026-11-23T11:00:00Z",
});

t.test("capsule info on one target: a plain table, signed calls with the --timeout deadline", async (t) => {
  const h = await harness(async (method, _req, ep) => {
    t.equal(method, "Info");
    return INFO(ep.label ?? "", ep.capsuleId);
  });
  await twoContexts(h);
  const r = await h.cli(["capsule", "info", "--timeout", "3s"]);
  t.equal(r.code, 0, r.err);
  t.equal(
    r.out,
    [
      "NAME   ID           VERSION   FABRIC-ADDRESS   UPTIME   KERNEL   WIREGUARD",
      "box1   cap-test-1   0.1.0     <none>           1h2m     6.8.0    kernel",
      "",
    ].join("\n"),
  );
  t.same(
    h.calls.map((c) => [c.address, c.method, c.signed, c.deadlineMs]),
    [[ADDR1, "Info", true, 3000]],
  );
  const wide = await h.cli(["capsule", "info", "-o", "wide", "--capsule", "box2"]);
  t.match(wide.out, /FINGERPRINT\s+CLAIM\s+OPERATORS\n/);
  t.match(wide.out, /box2 .* SHA256:x\s+closed\s+2\n/);
  const json = await h.cli(["capsule", "info", "-o", "json"]);
  t.same(JSON.parse(json.out), INFO("box1", "cap-test-1"));
});

t.test("capsule info on several: one table, a failed and a hung target reported, exit 1", async (t) => {
  const h = await harness(async (_m, _req, ep) => {
    if (ep.label === "box2") return new Promise(() => {});
    return INFO(ep.label ?? "", ep.capsuleId);
  });
  await twoContexts(h);
  const r = await h.cli(["capsule", "info", "--all", "--timeout", "100ms"]);
  t.equal(r.code, 1);
  t.equal(
    r.out,
    [
      "CAPSULE   NAME   ID           VERSION   FABRIC-ADDRESS   UPTIME   KERNEL   WIREGUARD",
      "box1      box1   cap-test-1   0.1.0     <none>           1h2m     6.8.0    kernel",
      "box2      error: box2: no answer within 100ms",
      "",
    ].join("\n"),
  );
  t.match(r.err, /^hint: check that capsuled runs there/);

  const j = await h.cli([
    "capsule",
    "info",
    "--capsule",
    `box2,${ADDR1}`,
    "--timeout",
    "100ms",
    "-o",
    "json",
  ]);
  t.equal(j.code, 1);
  const list = JSON.parse(j.out);
  t.same(
    list.map((x: { capsule: string; error?: { code: string } }) => [x.capsule, x.error?.code ?? "ok"]),
    [
      ["box2", "CAPSULE_TIMEOUT"],
      ["box1", "ok"],
    ],
  );
});

t.test("--all with one context still has the several-targets shape", async (t) => {
  const h = await harness(async (_m, _req, ep) => INFO(ep.label ?? "", ep.capsuleId));
  await loadOrCreateOperatorKey(h.dir);
  await saveConfig(h.dir, {
    currentContext: null,
    contexts: [
      {
        name: "box1",
        address: ADDR1,
        capsuleId: "cap-test-1",
        fingerprint: FP1,
        certPem: CERT1,
        addedAt: "2026-11-23T12:00:00Z",
      },
    ],
  });
  const r = await h.cli(["capsule", "info", "--all", "-o", "json"]);
  t.equal(r.code, 0);
  t.equal(JSON.parse(r.out)[0].capsule, "box1");
});

t.test("operator whoami / add / list / remove", async (t) => {
  const bobDir = await tmp("capsulectl-bob-");
  const h = await harness(async (method, req) => {
    switch (method) {
      case "AddOperator":
        return { ...(req.operator as object), addedAt: "2026-11-23T12:00:00Z", addedBy: "alice-kid" };
      case "ListOperators":
        return {
          operators: [
            { id: "k1", name: "alice@x", publicKeyJwk: '{"x":"AAA"}', addedAt: "t1", addedBy: "claim" },
          ],
        };
      case "RemoveOperator":
        return { removed: req.id === "k1" };
      default:
        throw new Error(method);
    }
  });
  await twoContexts(h);
  // Bob prints his key with whoami in his own config dir; alice adds it to both capsules.
  const bob = await run(["operator", "whoami", "-o", "json", "--config-dir", bobDir], {
    stdout: { write: (s: string) => writeFile(join(bobDir, "bob.json"), s) },
    stderr: { write: () => true },
    env: { USER: "bob" },
  });
  t.equal(bob, 0);
  const bobKey = JSON.parse(await readFile(join(bobDir, "bob.json"), "utf8"));
  t.equal(bobKey.id, (await loadOrCreateOperatorKey(bobDir)).signer.kid);

  const add = await h.cli(["operator", "add", "bob", "--public-key-file", join(bobDir, "bob.json"), "--all"]);
  t.equal(add.code, 0, add.err);
  t.same(
    h.calls.map((c) => [c.label, c.method]),
    [
      ["box1", "AddOperator"],
      ["box2", "AddOperator"],
    ],
  );
  const sent = h.calls[0]!.req.operator as { id: string; name: string; publicKeyJwk: string };
  t.same(sent, {
    id: bobKey.id,
    name: "bob",
    publicKeyJwk: JSON.stringify({ kty: "OKP", crv: "Ed25519", x: JSON.parse(bobKey.publicKeyJwk).x }),
  });
  t.match(add.out, /^CAPSULE\s+ID\s+NAME\s+ADDED\s+ADDED-BY\nbox1\s+\S+\s+bob\s/);

  const list = await h.cli(["operator", "list", "-o", "wide"]);
  t.equal(list.out, "ID   NAME      ADDED   ADDED-BY   PUBLIC-KEY\nk1   alice@x   t1      claim      AAA\n");

  const rm = await h.cli(["operator", "remove", "k2"]);
  t.equal(rm.out, "ID   RESULT\nk2   not present\n");
  t.same(h.calls.at(-1)?.req, { id: "k2" });

  const missing = await h.cli(["operator", "add", "carol", "--public-key-file", join(bobDir, "nope.json")]);
  t.equal(missing.code, 1);
  t.match(missing.err, /--public-key-file: .*nope\.json/);
});
