// WorkloadRuntimes and WorkloadNets: a microVM spec goes to the VM runtime (without `kind`), a
// container to containers; calls by id go to whichever runtime has the id; list is both (and
// fails when either fails); microVMs get a TAP, containers a veth, teardown asks both.
import t from "tap";
import type {
  ContainerInfo,
  ContainerStatus,
  ExecResult,
  RunAction,
  StopResult,
} from "../../src/node/runtime/containers.js";
import { containerId } from "../../src/node/runtime/containers.js";
import type { ExecSession } from "../../src/node/runtime/exec.js";
import { FakeNetRuntime } from "../../src/node/workloads/fakes.js";
import type { RunSpec } from "../../src/node/workloads/reconciler.js";
import {
  type ContainerOnlyRuntime,
  type TapRuntime,
  type VmRuntime,
  WorkloadNets,
  WorkloadRuntimes,
} from "../../src/node/workloads/runtimes.js";

/** Recorder is a runtime that records every call as `<tag> <method> <id|spec>` and owns the ids in `ids`. */
class Recorder implements VmRuntime {
  readonly ids = new Set<string>();
  failList: Error | undefined;
  constructor(
    private readonly tag: string,
    private readonly calls: string[],
  ) {}

  async run(spec: object): Promise<{ id: string; action: RunAction; pid: number | undefined }> {
    this.calls.push(`${this.tag} run ${JSON.stringify(spec)}`);
    const s = spec as { workload: string; generation: number };
    const id = containerId(s.workload, s.generation);
    this.ids.add(id);
    return { id, action: "created", pid: 1 };
  }
  async has(id: string): Promise<boolean> {
    return this.ids.has(id);
  }
  async status(id: string): Promise<ContainerStatus> {
    this.calls.push(`${this.tag} status ${id}`);
    return { id, state: "running", pid: 1 };
  }
  async stop(id: string, opts?: object): Promise<StopResult> {
    this.calls.push(`${this.tag} stop ${id} ${JSON.stringify(opts ?? {})}`);
    return { stopped: true, killed: false };
  }
  async restart(id: string): Promise<StopResult> {
    this.calls.push(`${this.tag} restart ${id}`);
    return { stopped: true, killed: false };
  }
  async remove(id: string): Promise<boolean> {
    this.calls.push(`${this.tag} remove ${id}`);
    return true;
  }
  async list(): Promise<ContainerInfo[]> {
    if (this.failList) throw this.failList;
    return [...this.ids].map((id) => ({
      id,
      workload: id.split(".")[0]!,
      generation: Number(id.split(".")[1]),
      image: this.tag,
      state: "running" as const,
    }));
  }
  async exec(id: string, argv: readonly string[]): Promise<ExecResult> {
    this.calls.push(`${this.tag} exec ${id} ${argv.join(" ")}`);
    return { exitCode: 0, stdout: this.tag, stderr: "" };
  }
  async execStream(id: string): Promise<ExecSession> {
    this.calls.push(`${this.tag} execStream ${id}`);
    return { execId: this.tag } as unknown as ExecSession;
  }
  async *logs(id: string): AsyncGenerator<string> {
    this.calls.push(`${this.tag} logs ${id}`);
    yield `${this.tag} log of ${id}`;
  }
}

const vmRun: RunSpec = {
  kind: "microvm",
  workload: "vm",
  generation: 2,
  kernel: "/k/vmlinuz",
  cpus: 1,
  memoryMib: 256,
  address: "100.64.7.3",
  volumes: [{ name: "data", path: "/dev/vol/data", mountPath: "/data" }],
};
const ctrRun: RunSpec = {
  kind: "container",
  workload: "web",
  generation: 1,
  image: "demo/httpd:1",
  netns: "/run/netns/cw-web",
  mounts: [],
};

function rig() {
  const calls: string[] = [];
  const containers = new Recorder("ctr", calls);
  const vms = new Recorder("vm", calls);
  const rt = new WorkloadRuntimes(containers as ContainerOnlyRuntime, vms);
  return { calls, containers, vms, rt };
}

t.test("run: microVM specs to the VM runtime without kind, containers to containers", async (t) => {
  const { calls, rt } = rig();
  t.same(await rt.run(vmRun), { id: "vm.2", action: "created", pid: 1 });
  t.same(await rt.run(ctrRun), { id: "web.1", action: "created", pid: 1 });
  t.equal(calls.length, 2);
  t.match(calls[0], /^vm run /);
  t.match(calls[1], /^ctr run /);
  const { kind: _k1, ...vmRest } = vmRun;
  const { kind: _k2, ...ctrRest } = ctrRun;
  t.same(JSON.parse(calls[0]!.slice("vm run ".length)), vmRest, "no kind field for MicroVms");
  t.same(JSON.parse(calls[1]!.slice("ctr run ".length)), ctrRest, "no kind field for Containers");
  t.notMatch(calls.join("\n"), /"kind"/);
});

t.test("run: a microVM without a VM runtime is refused", async (t) => {
  const calls: string[] = [];
  const rt = new WorkloadRuntimes(new Recorder("ctr", calls) as ContainerOnlyRuntime, undefined);
  await t.rejects(async () => rt.run(vmRun), { message: /vm: microVMs are not available on this capsule/ });
  t.same(calls, []);
  t.same(await rt.run(ctrRun), { id: "web.1", action: "created", pid: 1 }, "containers still run");
  t.same(
    (await rt.list()).map((c) => c.id),
    ["web.1"],
    "list without VMs",
  );
  t.same(await rt.status("vm.2"), { id: "vm.2", state: "running", pid: 1 }, "ids go to containers");
  t.same(calls.at(-1), "ctr status vm.2");
});

t.test("calls by id go to whichever runtime has the id", async (t) => {
  const { calls, rt } = rig();
  await rt.run(vmRun);
  await rt.run(ctrRun);
  calls.length = 0;
  for (const id of ["vm.2", "web.1", "other.1"]) {
    await rt.status(id);
    await rt.stop(id, { timeoutMs: 7 });
    await rt.restart(id);
    await rt.remove(id);
    t.equal((await rt.exec(id, ["true"])).stdout, id === "vm.2" ? "vm" : "ctr");
    t.equal((await rt.execStream(id, ["sh"])).execId, id === "vm.2" ? "vm" : "ctr");
    const logs: string[] = [];
    for await (const l of rt.logs(id)) logs.push(l);
    t.same(logs, [`${id === "vm.2" ? "vm" : "ctr"} log of ${id}`]);
  }
  t.same(calls, [
    "vm status vm.2",
    'vm stop vm.2 {"timeoutMs":7}',
    "vm restart vm.2",
    "vm remove vm.2",
    "vm exec vm.2 true",
    "vm execStream vm.2",
    "vm logs vm.2",
    "ctr status web.1",
    'ctr stop web.1 {"timeoutMs":7}',
    "ctr restart web.1",
    "ctr remove web.1",
    "ctr exec web.1 true",
    "ctr execStream web.1",
    "ctr logs web.1",
    "ctr status other.1",
    'ctr stop other.1 {"timeoutMs":7}',
    "ctr restart other.1",
    "ctr remove other.1",
    "ctr exec other.1 true",
    "ctr execStream other.1",
    "ctr logs other.1",
  ]);
});

t.test("list: both runtimes; one failing fails the list", async (t) => {
  const { rt, containers, vms } = rig();
  await rt.run(vmRun);
  await rt.run(ctrRun);
  t.same(
    (await rt.list()).map((c) => `${c.id} ${c.image}`),
    ["web.1 ctr", "vm.2 vm"],
  );
  vms.failList = new Error("vms dir unreadable");
  await t.rejects(rt.list(), { message: "vms dir unreadable" });
  vms.failList = undefined;
  containers.failList = new Error("containerd down");
  await t.rejects(rt.list(), { message: "containerd down" });
});

t.test("WorkloadNets: microVMs get a TAP, containers a veth; teardown asks both", async (t) => {
  const veths = new FakeNetRuntime();
  const tapCalls: string[] = [];
  let tapHas = true;
  const taps: TapRuntime = {
    ensure: async (spec) => {
      tapCalls.push(`ensure ${JSON.stringify(spec)}`);
      return { tap: "cwx", changed: true };
    },
    teardown: async (w) => {
      tapCalls.push(`teardown ${w}`);
      return tapHas;
    },
  };
  const nets = new WorkloadNets(veths, taps);
  t.same(
    await nets.ensure({ workload: "vm", address: "100.64.7.3", hostSrc: "100.64.7.1", kind: "microvm" }),
    {
      tap: "cwx",
      changed: true,
    },
  );
  t.same(
    tapCalls,
    ['ensure {"workload":"vm","address":"100.64.7.3","hostSrc":"100.64.7.1"}'],
    "kind not passed on",
  );
  t.same(veths.calls, []);

  t.equal(await nets.ensure({ workload: "web", address: "100.64.7.2", kind: "container" }), true);
  t.equal(await nets.ensure({ workload: "api", address: "100.64.7.4" }), true, "no kind: a container");
  t.same(veths.calls, ["ensure web 100.64.7.2 src -", "ensure api 100.64.7.4 src -"]);
  t.equal(tapCalls.length, 1);
  t.same(await nets.list(), ["api", "web"], "list is the veths'");

  t.equal(await nets.teardown("vm"), true, "a TAP was there");
  t.same(tapCalls.at(-1), "teardown vm");
  t.same(veths.calls.at(-1), "teardown vm", "the veth side asked too");
  tapHas = false;
  t.equal(await nets.teardown("web"), true, "a veth was there");
  t.equal(await nets.teardown("nothing"), false, "neither");
  t.same(tapCalls.slice(-2), ["teardown web", "teardown nothing"]);
});
