// The workload manager and reconciler over in-memory fakes: apply validates everything before
// any change and is idempotent; the reconciler creates, adopts, restarts with backoff, recreates
// on a new generation with the same address, and delete undoes every step.
import { pino } from "pino";
import t from "tap";
import { FakeClock } from "../../src/node/host/clock.js";
import { Store } from "../../src/node/store/store.js";
import {
  FakeAddressBook,
  FakeContainerRuntime,
  FakeNetRuntime,
  FakePortForwarder,
  FakeVolumes,
} from "../../src/node/workloads/fakes.js";
import { Workloads } from "../../src/node/workloads/manager.js";
import { Reconciler } from "../../src/node/workloads/reconciler.js";
import { WorkloadRepo } from "../../src/node/workloads/repo.js";

const log = pino({ level: "silent" });

function setup(opts: { volumes?: string[]; images?: string[] } = {}) {
  const store = Store.open(":memory:");
  const repo = new WorkloadRepo(store);
  const clock = new FakeClock();
  const containers = new FakeContainerRuntime();
  const net = new FakeNetRuntime();
  const volumes = new FakeVolumes(opts.volumes ?? ["data"]);
  const ports = new FakePortForwarder();
  const addresses = new FakeAddressBook();
  const have = new Set(opts.images ?? ["demo/httpd:1"]);
  const images = { has: async (ref: string) => have.has(ref) };
  const mk = () =>
    new Reconciler({ repo, containers, net, volumes, ports, hostSrc: () => "100.64.7.1", clock, log });
  const reconciler = mk();
  const workloads = new Workloads({
    repo,
    images,
    addresses,
    containers,
    net,
    reconciler,
    volumes,
    ports,
    clock,
  });
  return { store, repo, clock, containers, net, volumes, ports, addresses, reconciler, workloads, mk };
}

const web = (over: Record<string, unknown> = {}) =>
  JSON.stringify({
    kind: "Workload",
    name: "web",
    labels: { app: "web" },
    container: { image: "demo/httpd:1", command: ["httpd", "-f", "-p", "8080"], env: { A: "1" } },
    ports: [{ port: 8080, hostPort: 18080 }],
    ...over,
  });
const api = (over: Record<string, unknown> = {}) =>
  JSON.stringify({ kind: "Workload", name: "api", container: { image: "demo/httpd:1" }, ...over });

t.test("apply validates every document before changing anything", async (t) => {
  const s = setup();
  const nothing = () => {
    t.same(s.repo.list(), [], "no row written");
    t.same(s.addresses.calls, [], "no address reserved");
  };
  await t.rejects(s.workloads.apply([web(), api({ container: { image: "demo/nope:1" } })]), {
    code: "CAPSULE_NOT_FOUND",
    message: /api: image demo\/nope:1 is not in this capsule's image store/,
    hint: /capsulectl image push/,
  });
  nothing();
  await t.rejects(s.workloads.apply([web(), web()]), {
    code: "CAPSULE_INVALID_ARGUMENT",
    message: /appears twice/,
  });
  await t.rejects(s.workloads.apply([web(), api({ ports: [{ port: 80, hostPort: 18080 }] })]), {
    code: "CAPSULE_ALREADY_EXISTS",
    message: /host port 18080\/tcp is already used by workload web/,
  });
  s.ports.busy.add("18080/tcp");
  await t.rejects(s.workloads.apply([web()]), {
    code: "CAPSULE_FAILED_PRECONDITION",
    message: /host port 18080\/tcp is in use on this capsule/,
  });
  s.ports.busy.clear();
  await t.rejects(s.workloads.apply([web({ volumes: [{ name: "nope", mountPath: "/d" }] })]), {
    code: "CAPSULE_NOT_FOUND",
    message: /volume nope/,
  });
  await t.rejects(s.workloads.apply(['{"kind":"Workload","name":"x"}']), {
    code: "CAPSULE_INVALID_ARGUMENT",
  });
  await t.rejects(s.workloads.apply(["{not json"]), {
    code: "CAPSULE_INVALID_ARGUMENT",
    message: /not JSON/,
  });
  nothing();
  t.same(await s.workloads.apply([web()], { dryRun: true }), [
    { kind: "Workload", name: "web", action: "created" },
  ]);
  nothing();
});

t.test(
  "apply: created, unchanged, configured (new generation only when the container changes)",
  async (t) => {
    const s = setup();
    t.same(await s.workloads.apply([web()]), [{ kind: "Workload", name: "web", action: "created" }]);
    await s.reconciler.idle();
    const r1 = s.repo.get("web")!;
    t.match(r1, { generation: 1, desired: "running", address: "100.64.7.2" });
    t.same(s.addresses.calls, ['reserve web {"app":"web"}']);
    t.same(s.containers.calls, ["run web.1"]);
    t.same(s.net.calls, ["ensure web 100.64.7.2 src 100.64.7.1"]);
    t.same(s.ports.sets.at(-1), {
      addresses: ["100.64.7.2"],
      forwards: [{ protocol: "tcp", hostPort: 18080, address: "100.64.7.2", port: 8080, workload: "web" }],
    });

    t.same(await s.workloads.apply([web()]), [{ kind: "Workload", name: "web", action: "unchanged" }]);
    t.equal(s.addresses.calls.length, 1, "unchanged: no reservation");
    // Key order does not matter.
    const reordered = JSON.stringify({ ...JSON.parse(web()), kind: "Workload" });
    t.equal((await s.workloads.apply([reordered]))[0]!.action, "unchanged");

    t.equal(
      (await s.workloads.apply([web({ labels: { app: "web", tier: "front" } })]))[0]!.action,
      "configured",
    );
    t.equal(s.repo.get("web")!.generation, 1, "labels only: same container");
    t.same(
      s.addresses.calls.at(-1),
      'reserve web {"app":"web","tier":"front"} 100.64.7.2',
      "labels pushed, address kept",
    );

    const env = web({
      labels: { app: "web", tier: "front" },
      container: { image: "demo/httpd:1", command: ["httpd", "-f", "-p", "8080"], env: { A: "2" } },
    });
    t.equal((await s.workloads.apply([env]))[0]!.action, "configured");
    await s.reconciler.idle();
    const r2 = s.repo.get("web")!;
    t.match(r2, { generation: 2, address: "100.64.7.2" });
    t.same(
      s.containers.calls.slice(-2),
      ["remove web.1", "run web.2"],
      "old generation removed, new one made",
    );
    t.same([...s.containers.containers.keys()], ["web.2"]);
    t.match(
      r2.events.map((e) => e.type),
      ["created", "created", "configured", "configured", "created"],
    );
    const v = await s.workloads.get("web");
    t.match(v, {
      phase: "running",
      address: "100.64.7.2",
      generation: "2",
      ports: [{ port: 8080, hostPort: 18080 }],
    });
  },
);

t.test("a host port held by another workload is refused; its own is not", async (t) => {
  const s = setup();
  await s.workloads.apply([web()]);
  s.ports.busy.add("18080/tcp"); // what ss would not show anyway: DNAT binds nothing
  t.equal((await s.workloads.apply([web({ labels: {} })]))[0]!.action, "configured", "own port is fine");
  await t.rejects(s.workloads.apply([api({ ports: [{ port: 80, hostPort: 18080 }] })]), {
    code: "CAPSULE_ALREADY_EXISTS",
    message: /18080\/tcp is already used by workload web/,
  });
  t.equal(s.repo.get("api"), undefined);
  // Moving the port between workloads in one apply is fine.
  s.ports.busy.clear();
  const moved = await s.workloads.apply([
    web({ ports: [{ port: 8080 }] }),
    api({ ports: [{ port: 80, hostPort: 18080 }] }),
  ]);
  t.same(
    moved.map((r) => r.action),
    ["configured", "created"],
  );
  t.same(s.repo.hostPorts(), [{ protocol: "tcp", hostPort: 18080, workload: "api", port: 80 }]);
});

t.test(
  "a container killed behind our back: exit recorded, restarted after backoff, same address",
  async (t) => {
    const s = setup();
    await s.workloads.apply([web()]);
    await s.reconciler.idle();
    s.containers.kill("web.1", 137);
    await s.reconciler.reconcile("web");
    let v = await s.workloads.get("web");
    t.match(v, { phase: "backoff", message: /exited with code 137; restarting in 1s/ });
    t.equal(s.repo.get("web")!.lastExit, 137);
    await s.reconciler.reconcile("web");
    t.equal(s.containers.containers.get("web.1")!.state, "stopped", "not before the backoff");
    s.clock.advance(1000);
    await s.reconciler.reconcile("web");
    v = await s.workloads.get("web");
    t.match(v, { phase: "running", restarts: 1, address: "100.64.7.2" });
    t.same(
      v.events.slice(-2).map((e) => `${e.type}: ${e.message}`),
      ["exited: container web.1 exited with code 137", "restarted: container web.1 restarted (pid 101)"],
    );
  },
);

t.test("a new reconciler adopts running containers (no duplicate) and removes orphans", async (t) => {
  const s = setup();
  await s.workloads.apply([web()]);
  await s.reconciler.idle();
  s.reconciler.stop();
  // An orphan: a container and namespace with no row (a delete cut short).
  await s.containers.run({
    kind: "container",
    workload: "gone",
    generation: 3,
    image: "demo/httpd:1",
    netns: "/run/netns/cw-gone",
  });
  await s.net.ensure({ workload: "gone", address: "100.64.7.9" });
  s.containers.calls.length = 0;
  const again = s.mk();
  await again.pass();
  await again.idle();
  t.same(s.containers.calls, ["remove gone.3"], "web.1 adopted, not run again");
  t.same(await s.net.list(), ["web"]);
  t.equal(again.status("web").phase, "running");
  again.stop();
});

t.test("stop, start, restart, logs, exec, delete", async (t) => {
  const s = setup();
  await s.workloads.apply([web({ volumes: [{ name: "data", mountPath: "/data" }] })]);
  await s.reconciler.idle();
  t.same(s.volumes.calls, ["attach data web"]);
  t.match(s.containers.containers.get("web.1")!.spec, { kind: "container" });
  t.same((s.containers.containers.get("web.1")!.spec as { mounts?: unknown }).mounts, [
    { source: "/vol/data", target: "/data" },
  ]);
  t.match(await s.workloads.stop("web"), { phase: "stopped", desired: "stopped", address: "100.64.7.2" });
  t.equal(s.net.namespaces.has("web"), true, "namespace kept while stopped");
  await s.reconciler.reconcile("web");
  t.equal(s.containers.containers.get("web.1")!.state, "stopped", "stays stopped");
  const started = await s.workloads.start("web");
  t.match(started, { phase: "running", desired: "running" });
  t.notOk(
    started.events.some((e) => e.type === "exited"),
    "an operator stop is not an exit",
  );
  t.match(await s.workloads.restart("web"), { phase: "running", restarts: 1 });
  s.containers.containers.get("web.1")!.log = "a\nb\nc\n";
  let out = "";
  for await (const x of s.workloads.logs("web", { tailLines: 2 })) out += x;
  t.equal(out, "b\nc\n");
  t.match(await s.workloads.exec("web", ["echo", "hi"]), { exitCode: 0, stdout: "echo hi" });
  await t.rejects(s.workloads.get("nope"), { code: "CAPSULE_NOT_FOUND" });

  t.equal(await s.workloads.delete("web"), true);
  t.same(s.containers.containers.size, 0);
  t.same(s.net.calls.at(-1), "teardown web");
  t.same(s.volumes.calls.at(-1), "detach data web");
  t.same(s.addresses.calls.at(-1), "release web");
  t.same(s.repo.list(), []);
  t.same(s.ports.sets.at(-1), { addresses: [], forwards: [] });
  t.equal(await s.workloads.delete("web"), false, "idempotent");
});

t.test("a stopped workload stays stopped across a restart of the agent (a new reconciler)", async (t) => {
  const s = setup();
  await s.workloads.apply([web()]);
  await s.reconciler.idle();
  await s.workloads.stop("web");
  s.reconciler.stop();
  s.containers.calls.length = 0;
  const again = s.mk();
  await again.pass();
  await again.idle();
  t.equal(s.repo.get("web")!.desired, "stopped", "desired state is in the store");
  t.equal(s.containers.containers.get("web.1")!.state, "stopped", "not started by the new reconciler");
  t.notOk(
    s.containers.calls.some((c) => /^(run|start)/.test(c)),
    `no run/start: ${s.containers.calls.join(", ")}`,
  );
  t.equal(again.status("web").phase, "stopped");
  again.stop();
});
