/**
 * Reconciler: drives each workload's actual state (its container, network namespace, volumes)
 * towards the desired state in the `workloads` table.
 *
 * Decisions are made by {@link plan} (pure: desired row + what containerd reports + what this
 * process remembers → actions, phase), and carried out here. Each workload has a mutex (the
 * manager's stop/restart/delete take it too), and workloads are reconciled by a bounded pool of
 * workers, so one slow workload (a 10 s SIGTERM grace, a hung ctr) never holds up the others.
 * A pass over every workload runs periodically and on demand ({@link Reconciler.kick}).
 *
 * Restart safety: nothing about a container is kept in memory that containerd does not also
 * know. A restarted capsuled lists the containers (by label) and adopts the running one of the
 * current generation (`Containers.run` is a no-op on a running container), so it never makes a
 * duplicate; a container that stopped meanwhile is treated as an exit. Only the backoff state
 * lives in memory: a restart begins it again at 1 s.
 */
import type { Logger } from "pino";
import type { Clock } from "../host/clock.js";
import {
  type ContainerInfo,
  type ContainerSpec,
  type ContainerStatus,
  containerId,
  type ExecOptions,
  type ExecResult,
  type LogsOptions,
  type RemoveOptions,
  type RunAction,
  type StopOptions,
  type StopResult,
} from "../runtime/containers.js";
import type { ExecSession, ExecStreamOptions } from "../runtime/exec.js";
import { KeyedLock } from "../runtime/keyed-lock.js";
import { workloadNetNames } from "../runtime/netns.js";
import type { MicroVmSpec } from "../runtime/vms.js";
import type { PortForwarder, VolumeAttacher } from "./ports.js";
import type { Desired, WorkloadRepo, WorkloadRow } from "./repo.js";

/** RunSpec is what a workload's current generation runs: a container or a microVM. */
export type RunSpec = ({ kind: "container" } & ContainerSpec) | ({ kind: "microvm" } & MicroVmSpec);

/**
 * ContainerRuntime is what workloads need of the runtime that runs them (implemented by
 * `WorkloadRuntimes`, which hands containers to `Containers` and microVMs to `MicroVms`).
 */
export interface ContainerRuntime {
  run(spec: RunSpec): Promise<{ id: string; action: RunAction; pid: number | undefined }>;
  status(id: string): Promise<ContainerStatus>;
  stop(id: string, opts?: StopOptions): Promise<StopResult>;
  restart(id: string, opts?: StopOptions): Promise<StopResult>;
  remove(id: string, opts?: RemoveOptions): Promise<boolean>;
  list(): Promise<ContainerInfo[]>;
  exec(id: string, argv: readonly string[], opts?: ExecOptions): Promise<ExecResult>;
  execStream(id: string, argv: readonly string[], opts?: ExecStreamOptions): Promise<ExecSession>;
  logs(id: string, opts?: LogsOptions): AsyncGenerator<string>;
}

/** NetRuntime is what workloads need of the per-workload network plumbing (implemented by `WorkloadNet`). */
export interface NetRuntime {
  /** ensure wires the workload: a veth and namespace for a container, a TAP for a microVM (`kind` unset = container). */
  ensure(spec: {
    workload: string;
    address: string;
    hostSrc?: string;
    kind?: RunSpec["kind"];
  }): Promise<unknown>;
  teardown(workload: string): Promise<boolean>;
  list(): Promise<string[]>;
}

/** Phase is what a workload is doing, as `workload get` shows it. */
export type Phase = "pending" | "running" | "stopped" | "failed" | "backoff";

/** BACKOFF_MIN_MS and BACKOFF_MAX_MS bound the delay before restarting an exited container (doubling in between). */
export const BACKOFF_MIN_MS = 1_000;
export const BACKOFF_MAX_MS = 60_000;
/** STABLE_MS: a container that has run this long is healthy again; its backoff starts over. */
export const STABLE_MS = 60_000;
/** STOP_GRACE_MS is the SIGTERM → SIGKILL grace of a stop (short: RPCs wait for it). */
export const STOP_GRACE_MS = 5_000;

/** Memory is what the reconciler remembers of one workload between passes (lost on restart, by design). */
export interface Memory {
  /** handled: the current container's stop was seen and acted on (event written, backoff set). */
  handled: boolean;
  /** restartPending: a restart is due at `nextAttemptAt`. */
  restartPending: boolean;
  failures: number;
  nextAttemptAt: number;
  startedAt: number;
  /** startRequested: the operator asked for a start; a stopped container starts at once, no exit recorded. */
  startRequested: boolean;
  phase: Phase;
  message: string;
}

/** freshMemory is the memory of a workload not seen yet. */
export function freshMemory(): Memory {
  return {
    handled: false,
    restartPending: false,
    failures: 0,
    nextAttemptAt: 0,
    startedAt: 0,
    startRequested: false,
    phase: "pending",
    message: "",
  };
}

/** DesiredView is the part of a workload row {@link plan} needs. */
export interface DesiredView {
  name: string;
  generation: number;
  desired: Desired;
  restartPolicy: "Always" | "OnFailure" | "Never";
}

/** ActualContainer is one container of the workload as containerd reports it (`exitCode` when stopped and known). */
export interface ActualContainer {
  id: string;
  generation: number;
  state: "running" | "stopped";
  exitCode?: number;
}

/** Action is one step of a plan, carried out in order. */
export type Action =
  | { type: "remove"; id: string }
  | { type: "teardownNet" }
  | { type: "ensureNet" }
  | { type: "run"; reason: "create" | "start" | "restart" }
  | { type: "stop"; id: string }
  | { type: "event"; event: string; message: string };

/** Plan is what {@link plan} decided: the actions, and the memory and phase once they succeed. */
export interface Plan {
  actions: Action[];
  memory: Memory;
}

/** backoffMs is the delay before restart number `failures` (1-based): 1 s, 2 s, 4 s ... 60 s (pure). */
export function backoffMs(failures: number): number {
  return Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** Math.max(0, Math.min(failures - 1, 16)));
}

/**
 * plan decides one workload's next steps (pure). `desired` undefined = the workload is gone:
 * its containers and namespace are removed. Containers of other generations are removed.
 * Desired running: the namespace is ensured, a missing container created, a stopped one
 * started when the operator asked, else treated as an exit: recorded once, then restarted
 * after {@link backoffMs} per the restart policy. Desired stopped: a running container is
 * stopped (namespace and address kept).
 */
export function plan(
  desired: DesiredView | undefined,
  containers: readonly ActualContainer[],
  memory: Memory,
  now: number,
): Plan {
  const actions: Action[] = [];
  const m: Memory = { ...memory };
  if (!desired) {
    for (const c of containers) actions.push({ type: "remove", id: c.id });
    actions.push({ type: "teardownNet" });
    return { actions, memory: { ...freshMemory(), phase: "stopped" } };
  }
  const cur = containers.find((c) => c.generation === desired.generation);
  for (const c of containers) if (c !== cur) actions.push({ type: "remove", id: c.id });

  if (desired.desired === "stopped") {
    if (cur?.state === "running") {
      actions.push({ type: "stop", id: cur.id });
      actions.push({ type: "event", event: "stopped", message: `container ${cur.id} stopped` });
    }
    return { actions, memory: { ...freshMemory(), phase: "stopped" } };
  }

  actions.push({ type: "ensureNet" });
  const started = (reason: "create" | "start" | "restart"): Plan => {
    actions.push({ type: "run", reason });
    return {
      actions,
      memory: {
        ...m,
        handled: false,
        restartPending: false,
        startRequested: false,
        startedAt: now,
        phase: "running",
        message: "",
      },
    };
  };
  if (!cur) return started("create");
  if (cur.state === "running") {
    if (m.failures > 0 && now - m.startedAt >= STABLE_MS) m.failures = 0;
    return { actions, memory: { ...m, startRequested: false, phase: "running", message: "" } };
  }
  // Stopped.
  if (m.startRequested) return started("start");
  if (!m.handled) {
    const code = cur.exitCode;
    const text = `exited with code ${code ?? "unknown"}`;
    actions.push({ type: "event", event: "exited", message: `container ${cur.id} ${text}` });
    const restart =
      desired.restartPolicy === "Always" || (desired.restartPolicy === "OnFailure" && code !== 0);
    if (!restart) {
      const ok = code === 0;
      return {
        actions,
        memory: {
          ...m,
          handled: true,
          restartPending: false,
          phase: ok ? "stopped" : "failed",
          message: `${text} (restartPolicy ${desired.restartPolicy})`,
        },
      };
    }
    const failures = m.failures + 1;
    const delay = backoffMs(failures);
    return {
      actions,
      memory: {
        ...m,
        handled: true,
        restartPending: true,
        failures,
        nextAttemptAt: now + delay,
        phase: "backoff",
        message: `${text}; restarting in ${Math.round(delay / 1000)}s`,
      },
    };
  }
  if (m.restartPending && now >= m.nextAttemptAt) return started("restart");
  return { actions, memory: m };
}

/** ReconcilerOptions: all required except `volumes`, `ports` (unset = the feature is unavailable), `concurrency` (unset = 4), `periodMs` (unset = 2000). */
export interface ReconcilerOptions {
  repo: WorkloadRepo;
  containers: ContainerRuntime;
  net: NetRuntime;
  volumes?: VolumeAttacher | undefined;
  ports?: PortForwarder | undefined;
  /** hostSrc is the capsule's fabric address (the source it uses towards its workloads). */
  hostSrc: () => string;
  clock: Clock;
  log: Logger;
  concurrency?: number;
  periodMs?: number;
}

/**
 * Reconciler runs {@link plan} for every workload: periodically, and at once for a workload
 * that changed ({@link kick}). See the module comment.
 */
export class Reconciler {
  private readonly o: ReconcilerOptions;
  private readonly concurrency: number;
  private readonly memory = new Map<string, Memory>();
  private readonly locks = new KeyedLock();
  private readonly queue: string[] = [];
  private readonly queued = new Set<string>();
  private readonly busy = new Set<string>();
  private readonly again = new Set<string>();
  private readonly idleWaiters: (() => void)[] = [];
  private timer: NodeJS.Timeout | undefined;
  private passing = false;
  private portsKey: string | undefined;
  private stopped = false;

  constructor(o: ReconcilerOptions) {
    this.o = o;
    this.concurrency = o.concurrency ?? 4;
  }

  /** start runs a first pass now and then one every period. Idempotent. */
  start(): void {
    if (this.timer) return;
    this.stopped = false;
    void this.pass();
    this.timer = setInterval(() => void this.pass(), this.o.periodMs ?? 2_000);
    this.timer.unref();
  }

  /** stop ends the periodic passes; running work finishes, queued work is dropped. Containers keep running. */
  stop(): void {
    this.stopped = true;
    if (this.timer) clearInterval(this.timer);
    this.timer = undefined;
    this.queue.length = 0;
    this.queued.clear();
  }

  /**
   * pass queues every workload (rows, plus orphans: containers or namespaces with no row) and
   * re-applies the NAT table when it changed. Overlapping passes are skipped.
   */
  async pass(): Promise<void> {
    if (this.passing || this.stopped) return;
    this.passing = true;
    try {
      const names = new Set(this.o.repo.list().map((r) => r.name));
      try {
        for (const c of await this.o.containers.list()) names.add(c.workload);
        for (const n of await this.o.net.list()) names.add(n);
      } catch (e) {
        this.o.log.warn({ err: (e as Error).message }, "listing containers failed");
      }
      for (const n of names) this.kick(n);
      await this.syncPorts();
    } finally {
      this.passing = false;
    }
  }

  /** kick queues workload `name` for reconciling now (once, however often it is kicked while waiting). */
  kick(name: string): void {
    if (this.stopped) return;
    if (this.busy.has(name)) {
      this.again.add(name);
      return;
    }
    if (this.queued.has(name)) return;
    this.queued.add(name);
    this.queue.push(name);
    this.pump();
  }

  /** idle resolves when nothing is queued or running (tests). */
  idle(): Promise<void> {
    if (this.queue.length === 0 && this.busy.size === 0) return Promise.resolve();
    return new Promise((r) => this.idleWaiters.push(r));
  }

  private pump(): void {
    while (this.busy.size < this.concurrency) {
      const i = this.queue.findIndex((n) => !this.busy.has(n));
      if (i < 0) break;
      const [name] = this.queue.splice(i, 1) as [string];
      this.queued.delete(name);
      this.busy.add(name);
      void this.reconcile(name)
        // Errors are recorded inside; one escaping here (the store closed under a late
        // reconcile at shutdown) must not become an unhandled rejection.
        .catch(() => undefined)
        .finally(() => {
          this.busy.delete(name);
          if (this.again.delete(name)) this.kick(name);
          this.pump();
          if (this.queue.length === 0 && this.busy.size === 0) {
            for (const w of this.idleWaiters.splice(0)) w();
          }
        });
    }
  }

  /** withLock runs `fn` while holding workload `name`'s mutex (the reconciler's own steps take it too). */
  withLock<T>(name: string, fn: () => Promise<T>): Promise<T> {
    return this.locks.run(name, fn);
  }

  /** status is what the reconciler last concluded about workload `name`. */
  status(name: string): { phase: Phase; message: string } {
    const m = this.memory.get(name);
    return m ? { phase: m.phase, message: m.message } : { phase: "pending", message: "" };
  }

  /** requestStart makes the next reconcile start a stopped container at once (operator start): no exit, no backoff. */
  requestStart(name: string): void {
    this.memory.set(name, { ...freshMemory(), startRequested: true });
  }

  /** forget drops what is remembered of workload `name` (deleted). */
  forget(name: string): void {
    this.memory.delete(name);
  }

  /** reconcile brings workload `name` to its desired state now, under its mutex. Errors are recorded, not thrown. */
  reconcile(name: string): Promise<void> {
    return this.withLock(name, () => this.reconcileLocked(name));
  }

  private async event(name: string, type: string, message: string): Promise<void> {
    this.o.repo.addEvent(name, { time: new Date(this.o.clock.now()).toISOString(), type, message });
    this.o.log.info({ workload: name, event: type }, message);
  }

  private async reconcileLocked(name: string): Promise<void> {
    const row = this.o.repo.get(name);
    const mem = this.memory.get(name) ?? freshMemory();
    try {
      const all = (await this.o.containers.list()).filter((c) => c.workload === name);
      const actual: ActualContainer[] = [];
      for (const c of all) {
        const a: ActualContainer = { id: c.id, generation: c.generation, state: c.state };
        if (row && c.generation === row.generation && c.state === "stopped" && !mem.handled) {
          const st = await this.o.containers.status(c.id);
          if (st.exitCode !== undefined) a.exitCode = st.exitCode;
        }
        actual.push(a);
      }
      const view: DesiredView | undefined = row && {
        name,
        generation: row.generation,
        desired: row.desired,
        restartPolicy: row.spec.restartPolicy,
      };
      const p = plan(view, actual, mem, this.o.clock.now());
      for (const a of p.actions) await this.execute(a, name, row);
      if (row) {
        const exit = actual.find((c) => c.generation === row.generation)?.exitCode;
        if (exit !== undefined && !mem.handled) this.o.repo.recordExit(name, exit);
        this.memory.set(name, p.memory);
      } else {
        this.memory.delete(name);
      }
    } catch (e) {
      const msg = (e as Error).message;
      this.o.log.warn({ workload: name, err: msg }, "reconcile failed");
      if (row) {
        if (mem.message !== msg) await this.event(name, "failed", msg);
        this.memory.set(name, { ...mem, phase: "failed", message: msg });
      }
    }
  }

  private async execute(a: Action, name: string, row: WorkloadRow | undefined): Promise<void> {
    switch (a.type) {
      case "remove":
        await this.o.containers.remove(a.id, { timeoutMs: STOP_GRACE_MS });
        return;
      case "teardownNet":
        workloadNetNames(name);
        await this.o.net.teardown(name);
        return;
      case "ensureNet":
        if (!row) return;
        await this.o.net.ensure({
          workload: name,
          address: row.address,
          hostSrc: this.o.hostSrc(),
          kind: row.spec.microvm ? "microvm" : "container",
        });
        return;
      case "stop":
        await this.o.containers.stop(a.id, { timeoutMs: STOP_GRACE_MS });
        return;
      case "event":
        await this.event(name, a.event, a.message);
        return;
      case "run": {
        if (!row) return;
        const r = await this.o.containers.run(await this.spec(row));
        if (a.reason === "restart") {
          this.o.repo.countRestart(name);
          await this.event(name, "restarted", `container ${r.id} restarted (pid ${r.pid ?? "?"})`);
        } else if (r.action !== "running") {
          await this.event(name, r.action, `container ${r.id} ${r.action} (pid ${r.pid ?? "?"})`);
        }
        return;
      }
    }
  }

  /** spec is what a workload row's current generation runs; attaches its volumes (idempotent). */
  async spec(row: WorkloadRow): Promise<RunSpec> {
    const vm = row.spec.microvm;
    const c = row.spec.container;
    if (!this.o.volumes && row.spec.volumes.length)
      throw new Error(`${row.name}: volumes are not available on this capsule`);
    if (vm) {
      if (!vm.kernel) throw new Error(`${row.name}: microvm.kernel is not set`);
      const volumes = [];
      for (const v of row.spec.volumes)
        volumes.push({
          name: v.name,
          path: await this.o.volumes!.attachDevice(v.name, row.name),
          mountPath: v.mountPath,
        });
      return {
        kind: "microvm",
        workload: row.name,
        generation: row.generation,
        kernel: vm.kernel,
        ...(vm.initrd ? { initrd: vm.initrd } : {}),
        ...(vm.cmdline ? { cmdline: vm.cmdline } : {}),
        cpus: vm.cpus ?? 1,
        memoryMib: vm.memoryMib ?? 256,
        address: row.address,
        volumes,
      };
    }
    if (!c) throw new Error(`${row.name}: neither container nor microvm`);
    const mounts = [];
    for (const v of row.spec.volumes)
      mounts.push({ source: await this.o.volumes!.attach(v.name, row.name), target: v.mountPath });
    return {
      kind: "container",
      workload: row.name,
      generation: row.generation,
      image: c.image,
      ...(c.command?.length ? { command: c.command } : {}),
      ...(c.env && Object.keys(c.env).length ? { env: c.env } : {}),
      netns: workloadNetNames(row.name).netnsPath,
      ...(mounts.length ? { mounts } : {}),
    };
  }

  /** currentId is the container id of a workload row's current generation. */
  static currentId(row: WorkloadRow): string {
    return containerId(row.name, row.generation);
  }

  /**
   * syncPorts makes the NAT table match every workload address and host port (one
   * PortForwarder.set), when that changed since the last successful set (or `force`). Errors
   * are logged and retried on the next pass.
   */
  async syncPorts(force = false): Promise<void> {
    if (!this.o.ports) return;
    const rows = this.o.repo.list();
    const addr = new Map(rows.map((r) => [r.name, r.address]));
    const addresses = rows.map((r) => r.address).sort();
    const forwards = this.o.repo.hostPorts().map((p) => ({
      protocol: p.protocol,
      hostPort: p.hostPort,
      address: addr.get(p.workload) ?? "",
      port: p.port,
      workload: p.workload,
    }));
    const key = JSON.stringify([addresses, forwards]);
    if (!force && key === this.portsKey) return;
    try {
      await this.o.ports.set(addresses, forwards);
      this.portsKey = key;
    } catch (e) {
      this.portsKey = undefined;
      this.o.log.error({ err: (e as Error).message }, "NAT table update failed");
    }
  }
}
