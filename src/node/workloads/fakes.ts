/**
 * Test doubles of the workload seams (shipped like `FakeRunner`): an in-memory container
 * runtime, network, volumes, NAT and address book that record what was asked of them as
 * canonical lines in `calls`. Never used by the composition root.
 */
import { PassThrough } from "node:stream";
import { CapsuleError, ErrorCode } from "../../errors.js";
import {
  type ContainerInfo,
  type ContainerStatus,
  containerId,
  type ExecResult,
  type RunAction,
  type StopResult,
} from "../runtime/containers.js";
import type { ExecSession, ExecStreamOptions } from "../runtime/exec.js";
import type { AddressBook } from "./manager.js";
import type { HostPortForward, PortForwarder, VolumeAttacher } from "./ports.js";
import type { ContainerRuntime, NetRuntime, RunSpec } from "./reconciler.js";

interface FakeContainer {
  spec: RunSpec;
  state: "running" | "stopped";
  pid: number;
  exitCode: number | undefined;
  log: string;
}

/** FakeContainerRuntime keeps containers in memory; {@link FakeContainerRuntime.kill} simulates a death behind capsuled's back. */
export class FakeContainerRuntime implements ContainerRuntime {
  readonly calls: string[] = [];
  readonly containers = new Map<string, FakeContainer>();
  private nextPid = 100;

  /** kill ends container `id`'s process with `code`, as if it died on its own. */
  kill(id: string, code = 137): void {
    const c = this.containers.get(id);
    if (c) Object.assign(c, { state: "stopped", exitCode: code });
  }

  async run(spec: RunSpec): Promise<{ id: string; action: RunAction; pid: number | undefined }> {
    const id = containerId(spec.workload, spec.generation);
    this.calls.push(`run ${id}`);
    const c = this.containers.get(id);
    if (c) {
      if (c.state === "running") return { id, action: "running", pid: c.pid };
      Object.assign(c, { state: "running", pid: this.nextPid++, exitCode: undefined });
      return { id, action: "started", pid: c.pid };
    }
    const pid = this.nextPid++;
    this.containers.set(id, { spec, state: "running", pid, exitCode: undefined, log: "" });
    return { id, action: "created", pid };
  }

  async status(id: string): Promise<ContainerStatus> {
    const c = this.containers.get(id);
    if (!c) return { id, state: "absent" };
    if (c.state === "running") return { id, state: "running", pid: c.pid };
    return c.exitCode === undefined
      ? { id, state: "stopped" }
      : { id, state: "stopped", exitCode: c.exitCode };
  }

  async stop(id: string): Promise<StopResult> {
    this.calls.push(`stop ${id}`);
    const c = this.containers.get(id);
    if (!c) throw new CapsuleError(ErrorCode.NotFound, `container ${id} does not exist`);
    if (c.state !== "running") return { stopped: false, killed: false };
    Object.assign(c, { state: "stopped", exitCode: 143 });
    return { stopped: true, killed: false, exitCode: 143 };
  }

  async restart(id: string): Promise<StopResult> {
    this.calls.push(`restart ${id}`);
    const c = this.containers.get(id);
    if (!c) throw new CapsuleError(ErrorCode.NotFound, `container ${id} does not exist`);
    Object.assign(c, { state: "running", pid: this.nextPid++, exitCode: undefined });
    return { stopped: true, killed: false };
  }

  async remove(id: string): Promise<boolean> {
    this.calls.push(`remove ${id}`);
    return this.containers.delete(id);
  }

  async list(): Promise<ContainerInfo[]> {
    return [...this.containers.entries()]
      .sort(([a], [b]) => (a < b ? -1 : 1))
      .map(([id, c]) => ({
        id,
        workload: c.spec.workload,
        generation: c.spec.generation,
        image: c.spec.kind === "microvm" ? c.spec.kernel : c.spec.image,
        state: c.state,
        ...(c.state === "running" ? { pid: c.pid } : {}),
      }));
  }

  async exec(id: string, argv: readonly string[]): Promise<ExecResult> {
    this.calls.push(`exec ${id} ${argv.join(" ")}`);
    const c = this.containers.get(id);
    if (c?.state !== "running")
      throw new CapsuleError(ErrorCode.FailedPrecondition, `container ${id} is not running`);
    return { exitCode: 0, stdout: argv.join(" "), stderr: "" };
  }

  /**
   * execStream plays a process that prints its argv (and `size RxC` for a terminal with a
   * size), then echoes stdin and `resize RxC` lines until stdin closes; it exits with N when an
   * argument says `exit N`, else 0 (137 when killed). Without stdin it exits at once.
   */
  async execStream(id: string, argv: readonly string[], opts: ExecStreamOptions = {}): Promise<ExecSession> {
    this.calls.push(
      `execStream ${id}${opts.tty ? " tty" : ""}${opts.stdin ? " stdin" : ""} ${argv.join(" ")}`,
    );
    const c = this.containers.get(id);
    if (c?.state !== "running")
      throw new CapsuleError(ErrorCode.FailedPrecondition, `container ${id} is not running`);
    const code = Number(/exit (\d+)/.exec(argv.join(" "))?.[1] ?? 0);
    const out = new PassThrough();
    let done!: (code: number) => void;
    const exit = new Promise<number>((r) => (done = r));
    const end = (n: number) => {
      if (out.writableEnded) return;
      out.end();
      done(n);
    };
    out.write(`${argv.join(" ")}\n`);
    if (opts.tty && opts.size) out.write(`size ${opts.size.rows}x${opts.size.cols}\n`);
    if (!opts.stdin) end(code);
    return {
      execId: "exec-fake",
      pid: 4242,
      output: (async function* () {
        for await (const d of out) yield { stream: "stdout" as const, data: d as Buffer };
      })(),
      write: async (d) => {
        if (!out.writableEnded) out.write(d);
      },
      closeStdin: async () => end(code),
      resize: async (s) => {
        if (opts.tty && !out.writableEnded) out.write(`resize ${s.rows}x${s.cols}\n`);
      },
      kill: async () => end(137),
      exit,
    };
  }

  async *logs(id: string): AsyncGenerator<string> {
    const c = this.containers.get(id);
    if (!c) throw new CapsuleError(ErrorCode.NotFound, `container ${id} does not exist`);
    if (c.log) yield c.log;
  }
}

/** FakeNetRuntime records namespaces as a set; `kinds` is the kind each workload was last wired as. */
export class FakeNetRuntime implements NetRuntime {
  readonly calls: string[] = [];
  readonly namespaces = new Map<string, string>();
  /** kinds is the `kind` of each workload's last ensure ("container" when unset). */
  readonly kinds = new Map<string, RunSpec["kind"]>();

  async ensure(spec: {
    workload: string;
    address: string;
    hostSrc?: string;
    kind?: RunSpec["kind"];
  }): Promise<boolean> {
    const changed = this.namespaces.get(spec.workload) !== spec.address;
    if (changed) this.calls.push(`ensure ${spec.workload} ${spec.address} src ${spec.hostSrc ?? "-"}`);
    this.namespaces.set(spec.workload, spec.address);
    this.kinds.set(spec.workload, spec.kind ?? "container");
    return changed;
  }

  async teardown(workload: string): Promise<boolean> {
    this.calls.push(`teardown ${workload}`);
    this.kinds.delete(workload);
    return this.namespaces.delete(workload);
  }

  async list(): Promise<string[]> {
    return [...this.namespaces.keys()].sort();
  }
}

/** FakeVolumes holds volumes by name; `holder` says which workload has each attached. */
export class FakeVolumes implements VolumeAttacher {
  readonly calls: string[] = [];
  readonly holder = new Map<string, string | undefined>();

  constructor(names: string[] = []) {
    for (const n of names) this.holder.set(n, undefined);
  }

  check(name: string, workload: string): void {
    if (!this.holder.has(name)) throw new CapsuleError(ErrorCode.NotFound, `volume ${name} does not exist`);
    const h = this.holder.get(name);
    if (h && h !== workload) {
      throw new CapsuleError(ErrorCode.FailedPrecondition, `volume ${name} is used by workload ${h}`);
    }
  }

  async attachDevice(name: string, workload: string): Promise<string> {
    this.check(name, workload);
    this.calls.push(`attachDevice ${name} ${workload}`);
    this.holder.set(name, workload);
    return `/dev/vol/${name}`;
  }

  async attach(name: string, workload: string): Promise<string> {
    this.check(name, workload);
    this.calls.push(`attach ${name} ${workload}`);
    this.holder.set(name, workload);
    return `/vol/${name}`;
  }

  async detach(name: string, workload: string): Promise<void> {
    this.calls.push(`detach ${name} ${workload}`);
    if (this.holder.get(name) === workload) this.holder.set(name, undefined);
  }
}

/** FakePortForwarder remembers the last set and answers portInUse from `busy` ("18080/tcp"). */
export class FakePortForwarder implements PortForwarder {
  readonly sets: { addresses: string[]; forwards: HostPortForward[] }[] = [];
  readonly busy = new Set<string>();

  async set(workloadAddresses: string[], forwards: HostPortForward[]): Promise<void> {
    this.sets.push({ addresses: [...workloadAddresses], forwards: [...forwards] });
  }

  async portInUse(protocol: "tcp" | "udp", port: number): Promise<boolean> {
    return this.busy.has(`${port}/${protocol}`);
  }
}

/** FakeAddressBook hands out 100.64.7.2, .3, ... and records reserve/release calls. */
export class FakeAddressBook implements AddressBook {
  readonly calls: string[] = [];
  readonly entries = new Map<string, { address: string; labels: Record<string, string> }>();
  private next = 2;

  async reserve(
    name: string,
    labels: Record<string, string>,
    address?: string,
  ): Promise<{ address: string }> {
    this.calls.push(`reserve ${name} ${JSON.stringify(labels)}${address ? ` ${address}` : ""}`);
    const have = this.entries.get(name);
    const e = { address: have?.address ?? address ?? `100.64.7.${this.next++}`, labels };
    this.entries.set(name, e);
    return { address: e.address };
  }

  async release(name: string): Promise<boolean> {
    this.calls.push(`release ${name}`);
    return this.entries.delete(name);
  }
}
