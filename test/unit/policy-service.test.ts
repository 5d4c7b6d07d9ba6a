// capsule.v1.Policies over a real gRPC server (plaintext on loopback, a fake authenticator):
// every method's answer survives the proto encoding, errors keep their code and field.
import * as grpc from "@grpc/grpc-js";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { pino } from "pino";
import t, { type Test } from "tap";
import { fromServiceError } from "../../src/api/errors.js";
import { loadProto } from "../../src/api/proto.js";
import type { Mesh } from "../../src/fabric/policy/model.js";
import { policyService } from "../../src/node/api/policy-service.js";
import { FakeClock } from "../../src/node/host/clock.js";
import { FakeRunner } from "../../src/node/host/runner.js";
import { Metrics } from "../../src/node/metrics.js";
import { NftPolicyApplier } from "../../src/node/policy/applier.js";
import { Policies } from "../../src/node/policy/manager.js";
import { PolicyRepo } from "../../src/node/policy/repo.js";
import { Store } from "../../src/node/store/store.js";

const MESH: Mesh = {
  self: "homea",
  capsules: [
    { name: "homea", address: "100.64.2.1", edge: false },
    { name: "edge", address: "100.64.1.1", edge: true },
  ],
  workloads: [
    { name: "web", address: "100.64.2.2", labels: { app: "web" }, capsule: "homea" },
    { name: "db", address: "100.64.2.3", labels: { app: "db" }, capsule: "homea" },
  ],
};

const WEB_DB = JSON.stringify({
  kind: "Policy",
  name: "web-db",
  allow: [{ from: { workload: "web" }, to: { labels: { app: "db" } }, ports: ["5432/tcp"] }],
  tests: [{ from: "db", to: "web", port: "8080/tcp", expect: "deny" }],
});
const GHOST = JSON.stringify({
  kind: "Policy",
  name: "ghost",
  allow: [{ from: { workload: "nobody" }, to: { workload: "web" }, ports: ["80/tcp"] }],
});

type Call = <Res>(method: string, req: object) => Promise<Res>;

async function serve(t: Test): Promise<{ call: Call; fake: FakeRunner }> {
  const dir = mkdtempSync(join(tmpdir(), "policy-svc-"));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const fake = new FakeRunner().on((argv) => (argv[1] === "-j" ? { exitCode: 1 } : undefined));
  const log = pino({ level: "silent" });
  const policies = new Policies({
    repo: new PolicyRepo(Store.open(":memory:")),
    applier: new NftPolicyApplier({ runner: fake, stateDir: dir }),
    mesh: () => MESH,
    fabricIface: "capsule0",
    clock: new FakeClock(),
    log,
  });
  const deps = {
    auth: { authenticate: async () => ({ kind: "operator", id: "op" }) },
    metrics: new Metrics(),
    log,
  } as unknown as Parameters<typeof policyService>[0];
  const v1 = loadProto().capsule.v1;
  const server = new grpc.Server();
  server.addService(v1.Policies.service, policyService({ ...deps, policies }));
  const port = await new Promise<number>((res, rej) =>
    server.bindAsync("127.0.0.1:0", grpc.ServerCredentials.createInsecure(), (e, p) => (e ? rej(e) : res(p))),
  );
  const client = new v1.Policies(`127.0.0.1:${port}`, grpc.credentials.createInsecure());
  t.teardown(() => {
    client.close();
    server.forceShutdown();
  });
  const call: Call = (method, req) =>
    new Promise((res, rej) =>
      (
        client as unknown as Record<
          string,
          (r: object, cb: (e: grpc.ServiceError | null, v: unknown) => void) => void
        >
      )[method]!.call(client, req, (e, v) => (e ? rej(fromServiceError(e, "homea")) : res(v as never))),
    );
  return { call, fake };
}

t.test("Apply, List, Show, Explain, Test, Delete over the wire", async (t) => {
  const { call, fake } = await serve(t);
  const applied = await call<Record<string, unknown>>("Apply", { manifestsJson: [WEB_DB, GHOST] });
  t.same(applied, {
    results: [
      { name: "ghost", action: "created" },
      { name: "web-db", action: "created" },
    ],
    tests: [
      {
        policy: "web-db",
        index: 1,
        from: "db",
        to: "web",
        port: "8080/tcp",
        expect: "deny",
        got: "deny",
        rule: "",
        passed: true,
        skipped: false,
        message: "db -> web 8080/tcp: deny (denied: no rule)",
      },
    ],
    warnings: [
      {
        policy: "ghost",
        index: 1,
        side: "from",
        message: "{workload: nobody} matches nothing: no workload named nobody in the mesh",
      },
    ],
    enforced: true,
  });
  t.ok(fake.commands.includes("nft -f -"), "enforced with nft");

  const list = await call<{ policies: { name: string; rules: number; tests: number }[] }>("List", {});
  t.match(list.policies, [
    { name: "ghost", rules: 1, tests: 0 },
    { name: "web-db", rules: 1, tests: 1 },
  ]);

  const show = await call<Record<string, unknown>>("Show", {});
  t.match(show, {
    workloads: [
      {
        name: "db",
        address: "100.64.2.3",
        drops: "0",
        allow: [
          {
            origin: "policy web-db",
            index: 1,
            from: "{workload: web}",
            sources: ["web (100.64.2.2)"],
            ports: ["5432/tcp"],
          },
        ],
      },
      { name: "web", address: "100.64.2.2", allow: [{ origin: "policy ghost", sources: [] }] },
    ],
    enforced: true,
    policies: 2,
  });

  t.same(await call("Explain", { src: "web", dst: "db", port: "5432/tcp" }), {
    allowed: true,
    rule: "policy web-db rule 1",
    text: "allowed by policy web-db rule 1: from {workload: web} to {labels: {app: db}} 5432/tcp",
    srcAddress: "100.64.2.2",
    dstAddress: "100.64.2.3",
  });
  t.match(await call("Explain", { src: "edge", dst: "web", port: "icmp" }), {
    allowed: false,
    text: "denied: no rule",
  });

  const tested = await call<{ passed: boolean; tests: { passed: boolean }[] }>("Test", {
    manifestsJson: [
      JSON.stringify({
        kind: "Policy",
        name: "open",
        allow: [{ from: { workload: "db" }, to: { workload: "web" }, ports: ["8080/tcp"] }],
      }),
    ],
  });
  t.equal(tested.passed, false, "open would break web-db's test");

  t.same(await call("Delete", { name: "ghost" }), { deleted: true });
  t.same(await call("Delete", { name: "ghost" }), { deleted: false });
});

t.test("errors keep their code and name the field", async (t) => {
  const { call } = await serve(t);
  await t.rejects(
    call("Apply", {
      manifestsJson: [
        '{"kind":"Policy","name":"x","allow":[{"from":{"workload":"a"},"to":{"workload":"b"},"ports":["0/tcp"]}]}',
      ],
    }),
    {
      code: "CAPSULE_INVALID_ARGUMENT",
      message: /^x: allow\.0\.ports\.0: 0 is not a port/,
    },
  );
  await t.rejects(call("Apply", { manifestsJson: [] }), {
    code: "CAPSULE_INVALID_ARGUMENT",
    message: /^manifests_json: is empty/,
  });
  await call("Apply", { manifestsJson: [WEB_DB] });
  await t.rejects(
    call("Apply", {
      manifestsJson: [
        JSON.stringify({
          kind: "Policy",
          name: "open",
          allow: [{ from: { workload: "db" }, to: { workload: "web" }, ports: ["8000-8100/tcp"] }],
        }),
      ],
    }),
    {
      code: "CAPSULE_FAILED_PRECONDITION",
      message:
        "policy web-db test 1 (db -> web 8080/tcp): expected deny, got allow by policy open rule 1; nothing changed",
      hint: /policy explain db web 8080\/tcp/,
    },
  );
  await t.rejects(call("Explain", { src: "web", dst: "db", port: "5432" }), {
    code: "CAPSULE_INVALID_ARGUMENT",
    message: /^port: /,
  });
  await t.rejects(call("Delete", { name: "" }), {
    code: "CAPSULE_INVALID_ARGUMENT",
    message: /^name: is required/,
  });
});
