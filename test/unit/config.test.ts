import t from "tap";
import { splitHostPort } from "../../src/api/client.js";
import { isFingerprint, spkiFingerprint } from "../../src/api/fingerprint.js";
import { CapsuleError, ErrorCode, formatError } from "../../src/errors.js";
import { LETS_ENCRYPT_DIRECTORY, resolveConfig } from "../../src/node/config.js";
import { parseDuration } from "../../src/node/duration.js";

t.test("defaults follow the contract", async (t) => {
  const c = resolveConfig({ name: "box1" });
  t.equal(c.stateDir, "/var/lib/capsule");
  t.same(c.listen, { host: "0.0.0.0", port: 50000 });
  t.equal(c.fabricIface, "capsule0");
  t.equal(c.fabricPort, 51820);
  t.equal(c.claimWindowMs, 30 * 60_000);
  t.equal(c.metrics, undefined);
  t.equal(c.acmeCa, LETS_ENCRYPT_DIRECTORY);
  t.equal(c.endpoint, undefined, "no endpoint = behind NAT");
  t.equal(resolveConfig({ endpoint: "192.0.2.10:51820" }).publicAddress, "192.0.2.10");
});

t.test("bad flags name the flag", async (t) => {
  for (const [flags, field] of [
    [{ fabricPort: "0" }, "--fabric-port"],
    [{ listen: "nope" }, "--listen"],
    [{ claimWindow: "5 minutes" }, "--claim-window"],
    [{ logLevel: "loud" }, "--log-level"],
    [{ fabricIface: "a-very-long-interface-name" }, "--fabric-iface"],
    [{ acmeCa: "letsencrypt" }, "--acme-ca"],
    [{ publicAddress: "example.org" }, "--public-address"],
    [{ name: "bad name" }, "--name"],
  ] as const) {
    t.throws(
      () => resolveConfig(flags),
      { code: "CAPSULE_INVALID_ARGUMENT", message: new RegExp(`^${field}:`) },
      field,
    );
  }
});

t.test("durations", async (t) => {
  t.equal(parseDuration("30m", "x"), 1_800_000);
  t.equal(parseDuration("1h30m", "x"), 5_400_000);
  t.equal(parseDuration("500ms", "x"), 500);
  t.equal(parseDuration("0", "x"), 0);
  t.throws(() => parseDuration("", "x"));
  t.throws(() => parseDuration("10", "x"));
  t.throws(() => parseDuration("10s junk", "x"));
});

t.test("host:port", async (t) => {
  t.same(splitHostPort("192.0.2.1:50000"), { host: "192.0.2.1", port: 50000 });
  t.same(splitHostPort("[::1]:5"), { host: "::1", port: 5 });
  t.throws(() => splitHostPort("192.0.2.1:0"));
  t.same(splitHostPort("192.0.2.1:0", { allowZero: true }), { host: "192.0.2.1", port: 0 });
  t.throws(() => splitHostPort("192.0.2.1"));
  t.throws(() => splitHostPort("192.0.2.1:70000"));
});

t.test("fingerprint format", async (t) => {
  const { execFileSync } = await import("node:child_process");
  const pem = execFileSync("openssl", [
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
  ]);
  const fp = spkiFingerprint(pem);
  t.ok(isFingerprint(fp), fp);
  t.notOk(isFingerprint("SHA256:short"));
});

t.test("errors render as one line plus hint", async (t) => {
  const e = new CapsuleError(ErrorCode.UnknownContext, 'no context "x"', {
    hint: "see capsulectl context list",
  });
  t.equal(formatError(e), 'error: no context "x"\nhint: see capsulectl context list');
  t.equal(formatError(new Error("boom")), "error: boom");
});
