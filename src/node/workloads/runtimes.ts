/**
 * WorkloadRuntimes and WorkloadNets: one runtime and one network plumbing for the reconciler,
 * whatever a workload is. A container goes to `Containers` (containerd) with a veth and
 * namespace (`WorkloadNet`); a microVM goes to `MicroVms` (QEMU) with a TAP (`TapNet`).
 * Calls by id go to whichever runtime has that id; ids never clash, as both are
 * `<workload>.<generation>` and a workload is one kind at a time.
 */
import type {
  ContainerInfo,
  ContainerStatus,
  ExecOptions,
  ExecResult,
  LogsOptions,
  RemoveOptions,
  RunAction,
  StopOptions,
  StopResult,
} from "../runtime/containers.js";
import type { ExecSession, ExecStreamOptions } from "../runtime/exec.js";
import type { ContainerRuntime, NetRuntime, RunSpec } from "./reconciler.js";

/** VmRuntime is what {@link WorkloadRuntimes} needs of `MicroVms`: a runtime that can say which ids are its own. */
export interface VmRuntime extends Omit<ContainerRuntime, "run"> {
  run(spec: Omit<Extract<RunSpec, { kind: "microvm" }>, "kind">): Promise<{
    id: string;
    action: RunAction;
    pid: number | undefined;
  }>;
  has(id: string): Promise<boolean>;
}

/** ContainerOnlyRuntime is what {@link WorkloadRuntimes} needs of `Containers`. */
export interface ContainerOnlyRuntime extends Omit<ContainerRuntime, "run"> {
  run(spec: Omit<Extract<RunSpec, { kind: "container" }>, "kind">): Promise<{
    id: string;
    action: RunAction;
    pid: number | undefined;
  }>;
}

/** WorkloadRuntimes dispatches to the container or the microVM runtime (see the module comment). */
export class WorkloadRuntimes implements ContainerRuntime {
  constructor(
    private readonly containers: ContainerOnlyRuntime,
    private readonly vms: VmRuntime | undefined,
  ) {}

  private async of(id: string): Promise<Omit<ContainerRuntime, "run">> {
    return this.vms && (await this.vms.has(id)) ? this.vms : this.containers;
  }

  async run(spec: RunSpec): Promise<{ id: string; action: RunAction; pid: number | undefined }> {
    if (spec.kind === "microvm") {
      const { kind: _k, ...vm } = spec;
      if (!this.vms) throw new Error(`${spec.workload}: microVMs are not available on this capsule`);
      return this.vms.run(vm);
    }
    const { kind: _k, ...c } = spec;
    return this.containers.run(c);
  }

  async status(id: string): Promise<ContainerStatus> {
    return (await this.of(id)).status(id);
  }

  async stop(id: string, opts?: StopOptions): Promise<StopResult> {
    return (await this.of(id)).stop(id, opts);
  }

  async restart(id: string, opts?: StopOptions): Promise<StopResult> {
    return (await this.of(id)).restart(id, opts);
  }

  async remove(id: string, opts?: RemoveOptions): Promise<boolean> {
    return (await this.of(id)).remove(id, opts);
  }

  /** list is every container and every microVM; a failing runtime fails the list (a partial one would look like missing workloads). */
  async list(): Promise<ContainerInfo[]> {
    const [c, v] = await Promise.all([this.containers.list(), this.vms?.list() ?? []]);
    return [...c, ...v];
  }

  async exec(id: string, argv: readonly string[], opts?: ExecOptions): Promise<ExecResult> {
    return (await this.of(id)).exec(id, argv, opts);
  }

  async execStream(id: string, argv: readonly string[], opts?: ExecStreamOptions): Promise<ExecSession> {
    return (await this.of(id)).execStream(id, argv, opts);
  }

  async *logs(id: string, opts?: LogsOptions): AsyncGenerator<string> {
    yield* (await this.of(id)).logs(id, opts);
  }
}

/** TapRuntime is what {@link WorkloadNets} needs of `TapNet`. */
export interface TapRuntime {
  ensure(spec: { workload: string; address: string; hostSrc?: string }): Promise<unknown>;
  teardown(workload: string): Promise<boolean>;
}

/** WorkloadNets wires containers with veths and microVMs with TAPs; teardown removes whichever there is. */
export class WorkloadNets implements NetRuntime {
  constructor(
    private readonly veths: NetRuntime,
    private readonly taps: TapRuntime,
  ) {}

  ensure(spec: {
    workload: string;
    address: string;
    hostSrc?: string;
    kind?: RunSpec["kind"];
  }): Promise<unknown> {
    const { kind, ...rest } = spec;
    return kind === "microvm" ? this.taps.ensure(rest) : this.veths.ensure(rest);
  }

  async teardown(workload: string): Promise<boolean> {
    const tap = await this.taps.teardown(workload);
    const veth = await this.veths.teardown(workload);
    return tap || veth;
  }

  list(): Promise<string[]> {
    return this.veths.list();
  }
}
