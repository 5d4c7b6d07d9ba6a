// capsulectl fabric driven in-process through run() with a fake RPC dialer (the pattern of
// cli-commands.test.ts): which RPCs each command makes, with what, in what order, and what it prints.
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Readable } from "node:stream";
import t from "tap";
import type { Endpoint } from "../../src/api/client.js";
import { spkiFingerprint } from "../../src/api/fingerprint.js";
import {
  findPoolConflict,
  handshakeAge,
  poolCidr,
  poolClaims,
  shortKey,
} from "../../src/cli/commands/fabric.js";
import { loadOrCreateOperatorKey, saveConfig } from "../../src/cli/config.js";
import { run } from "../../src/cli/main.js";
import { humanBytes } from "../../src/cli/output.js";
import type { CliIO, Dial, RpcCaller } from "../../src/cli/session.js";
import { CapsuleError, ErrorCode } from "../../src/errors.js";
import type { FabricSelf__Output } from "../../src/gen/capsule/v1/FabricSelf.js";

// Self-signed Ed25519 certificates (openssl): CN=cap-test-1, CN=cap-test-2, and one without a CN.
const CERTS = [
  `-----BEGIN CERTIFICATE-----
MIIBQDCB86ADAgECAhRVhw7n//0m5Yphai9Sk5a5+FwYajAFBgMrZXAwFTETMBEG
A1UEAwwKY2FwLXRlc3QtMTAgFw0yNjExMjMwODI2MzVaGA8yMTI2MTAzMDA4MjYz
NVowFTETMBEGA1UEAwwKY2FwLXRlc3QtMTAqMAUGAytlcAMhAFrAivJVIeX/2adu
CeP6e3hP6lSlBObroBT3J9VYONlQo1MwUTAdBgNVHQ4EFgQU8zcHI8xnMVw0RtfJ
MawzVyO+RYgwHwYDVR0jBBgwFoAU8zcHI8xnMVw0RtfJMawzVyO+RYgwDwYDVR0T
AQH/BAUwAwEB/zAFBgMrZXADQQCs0+x7OiJHxBy437B2BFOIP+PnSXcSKpk2BN1B
b3fICi1U77qmiajPg289wP+wsNH9JWvda0MlkSGW5vfVVs4P
-----END CERTIFICATE-----
`,
  `-----BEGIN CERTIFICATE-----
MIIBQDCB86ADAgECAhQn+gm123E3dD1NWIQJDc7O+b2hrTAFBgMrZXAwFTETMBEG
A1UEAwwKY2FwLXRlc3QtMjAgFw0yNjExMjMwODI2MzVaGA8yMTI2MTAzMDA4MjYz
NVowFTETMBEGA1UEAwwKY2FwLXRlc3QtMjAqMAUGAytlcAMhAOEi/3cgTRMWqYGd
Nou5aE1dBZQzMQDnhVzvAPD5plRBo1MwUTAdBgNVHQ4EFgQURNJGEaEdyfp01SDe
vz76S6G3e74wHwYDVR0jBBgwFoAURNJGEaEdyfp01SDevz76S6G3e74wDwYDVR0T
AQH/BAUwAwEB/zAFBgMrZXADQQBR+a9K8jE3rBvqgrG01vW8gRIi1N5ItUhW2Mnv
+JyVLHOQI3d1G8kKEYl4BJgGaCRimmfaZJcmnxZvWdAuGQAN
-----END CERTIFICATE-----
`,
  `-----BEGIN CERTIFICATE-----
MIIBODCB66ADAgECAhRFOCBMN8ywURYPG5IDySvMpaRA1DAFBgMrZXAwETEPMA0G
A1UECgwGbm9ib2R5MCAXDTI2MTEyMzA4MjYzNVoYDzIxMjYxMDMwMDgyNjM1WjAR
MQ8wDQYDVQQKDAZub2JvZHkwKjAFBgMrZXADIQBhrtdsdoILK4yOVcAVDjNHwqtM
20ZsyFOxYBGH3JSk16NTMFEwHQYDVR0OBBYEFLiOokDeUHkSDPTTYtzdraL7iV+O
MB8GA1UdIwQYMBaAFLiOokDeUHkSDPTTYtzdraL7iV+OMA8GA1UdEwEB/wQFMAMB
Af8wBQYDK2VwA0EApgGtmgTZhbqv3Ajzm6dCu9JrXba5asTShhuXCxFmHJqbxchl
yrw0A/DW63BHcokzcOc0KhSt/FC7YIDmgMXiDw==
-----END CERTIFICATE-----
`,
] as const;

// Three capsules: homeA, homeB (behind NAT) and edge, at documentation addresses.
const CAPSULES = [
  { name: "homeA", id: "cap-a", address: "192.0.2.10:50000" },
  { name: "homeB", id: "cap-b", address: "192.0.2.20:50000" },
  { name: "edge", id: "cap-e", address: "192.0.2.30:50000" },
] as const;

const ip = (pool: number) => poolCidr(pool).replace(/0\/24$/, "1");

function self(
  name: string,
  id: string,
  pool: number,
  peers: FabricSelf__Output["peers"] = [],
): FabricSelf__Output {
  return {
    capsuleId: id,
    name,
    wgPublicKey: `${name.padEnd(43, "k")}=`,
    endpoint: name === "edge" ? "198.51.100.1:51820" : "",
    capsuleAddress: ip(pool),
    pool,
    apiPort: 50000,
    apiCertPem: "PEM",
    apiFingerprint: "SHA256:x",
    peerKeyJwk: "{}",
    peers,
    inventory: null,
    wireguardMode: "kernel",
  };
}

const peer = (name: string, id: string, pool: number, relayVia = "") => ({
  capsuleId: id,
  name,
  endpoint: "",
  pool,
  relayVia,
});

interface Call {
  label: string;
  method: string;
  req: Record<string, unknown>;
}
type Handler = (method: string, req: Record<string, unknown>, label: string) => Promise<unknown>;

function fakeDial(handler: Handler, calls: Call[]): Dial {
  return (endpoint: Endpoint) =>
    ({
      call: async (method: string, req: object) => {
        const label = endpoint.label ?? endpoint.address;
        calls.push({ label, method, req: req as Record<string, unknown> });
        return handler(method, req as Record<string, unknown>, label);
      },
      close: () => {},
    }) as unknown as RpcCaller;
}

const tmpDirs: string[] = [];
t.teardown(() => Promise.all(tmpDirs.map((d) => rm(d, { recursive: true, force: true }))));

async function harness(handler: Handler) {
  const root = await mkdtemp(join(tmpdir(), "capsulectl-fabric-"));
  tmpDirs.push(root);
  const dir = join(root, "cfg");
  await loadOrCreateOperatorKey(dir);
  await saveConfig(dir, {
    currentContext: "homeA",
    contexts: CAPSULES.map((c, i) => ({
      name: c.name,
      address: c.address,
      capsuleId: c.id,
      fingerprint: spkiFingerprint(CERTS[i] as string),
      certPem: CERTS[i] as string,
      addedAt: "2026-11-23T12:00:00.000Z",
    })),
  });
  const calls: Call[] = [];
  return {
    calls,
    async cli(argv: string[], extra: Partial<CliIO> = {}) {
      let out = "";
      let err = "";
      const code = await run(argv, {
        stdout: { write: (s: string) => (out += s) },
        stderr: { write: (s: string) => (err += s) },
        env: { CAPSULE_CONFIG_DIR: dir },
        stdin: Object.assign(Readable.from([]), { isTTY: false }),
        dial: fakeDial(handler, calls),
        probe: async () => {
          throw new Error("no probe in these tests");
        },
        now: () => new Date("2026-11-23T12:00:00.000Z"),
        ...extra,
      });
      return { code, out, err };
    },
  };
}

const steps = (calls: Call[]) => calls.map((c) => `${c.label} ${c.method}`);

// ---------------------------------------------------------------- pure helpers

t.test("pools, keys, ages and byte counts render as the tables show them", async (t) => {
  t.equal(poolCidr(0), "100.64.0.0/24");
  t.equal(poolCidr(1), "100.64.1.0/24");
  t.equal(poolCidr(300), "100.65.44.0/24");
  t.equal(poolCidr(16383), "100.127.255.0/24");
  t.equal(shortKey("abcdefghijklmnop="), "abcdefgh…");
  t.equal(shortKey(""), "");
  t.equal(handshakeAge(-1), "never");
  t.equal(handshakeAge(12.7), "12s ago");
  t.equal(handshakeAge(125), "2m5s ago");
  t.equal(humanBytes("0"), "0 B");
  t.equal(humanBytes(1023), "1023 B");
  t.equal(humanBytes("1536"), "1.50 KiB");
  t.equal(humanBytes(3 * 2 ** 30), "3.00 GiB");
  t.equal(humanBytes("x"), "");
});

t.test("findPoolConflict: the same pool on both sides under different ids", async (t) => {
  const a = self("homeA", "cap-a", 7, [peer("edge", "cap-e", 9)]);
  const b = self("homeB", "cap-b", 8, [peer("edge", "cap-e", 9)]);
  t.equal(
    findPoolConflict(poolClaims(a, "homeA", "cap-b"), poolClaims(b, "homeB", "cap-a")),
    undefined,
    "a shared hub is the same capsule, not a conflict",
  );
  const clash = self("homeB", "cap-b", 9);
  t.same(findPoolConflict(poolClaims(a, "homeA", "cap-b"), poolClaims(clash, "homeB", "cap-a")), [
    { capsuleId: "cap-e", name: "edge", pool: 9 },
    { capsuleId: "cap-b", name: "homeB", pool: 9 },
  ]);
  // A's stale record of B (an old pool) is left out: B's own Self is what counts.
  const stale = self("homeA", "cap-a", 7, [peer("homeB", "cap-b", 3)]);
  const other = self("homeB", "cap-b", 8, [peer("x", "cap-x", 3)]);
  t.equal(
    findPoolConflict(poolClaims(stale, "homeA", "cap-b"), poolClaims(other, "homeB", "cap-a")),
    undefined,
  );
});

// ---------------------------------------------------------------- enroll

function enrollHandler(
  selves: Record<string, FabricSelf__Output>,
  enroll: (label: string, req: Record<string, unknown>) => unknown = () => ({ relayVia: "", changed: true }),
): Handler {
  return async (method, req, label) => {
    switch (method) {
      case "Fabric/Self":
        return selves[label];
      case "Fabric/Enroll":
        return enroll(label, req);
      case "Fabric/Unenroll":
        return { removed: true };
      default:
        throw new Error(`unexpected ${method}`);
    }
  };
}

t.test("enroll: Self on both, then each side gets the other's Self", async (t) => {
  const selves = { homeA: self("homeA", "cap-a", 7), homeB: self("homeB", "cap-b", 8) };
  const h = await harness(enrollHandler(selves, () => ({ relayVia: "edge", changed: true })));
  const r = await h.cli(["fabric", "enroll", "homeB", "homeA"]);
  t.equal(r.code, 0, r.err);
  t.same(steps(h.calls).slice(0, 2).sort(), ["homeA Fabric/Self", "homeB Fabric/Self"]);
  t.same(steps(h.calls).slice(2), ["homeB Fabric/Enroll", "homeA Fabric/Enroll"], "A first, then B");
  t.same(h.calls[2]?.req, { peer: selves.homeA }, "B gets A's Self");
  t.same(h.calls[3]?.req, { peer: selves.homeB }, "A gets B's Self");
  t.equal(r.out, "homeB: enrolled homeA (relayed via edge)\nhomeA: enrolled homeB (relayed via edge)\n");
  t.equal(r.err, "");

  const j = await h.cli(["fabric", "enroll", "homeA", "homeB", "-o", "json"]);
  t.same(JSON.parse(j.out), [
    { capsule: "homeA", peer: "homeB", relayVia: "edge", changed: true },
    { capsule: "homeB", peer: "homeA", relayVia: "edge", changed: true },
  ]);
});

t.test("enroll again: both sides unchanged say already enrolled", async (t) => {
  const selves = {
    homeA: self("homeA", "cap-a", 7, [peer("homeB", "cap-b", 8)]),
    homeB: self("homeB", "cap-b", 8, [peer("homeA", "cap-a", 7)]),
  };
  const h = await harness(enrollHandler(selves, () => ({ relayVia: "", changed: false })));
  const r = await h.cli(["fabric", "enroll", "homeA", "homeB"]);
  t.equal(r.code, 0, r.err);
  t.equal(r.out, "homeA: homeB already enrolled (direct)\nhomeB: homeA already enrolled (direct)\n");
});

t.test(
  "enroll refuses a pool conflict before any Enroll, naming the /24, both capsules and the fix",
  async (t) => {
    const selves = {
      homeA: self("homeA", "cap-a", 7, [peer("edge", "cap-e", 9)]),
      homeB: self("homeB", "cap-b", 7),
    };
    const h = await harness(enrollHandler(selves));
    const r = await h.cli(["fabric", "enroll", "homeA", "homeB"]);
    t.equal(r.code, 1);
    t.equal(
      r.err,
      "error: address pool 100.64.7.0/24 is claimed by both homeA and homeB; nothing changed\n" +
        "hint: move the newer, empty capsule to a free pool: capsulectl --capsule homeB fabric repool, then enroll again\n",
    );
    t.equal(r.out, "");
    t.same(steps(h.calls).sort(), ["homeA Fabric/Self", "homeB Fabric/Self"], "no Enroll call");

    // The clash is with B's peer: A is the one that can move.
    const viaPeer = {
      homeA: self("homeA", "cap-a", 5),
      homeB: self("homeB", "cap-b", 6, [peer("nas", "cap-n", 5)]),
    };
    const h2 = await harness(enrollHandler(viaPeer));
    const r2 = await h2.cli(["fabric", "enroll", "homeA", "homeB"]);
    t.equal(r2.code, 1);
    t.match(r2.err, "100.64.5.0/24 is claimed by both homeA and nas");
    t.match(r2.err, "capsulectl --capsule homeA fabric repool");
    t.notOk(h2.calls.some((c) => c.method === "Fabric/Enroll"));
  },
);

t.test("enroll refuses the same capsule twice without touching the network", async (t) => {
  const h = await harness(enrollHandler({}));
  const r = await h.cli(["fabric", "enroll", "homeA", "homeA"]);
  t.equal(r.code, 1);
  t.match(r.err, /^error: fabric: homeA and homeA are the same capsule\nhint: /);
  t.equal(h.calls.length, 0);
  const u = await h.cli(["fabric", "enroll", "homeA", "ghost"]);
  t.equal(u.code, 1);
  t.match(u.err, 'error: unknown context "ghost"\nhint: known contexts: homeA, homeB, edge');
  t.equal(h.calls.length, 0);
});

t.test("enroll: a side that cannot answer Self fails the command with its error", async (t) => {
  const h = await harness(async (_method, _req, label) => {
    if (label === "homeB")
      throw new CapsuleError(ErrorCode.FailedPrecondition, "the fabric is not running on this capsule", {
        hint: "see capsuled's log",
      });
    return self(label, "cap-a", 7);
  });
  const r = await h.cli(["fabric", "enroll", "homeA", "homeB"]);
  t.equal(r.code, 1);
  t.equal(r.err, "error: the fabric is not running on this capsule\nhint: see capsuled's log\n");
  t.notOk(h.calls.some((c) => c.method === "Fabric/Enroll"));
});

t.test("enroll: when the second side fails, the first is rolled back", async (t) => {
  const selves = { homeA: self("homeA", "cap-a", 7), homeB: self("homeB", "cap-b", 8) };
  const h = await harness(
    enrollHandler(selves, (label) => {
      if (label === "homeB")
        throw new CapsuleError(
          ErrorCode.AlreadyExists,
          "another capsule named homeA is already enrolled here",
          {
            hint: "unenroll the old one first",
          },
        );
      return { relayVia: "", changed: true };
    }),
  );
  const r = await h.cli(["fabric", "enroll", "homeA", "homeB"]);
  t.equal(r.code, 1);
  t.same(steps(h.calls).slice(2), ["homeA Fabric/Enroll", "homeB Fabric/Enroll", "homeA Fabric/Unenroll"]);
  t.same(h.calls.at(-1)?.req, { capsuleId: "cap-b" });
  t.equal(
    r.err,
    "error: enroll on homeB failed: another capsule named homeA is already enrolled here; homeA rolled back, nothing changed\n" +
      "hint: unenroll the old one first\n",
  );
  t.equal(r.out, "");
});

t.test("enroll: a timeout on the second side rolls back and says the other may have acted", async (t) => {
  const selves = { homeA: self("homeA", "cap-a", 7), homeB: self("homeB", "cap-b", 8) };
  const h = await harness(
    enrollHandler(selves, (label) => {
      if (label === "homeB") throw new CapsuleError(ErrorCode.Timeout, "homeB: no answer within 10s");
      return { relayVia: "", changed: true };
    }),
  );
  const r = await h.cli(["fabric", "enroll", "homeA", "homeB"]);
  t.equal(r.code, 1);
  t.equal(steps(h.calls).at(-1), "homeA Fabric/Unenroll");
  t.equal(
    r.err,
    "error: enroll on homeB failed: homeB: no answer within 10s; homeA rolled back\n" +
      "hint: homeB may have enrolled homeA before the deadline: once it answers, run capsulectl fabric enroll homeA homeB again, or capsulectl fabric unenroll homeA homeB\n",
  );
});

t.test("enroll: no rollback when the first side had the peer before", async (t) => {
  const selves = {
    homeA: self("homeA", "cap-a", 7, [peer("homeB", "cap-b", 8)]),
    homeB: self("homeB", "cap-b", 8),
  };
  const h = await harness(
    enrollHandler(selves, (label) => {
      if (label === "homeB") throw new CapsuleError(ErrorCode.Timeout, "homeB: no answer within 10s");
      return { relayVia: "", changed: false };
    }),
  );
  const r = await h.cli(["fabric", "enroll", "homeA", "homeB"]);
  t.equal(r.code, 1);
  t.notOk(
    h.calls.some((c) => c.method === "Fabric/Unenroll"),
    "A keeps the peer it had",
  );
  t.match(
    r.err,
    "enroll on homeB failed: homeB: no answer within 10s; homeA already had homeB as a peer and keeps it",
  );
});

t.test("enroll: a failed rollback says so and how to clean up", async (t) => {
  const selves = { homeA: self("homeA", "cap-a", 7), homeB: self("homeB", "cap-b", 8) };
  const h = await harness(async (method, _req, label) => {
    if (method === "Fabric/Self") return selves[label as "homeA" | "homeB"];
    if (method === "Fabric/Enroll" && label === "homeA") return { relayVia: "", changed: true };
    throw new CapsuleError(ErrorCode.Unreachable, `${label}: unreachable`);
  });
  const r = await h.cli(["fabric", "enroll", "homeA", "homeB"]);
  t.equal(r.code, 1);
  t.match(r.err, "undoing homeA's half failed too: homeA: unreachable");
  t.match(r.err, "hint: clean up with capsulectl fabric unenroll homeA homeB");
});

// ---------------------------------------------------------------- unenroll

t.test("unenroll: both sides, each with the other's id; idempotent; a failed side is reported", async (t) => {
  const h = await harness(async (method, req, label) => {
    t.equal(method, "Fabric/Unenroll");
    if (label === "homeB")
      throw new CapsuleError(ErrorCode.Unreachable, "homeB: unreachable (connect ECONNREFUSED)", {
        hint: "is it up?",
      });
    return { removed: req.capsuleId === "cap-b" };
  });
  const r = await h.cli(["fabric", "unenroll", "homeA", "homeB"]);
  t.equal(r.code, 1);
  t.same(
    h.calls.map((c) => [c.label, c.req.capsuleId]),
    [
      ["homeA", "cap-b"],
      ["homeB", "cap-a"],
    ],
  );
  t.equal(
    r.out,
    [
      "CAPSULE   PEER    RESULT",
      "homeA     homeB   removed",
      "homeB     error: homeB: unreachable (connect ECONNREFUSED)",
      "",
    ].join("\n"),
  );
  t.equal(r.err, "hint: is it up?\n");
});

// ---------------------------------------------------------------- status, peers, inventory

const STATUS = {
  interface: "",
  publicKey: "Apub",
  listenPort: 51820,
  capsuleAddress: "100.64.7.1",
  wireguardMode: "kernel",
  peers: [
    {
      capsuleId: "cap-e",
      name: "edge",
      publicKey: "EdgeKey0123456789abcdefghijklmnopqrstuvwxyz=",
      endpoint: "198.51.100.1:51820",
      handshakeAgeSeconds: 12.4,
      rxBytes: "1536",
      txBytes: "92",
      relayVia: "",
      allowedIps: ["100.64.9.1/32", "100.64.9.2/32"],
      capsuleAddress: "100.64.9.1",
      up: true,
    },
    {
      capsuleId: "cap-b",
      name: "homeB",
      publicKey: "HomeBKey123456789abcdefghijklmnopqrstuvwxyz=",
      endpoint: "198.51.100.1:51820",
      handshakeAgeSeconds: -1,
      rxBytes: "0",
      txBytes: "0",
      relayVia: "edge",
      allowedIps: ["100.64.8.1/32"],
      capsuleAddress: "100.64.8.1",
      up: false,
    },
  ],
  warnings: ["address 100.64.8.5 claimed by homeB and edge; kept by homeB"],
};

t.test("status: a wg-style table; wide adds key, address, allowed IPs; warnings on stderr", async (t) => {
  const h = await harness(async (method) => {
    t.equal(method, "Fabric/Status");
    return STATUS;
  });
  const r = await h.cli(["fabric", "status"]);
  t.equal(r.code, 0, r.err);
  t.equal(
    r.out,
    [
      "PEER    ENDPOINT             HANDSHAKE   RX         TX     VIA      UP",
      "edge    198.51.100.1:51820   12s ago     1.50 KiB   92 B   direct   yes",
      "homeB   198.51.100.1:51820   never       0 B        0 B    edge     no",
      "",
    ].join("\n"),
  );
  t.equal(r.err, "warning: address 100.64.8.5 claimed by homeB and edge; kept by homeB\n");

  const wide = await h.cli(["fabric", "status", "-o", "wide"]);
  t.match(wide.out, /UP\s+PUBLIC-KEY\s+ADDRESS\s+ALLOWED-IPS\n/);
  t.match(wide.out, /edge .* yes\s+EdgeKey0…\s+100\.64\.9\.1\s+100\.64\.9\.1\/32,100\.64\.9\.2\/32\n/);

  const json = await h.cli(["fabric", "status", "-o", "json"]);
  t.same(JSON.parse(json.out), STATUS, "json is the response as is");

  const multi = await h.cli(["fabric", "status", "--capsule", "homeA,homeB"]);
  t.match(multi.out, /^CAPSULE\s+PEER\s+ENDPOINT/);
  t.match(multi.out, /\nhomeB\s+homeB\s+198\.51\.100\.1:51820\s+never/);
  t.equal(
    multi.err,
    "warning: homeA: address 100.64.8.5 claimed by homeB and edge; kept by homeB\nwarning: homeB: address 100.64.8.5 claimed by homeB and edge; kept by homeB\n",
  );
});

t.test("peers: name, address, endpoint, relay, short key; wide adds allowed IPs and id", async (t) => {
  const h = await harness(async () => STATUS);
  const r = await h.cli(["fabric", "peers"]);
  t.equal(
    r.out,
    [
      "NAME    ADDRESS      ENDPOINT             VIA      PUBLIC-KEY",
      "edge    100.64.9.1   198.51.100.1:51820   direct   EdgeKey0…",
      "homeB   100.64.8.1   198.51.100.1:51820   edge     HomeBKey…",
      "",
    ].join("\n"),
  );
  const wide = await h.cli(["fabric", "peers", "-o", "wide"]);
  t.match(wide.out, /homeB .* HomeBKey…\s+100\.64\.8\.1\/32\s+cap-b\n/);
});

t.test("inventory: one row per entry, this capsule's first, then its peers'", async (t) => {
  const h = await harness(async () => ({
    self: {
      capsuleId: "cap-a",
      name: "homeA",
      capsuleAddress: "100.64.7.1",
      generation: "3",
      entries: [{ name: "web", address: "100.64.7.2", labels: { tier: "front", app: "web" } }],
    },
    peers: [
      {
        capsuleId: "cap-b",
        name: "homeB",
        capsuleAddress: "100.64.8.1",
        generation: "1",
        entries: [{ name: "db", address: "100.64.8.2", labels: {} }],
      },
    ],
  }));
  const r = await h.cli(["fabric", "inventory"]);
  t.equal(
    r.out,
    [
      "OWNER   NAME   ADDRESS      LABELS",
      "homeA   web    100.64.7.2   app=web,tier=front",
      "homeB   db     100.64.8.2   <none>",
      "",
    ].join("\n"),
  );
});

// ---------------------------------------------------------------- rotate-key, repool

t.test("rotate-key: the new key and who was told; an untold peer exits 1 with the repair", async (t) => {
  const h = await harness(async (method) => {
    t.equal(method, "Fabric/RotateKey");
    return {
      publicKey: "NewKey=",
      notified: ["edge"],
      failed: ["homeB: homeB: no answer before the deadline"],
    };
  });
  const r = await h.cli(["fabric", "rotate-key"]);
  t.equal(r.code, 1);
  t.equal(r.out, "PUBLIC-KEY   NOTIFIED   FAILED\nNewKey=      edge       homeB\n");
  t.equal(
    r.err,
    "error: homeA: could not tell homeB: homeB: no answer before the deadline\n" +
      "hint: capsulectl fabric enroll homeA homeB (hands homeB the new key)\n",
  );
  const ok = await harness(async () => ({ publicKey: "NewKey=", notified: ["edge", "homeB"], failed: [] }));
  const r2 = await ok.cli(["fabric", "rotate-key"]);
  t.equal(r2.code, 0);
  t.equal(r2.err, "");
});

t.test(
  "repool: avoids every other context's pools and their peers'; skips the silent with a note",
  async (t) => {
    const h = await harness(async (method, _req, label) => {
      if (method === "Fabric/Repool") {
        t.equal(label, "homeB");
        return self("homeB", "cap-b", 4000);
      }
      t.equal(method, "Fabric/Self");
      if (label === "homeB") return self("homeB", "cap-b", 7);
      if (label === "homeA")
        return self("homeA", "cap-a", 7, [peer("nas", "cap-n", 12), peer("homeB", "cap-b", 7)]);
      throw new CapsuleError(ErrorCode.Timeout, "edge: no answer within 3s");
    });
    const r = await h.cli(["--capsule", "homeB", "fabric", "repool"]);
    t.equal(r.code, 0, r.err);
    t.same(h.calls.at(-1)?.req, { avoid: [7, 12] });
    t.equal(r.out, "homeB: 100.64.7.1 -> 100.79.160.1 (pool 100.79.160.0/24)\n");
    t.match(r.err, "note: skipped edge (edge: no answer within 3s); the pools it uses are not avoided\n");

    const j = await h.cli(["--capsule", "homeB", "fabric", "repool", "-o", "json"]);
    t.same(JSON.parse(j.out), {
      capsule: "homeB",
      from: "100.64.7.1",
      to: ip(4000),
      pool: poolCidr(4000),
      avoided: [7, 12],
      skipped: ["edge"],
    });

    const many = await h.cli(["--all", "fabric", "repool"]);
    t.equal(many.code, 1);
    t.match(many.err, "repool moves one capsule at a time");
  },
);
