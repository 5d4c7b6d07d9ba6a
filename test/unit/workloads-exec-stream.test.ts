// Workloads/ExecStream through a real gRPC server on loopback (no TLS; the wrapper is what is
// tested): the token is checked before anything runs, the first message must be a start, a
// whole session (terminal size, stdin, resize, stdin closed, exit code), a client that
// half-closes early does not kill the command, a cancelled call does, and every call is
// counted with its final code. The session is FakeContainerRuntime's scripted process.
import * as grpc from "@grpc/grpc-js";
import pino from "pino";
import t, { type Test } from "tap";
import { ERROR_CODE_METADATA } from "../../src/api/errors.js";
import { loadProto } from "../../src/api/proto.js";
import { AUTH_METADATA, generateSigner, mintRpcToken, type Signer } from "../../src/api/token.js";
import type { ExecOutput__Output } from "../../src/gen/capsule/v1/ExecOutput.js";
import { workloadService } from "../../src/node/api/workload-service.js";
import { Authenticator } from "../../src/node/auth.js";
import { FakeClock } from "../../src/node/host/clock.js";
import { Metrics } from "../../src/node/metrics.js";
import type { ExecSession } from "../../src/node/runtime/exec.js";
import { Store } from "../../src/node/store/store.js";
import { FakeContainerRuntime } from "../../src/node/workloads/fakes.js";
import type { Workloads } from "../../src/node/workloads/manager.js";

const AUD = "cap-test";
const METHOD = "/capsule.v1.Workloads/ExecStream";

async function setup(t: Test) {
  const store = Store.open(":memory:");
  const clock = new FakeClock(Date.now());
  const { signer } = await generateSigner();
  store.putOperator({
    id: signer.kid,
    name: "alice",
    publicKeyJwk: JSON.stringify(signer.publicJwk),
    addedAt: "x",
    addedBy: "claim",
  });
  const metrics = new Metrics();
  const rt = new FakeContainerRuntime();
  await rt.run({
    kind: "container",
    workload: "web",
    generation: 1,
    image: "demo/httpd:1",
    netns: "/run/netns/cw-web",
  });
  const sessions: { killed: boolean }[] = [];
  const workloads = {
    execStream: async (name: string, argv: string[], opts: object): Promise<ExecSession> => {
      const s = await rt.execStream(`${name}.1`, argv, opts);
      const rec = { killed: false };
      sessions.push(rec);
      return {
        ...s,
        kill: async () => {
          rec.killed = true;
          await s.kill();
        },
      };
    },
  } as unknown as Workloads;
  const server = new grpc.Server();
  server.addService(
    loadProto().capsule.v1.Workloads.service,
    workloadService({
      auth: new Authenticator(store, clock, AUD),
      metrics,
      log: pino({ level: "silent" }),
      workloads: () => workloads,
    }),
  );
  const port = await new Promise<number>((res, rej) =>
    server.bindAsync("127.0.0.1:0", grpc.ServerCredentials.createInsecure(), (e, p) => (e ? rej(e) : res(p))),
  );
  const Client = loadProto().capsule.v1.Workloads;
  const client = new Client(`127.0.0.1:${port}`, grpc.credentials.createInsecure());
  t.teardown(() => {
    client.close();
    server.forceShutdown();
    store.close();
  });
  const open = async (token: boolean | Signer = signer) => {
    const md = new grpc.Metadata();
    if (token) md.set(AUTH_METADATA, `Bearer ${await mintRpcToken(signer, AUD, METHOD, clock.now())}`);
    return client.execStream(md);
  };
  const counted = async (code: string) =>
    (await metrics.registry.getSingleMetric("capsule_rpc_requests_total")?.get())?.values.find(
      (v) => v.labels.method === METHOD && v.labels.code === code,
    )?.value ?? 0;
  return { open, sessions, rt, counted };
}

type Call = grpc.ClientDuplexStream<object, ExecOutput__Output>;

/** read collects the call's messages until it ends, or its error. */
function read(call: Call): Promise<{ msgs: ExecOutput__Output[]; error?: grpc.ServiceError }> {
  const msgs: ExecOutput__Output[] = [];
  return new Promise((resolve) => {
    call.on("data", (m: ExecOutput__Output) => msgs.push(m));
    call.on("error", (error: grpc.ServiceError) => resolve({ msgs, error }));
    call.on("end", () => resolve({ msgs }));
  });
}

const stdoutText = (msgs: ExecOutput__Output[]) =>
  msgs
    .filter((m) => m.msg === "stdout")
    .map((m) => m.stdout?.toString() ?? "")
    .join("");

t.test("no token: refused before anything runs", async (t) => {
  const { open, rt, counted } = await setup(t);
  const call = await open(false);
  const done = read(call);
  call.write({ start: { name: "web", argv: ["sh"] } });
  const { error } = await done;
  t.equal(error?.code, grpc.status.UNAUTHENTICATED);
  t.equal(error?.metadata.get(ERROR_CODE_METADATA)[0], "CAPSULE_UNAUTHENTICATED");
  t.same(rt.calls, ["run web.1"], "no exec");
  t.equal(await counted("CAPSULE_UNAUTHENTICATED"), 1);
});

t.test("the first message must be a start", async (t) => {
  const { open } = await setup(t);
  const call = await open();
  const done = read(call);
  call.write({ stdin: Buffer.from("x") });
  const { error } = await done;
  t.equal(error?.code, grpc.status.INVALID_ARGUMENT);
  t.match(error?.details, /first message must be an ExecStart/);
  const empty = await open();
  const done2 = read(empty);
  empty.write({ start: { name: "web", argv: [] } });
  t.match((await done2).error?.details, /argv: is empty/);
});

t.test("a session: size, stdin, resize, stdin closed, the exit code last", async (t) => {
  const { open, rt, sessions, counted } = await setup(t);
  const call = await open();
  const done = read(call);
  call.write({
    start: { name: "web", argv: ["sh", "-c", "exit 7"], tty: true, stdin: true, rows: 33, cols: 101 },
  });
  call.write({ stdin: Buffer.from("typed\n") });
  call.write({ resize: { rows: 40, cols: 120 } });
  call.write({ stdinClosed: true });
  call.end();
  const { msgs, error } = await done;
  t.notOk(error);
  t.equal(stdoutText(msgs), "sh -c exit 7\nsize 33x101\ntyped\nresize 40x120\n");
  t.same(msgs.at(-1), { exitCode: 7, msg: "exitCode" }, "the exit code is last");
  t.same(rt.calls.at(-1), "execStream web.1 tty stdin sh -c exit 7");
  t.same(sessions, [{ killed: true }], "kill after the exit is a no-op for the session");
  t.equal(await counted("OK"), 1);
});

t.test("half-closed early: the command keeps running; cancelled: it is killed", async (t) => {
  const { open, sessions, counted } = await setup(t);
  const call = await open();
  const msgs: ExecOutput__Output[] = [];
  call.on("data", (m: ExecOutput__Output) => msgs.push(m));
  call.on("error", () => {});
  call.write({ start: { name: "web", argv: ["cat"], stdin: true } });
  call.write({ stdin: Buffer.from("one\n") });
  call.end();
  const until = Date.now() + 5000;
  while (stdoutText(msgs) !== "cat\none\n" && Date.now() < until) await new Promise((r) => setTimeout(r, 10));
  t.equal(stdoutText(msgs), "cat\none\n", "output keeps flowing after the half-close");
  t.same(sessions, [{ killed: false }], "not killed by the half-close");
  call.cancel();
  while (!sessions[0]?.killed && Date.now() < until) await new Promise((r) => setTimeout(r, 10));
  t.same(sessions, [{ killed: true }], "killed when the call was cancelled");
  while ((await counted("CANCELLED")) === 0 && Date.now() < until)
    await new Promise((r) => setTimeout(r, 10));
  t.equal(await counted("CANCELLED"), 1);
});
