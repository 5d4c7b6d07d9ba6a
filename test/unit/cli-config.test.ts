import { mkdtemp, readdir, readFile, rm, stat, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import t from "tap";
import { spkiFingerprint } from "../../src/api/fingerprint.js";
import {
  type CapsuleConfig,
  CONFIG_FILE,
  type Context,
  defaultConfigDir,
  defaultOperatorName,
  loadConfig,
  loadOperatorKey,
  LOCK_FILE,
  loadOrCreateOperatorKey,
  OPERATOR_KEY_FILE,
  saveConfig,
  updateConfig,
  validateConfig,
  validateContextName,
} from "../../src/cli/config.js";
import { CapsuleError, ErrorCode } from "../../src/errors.js";

// Two self-signed Ed25519 certificates (CN=cap-test-1, CN=cap-test-2), made with openssl.
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
const FP1 = spkiFingerprint(CERT1);
const FP2 = spkiFingerprint(CERT2);

function ctx(over: Partial<Context> = {}): Context {
  return {
    name: "box1",
    address: "192.0.2.10:50000",
    capsuleId: "cap-test-1",
    fingerprint: FP1,
    certPem: CERT1,
    addedAt: "2026-11-23T12:00:00.000Z",
    ...over,
  };
}

const tmpDirs: string[] = [];
t.teardown(() => Promise.all(tmpDirs.map((d) => rm(d, { recursive: true, force: true }))));
const tmp = async () => {
  const d = await mkdtemp(join(tmpdir(), "capsulectl-config-"));
  tmpDirs.push(d);
  return d;
};

t.test("a missing config file is an empty config", async (t) => {
  const dir = await tmp();
  t.same(await loadConfig(join(dir, "nope")), { currentContext: null, contexts: [] });
});

t.test("save then load round-trips, with 0600 file, 0700 dir and no temp files left", async (t) => {
  const dir = join(await tmp(), "fresh", "capsule");
  const cfg: CapsuleConfig = {
    currentContext: "box2",
    contexts: [
      ctx(),
      ctx({
        name: "box2",
        address: "[2001:db8::1]:50000",
        capsuleId: "cap-test-2",
        fingerprint: FP2,
        certPem: CERT2,
      }),
    ],
  };
  await saveConfig(dir, cfg);
  t.same(await loadConfig(dir), cfg);
  t.equal((await stat(join(dir, CONFIG_FILE))).mode & 0o777, 0o600);
  t.equal((await stat(dir)).mode & 0o777, 0o700);
  t.same(await readdir(dir), [CONFIG_FILE]);
  // Saving the same config again is a no-op in content.
  const before = await readFile(join(dir, CONFIG_FILE), "utf8");
  await saveConfig(dir, cfg);
  t.equal(await readFile(join(dir, CONFIG_FILE), "utf8"), before);
});

t.test("an existing too-open config dir is tightened to 0700", async (t) => {
  const { chmod } = await import("node:fs/promises");
  const dir = await tmp();
  await chmod(dir, 0o755);
  await saveConfig(dir, { currentContext: null, contexts: [] });
  t.equal((await stat(dir)).mode & 0o777, 0o700);
});

function rejection(raw: unknown): CapsuleError | undefined {
  try {
    validateConfig(raw, "/x/config.yaml");
    return undefined;
  } catch (e) {
    return e as CapsuleError;
  }
}

t.test("validation names the file and the field", async (t) => {
  const { address: _a, ...noAddress } = ctx();
  const cases: [unknown, string][] = [
    [["a"], "(top level)"],
    [{ contexts: {} }, "contexts"],
    [{ currentContext: 3 }, "currentContext"],
    [{ contexts: ["x"] }, "contexts[0]"],
    [{ contexts: [noAddress] }, "contexts[0].address"],
    [{ contexts: [ctx(), ctx({ name: "b", address: "nope" })] }, "contexts[1].address"],
    [{ contexts: [ctx({ name: "a:b" })] }, "contexts[0].name"],
    [{ contexts: [ctx(), ctx({ address: "192.0.2.11:1" })] }, "contexts[1].name"],
    [{ contexts: [ctx({ fingerprint: "md5:abc" })] }, "contexts[0].fingerprint"],
    [{ contexts: [ctx({ fingerprint: FP2 })] }, "contexts[0].fingerprint"],
    [{ contexts: [ctx({ addedAt: "yesterday" })] }, "contexts[0].addedAt"],
    [{ currentContext: "ghost", contexts: [ctx()] }, "currentContext"],
  ];
  for (const [raw, field] of cases) {
    const e = rejection(raw);
    t.type(e, CapsuleError, field);
    t.equal(e?.code, ErrorCode.InvalidConfig, field);
    t.equal(
      e?.message.startsWith(`/x/config.yaml: ${field}: `),
      true,
      `${e?.message} names the file and ${field}`,
    );
    t.equal(e?.details?.field, field);
  }
});

t.test("missing keys default: no current context, no contexts", async (t) => {
  t.same(validateConfig({}, "f"), { currentContext: null, contexts: [] });
  t.same(validateConfig(null, "f"), { currentContext: null, contexts: [] });
  t.same(validateConfig({ contexts: [ctx()] }, "f").currentContext, null);
});

t.test("a malformed file on disk is CAPSULE_INVALID_CONFIG naming the file", async (t) => {
  const dir = await tmp();
  const file = join(dir, CONFIG_FILE);
  await writeFile(file, "contexts: [unclosed\n");
  await t.rejects(loadConfig(dir), {
    code: ErrorCode.InvalidConfig,
    message: new RegExp(`^${file}: not valid YAML`),
  });
  await writeFile(file, "currentContext: box9\ncontexts: []\n");
  await t.rejects(loadConfig(dir), {
    code: ErrorCode.InvalidConfig,
    message: `${file}: currentContext: "box9" is not one of the contexts`,
  });
});

t.test("saveConfig refuses an invalid config and leaves the old file", async (t) => {
  const dir = await tmp();
  await saveConfig(dir, { currentContext: "box1", contexts: [ctx()] });
  await t.rejects(saveConfig(dir, { currentContext: "box1", contexts: [ctx({ fingerprint: FP2 })] }), {
    code: ErrorCode.InvalidConfig,
  });
  t.equal((await loadConfig(dir)).contexts[0]?.fingerprint, FP1);
  t.same(await readdir(dir), [CONFIG_FILE]);
});

t.test("the operator key is created once, 0600, and reloaded", async (t) => {
  const dir = join(await tmp(), "cfg");
  await t.rejects(loadOperatorKey(dir), { code: ErrorCode.NotFound, hint: /adopt/ });
  const a = await loadOrCreateOperatorKey(dir);
  t.equal(a.created, true);
  t.equal((await stat(join(dir, OPERATOR_KEY_FILE))).mode & 0o777, 0o600);
  t.equal((await stat(dir)).mode & 0o777, 0o700);
  t.match(await readFile(join(dir, OPERATOR_KEY_FILE), "utf8"), /^-----BEGIN PRIVATE KEY-----/);
  const b = await loadOrCreateOperatorKey(dir);
  t.equal(b.created, false);
  t.equal(b.signer.kid, a.signer.kid);
  t.equal((await loadOperatorKey(dir)).kid, a.signer.kid);
  t.same(await readdir(dir), [OPERATOR_KEY_FILE], "no temp files left");
});

t.test("concurrent first use agrees on one key", async (t) => {
  const dir = await tmp();
  const all = await Promise.all([1, 2, 3, 4].map(() => loadOrCreateOperatorKey(dir)));
  t.equal(new Set(all.map((r) => r.signer.kid)).size, 1);
  t.equal((await loadOperatorKey(dir)).kid, all[0]?.signer.kid);
});

t.test("a key that is not Ed25519 PKCS#8 is CAPSULE_INVALID_CONFIG", async (t) => {
  const dir = await tmp();
  await writeFile(join(dir, OPERATOR_KEY_FILE), "garbage");
  await t.rejects(loadOperatorKey(dir), {
    code: ErrorCode.InvalidConfig,
    message: /operator\.key: not an Ed25519/,
  });
  await t.rejects(
    loadOrCreateOperatorKey(dir),
    { code: ErrorCode.InvalidConfig },
    "never overwrites a bad key",
  );
});

t.test("default config dir and operator name", async (t) => {
  t.equal(defaultConfigDir({ CAPSULE_CONFIG_DIR: "/etc/x", HOME: "/home/a" }), "/etc/x");
  t.equal(defaultConfigDir({ CAPSULE_CONFIG_DIR: "", HOME: "/home/a" }), "/home/a/.config/capsule");
  t.match(defaultOperatorName({ USER: "alice" }), /^alice@.+$/);
});

t.test("context names may not hold ':' or ','", async (t) => {
  for (const ok of ["box1", "a.b_c-d", "9"]) t.doesNotThrow(() => validateContextName(ok), ok);
  for (const bad of ["", "a:b", "a,b", "-x", "a b", "x".repeat(64)]) {
    t.throws(() => validateContextName(bad), { code: ErrorCode.InvalidArgument }, JSON.stringify(bad));
  }
});

t.test("updateConfig: concurrent read-modify-writes lose nothing (parallel adopts)", async (t) => {
  const dir = await tmp();
  const names = Array.from({ length: 20 }, (_, i) => `c${i}`);
  await Promise.all(
    names.map((name, i) =>
      updateConfig(dir, async (cfg) => {
        // Yield between read and write, as an adopt does: without the lock this loses updates.
        await new Promise((r) => setTimeout(r, 1 + (i % 5)));
        return {
          currentContext: cfg.currentContext ?? name,
          contexts: [
            ...cfg.contexts,
            ctx({
              name,
              address: `192.0.2.${i + 1}:50000`,
              ...(i % 2 ? { certPem: CERT2, fingerprint: FP2 } : {}),
            }),
          ],
        };
      }),
    ),
  );
  const cfg = await loadConfig(dir);
  t.same(cfg.contexts.map((c) => c.name).sort(), [...names].sort());
  t.same(await readdir(dir).then((f) => f.filter((x) => x !== CONFIG_FILE)), [], "no lock or temp file left");
});

t.test("updateConfig: a change that throws saves nothing; undefined saves nothing", async (t) => {
  const dir = await tmp();
  await saveConfig(dir, { currentContext: null, contexts: [ctx({ name: "a" })] });
  const before = await readFile(join(dir, CONFIG_FILE), "utf8");
  await t.rejects(
    updateConfig(dir, () => {
      throw new CapsuleError(ErrorCode.AlreadyExists, "no");
    }),
    { code: ErrorCode.AlreadyExists },
  );
  t.same(await updateConfig(dir, () => undefined), await loadConfig(dir));
  t.equal(await readFile(join(dir, CONFIG_FILE), "utf8"), before);
  t.same(await readdir(dir).then((f) => f.sort()), [CONFIG_FILE]);
});

t.test("updateConfig breaks a lock left by a process that is gone", async (t) => {
  const dir = await tmp();
  await saveConfig(dir, { currentContext: null, contexts: [] });
  // A pid that cannot be running: above the kernel's pid_max (at most 2^22).
  await writeFile(join(dir, LOCK_FILE), "4194305\n", { mode: 0o600 });
  const t0 = Date.now();
  await updateConfig(dir, (cfg) => ({ ...cfg, contexts: [ctx({ name: "a" })] }));
  t.ok(Date.now() - t0 < 2000, "without waiting out the lock");
  t.equal((await loadConfig(dir)).contexts.length, 1);
});
