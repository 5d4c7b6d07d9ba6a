/**
 * Workloads: the operator's view of workloads. {@link Workloads.apply} validates every manifest
 * before any change and then writes the desired state; the {@link Reconciler} makes it so.
 * Lifecycle calls (start, stop, restart, delete) change the desired state and run the
 * reconciler's steps under the workload's mutex, so they never race a reconcile.
 */
import { createHash } from "node:crypto";
import { constants } from "node:fs";
import { access } from "node:fs/promises";
import { canonicalJson } from "../../api/canonical.js";
import { validateManifest, type WorkloadManifest } from "../../api/manifest.js";
import { CapsuleError, ErrorCode, invalidArgument } from "../../errors.js";
import type { Clock } from "../host/clock.js";
import type { ExecResult } from "../runtime/containers.js";
import type { ExecSession, ExecStreamOptions } from "../runtime/exec.js";
import { isGuestMountPath, MAX_VOLUME_NAME, setsCapsuleKey } from "../runtime/qemu-plan.js";
import type { PortForwarder, VolumeAttacher } from "./ports.js";
import {
  type ContainerRuntime,
  type NetRuntime,
  type Phase,
  Reconciler,
  STOP_GRACE_MS,
} from "./reconciler.js";
import {
  type HostPortRow,
  hostPortsOf,
  type WorkloadEvent,
  type WorkloadRepo,
  type WorkloadRow,
} from "./repo.js";

/** ImageLookup is what apply needs of the image store (implemented by `Images`). */
export interface ImageLookup {
  has(ref: string): Promise<boolean>;
}

/** AddressBook allocates workload fabric addresses and announces them to peers (implemented by `Fabric`). */
export interface AddressBook {
  reserve(name: string, labels: Record<string, string>, address?: string): Promise<{ address: string }>;
  release(name: string): Promise<boolean>;
}

/** ApplyAction is what apply did (or would do) to one document. */
export type ApplyAction = "created" | "configured" | "unchanged";

/** ApplyResult is one document's outcome. */
export interface ApplyResult {
  kind: string;
  name: string;
  action: ApplyAction;
}

/** WorkloadView is one workload as `workload get` shows it: desired state plus observed phase. */
export interface WorkloadView {
  name: string;
  labels: Record<string, string>;
  kind: "container" | "microvm";
  image: string;
  desired: string;
  phase: Phase;
  message: string;
  address: string;
  ports: { port: number; hostPort: number; protocol: string }[];
  restarts: number;
  events: WorkloadEvent[];
  createdAt: string;
  generation: string;
  specJson: string;
  volumes: string[];
  pid: number;
}

/** WorkloadsOptions: all required except `volumes` and `ports` (unset = manifests using volumes or host ports are refused). */
export interface WorkloadsOptions {
  repo: WorkloadRepo;
  images: ImageLookup;
  addresses: AddressBook;
  containers: ContainerRuntime;
  net: NetRuntime;
  reconciler: Reconciler;
  volumes?: VolumeAttacher | undefined;
  ports?: PortForwarder | undefined;
  /** vmAccel resolves to the accelerator microVMs run with ("kvm", "tcg", "none"); unset = microVMs are refused. */
  vmAccel?: () => Promise<string>;
  clock: Clock;
}

const sha = (s: string) => createHash("sha256").update(s).digest("hex");

/** specHash is the hash of a whole validated manifest: equal = unchanged (pure). */
export function specHash(m: WorkloadManifest): string {
  return sha(canonicalJson(m));
}

/**
 * runtimeHash is the hash of what the container is made from (image, command, env, volumes,
 * restart policy aside): a change needs a new container, i.e. a new generation. Labels and
 * ports change without one (pure).
 */
export function runtimeHash(m: WorkloadManifest): string {
  return sha(canonicalJson({ container: m.container, microvm: m.microvm, volumes: m.volumes }));
}

const portKey = (p: { protocol: string; hostPort: number }) => `${p.hostPort}/${p.protocol}`;

/** Workloads is the manager behind the Workloads API (see the module comment). */
export class Workloads {
  private readonly o: WorkloadsOptions;

  constructor(o: WorkloadsOptions) {
    this.o = o;
  }

  private now(): string {
    return new Date(this.o.clock.now()).toISOString();
  }

  private row(name: string): WorkloadRow {
    const r = this.o.repo.get(name);
    if (!r) {
      throw new CapsuleError(ErrorCode.NotFound, `workload ${name} does not exist`, {
        hint: "see capsulectl workload list",
      });
    }
    return r;
  }

  /**
   * apply validates every document (schema, duplicate names, the image in the store, host
   * ports free, volumes attachable) and only then writes: new workloads are created (with a
   * fabric address), changed ones configured (a new generation when the container changes; the
   * address is kept), identical ones left unchanged. Idempotent. With `dryRun` nothing changes.
   * One bad document rejects the whole request.
   */
  async apply(manifestsJson: readonly string[], opts: { dryRun?: boolean } = {}): Promise<ApplyResult[]> {
    const docs: WorkloadManifest[] = [];
    manifestsJson.forEach((text, i) => {
      let doc: unknown;
      try {
        doc = JSON.parse(text);
      } catch (e) {
        throw invalidArgument(`document ${i + 1}`, `is not JSON: ${(e as Error).message}`);
      }
      docs.push(validateManifest(doc, undefined, "Workload"));
    });
    if (docs.length === 0) throw invalidArgument("manifests", "none given");
    const names = new Set<string>();
    for (const m of docs) {
      if (names.has(m.name)) throw invalidArgument(m.name, `Workload ${m.name} appears twice`);
      names.add(m.name);
    }
    // One image store lookup per image, not per document (each is a `ctr images ls`).
    const images = new Map<string, Promise<boolean>>();
    const hasImage = (ref: string) => {
      let p = images.get(ref);
      if (!p) images.set(ref, (p = this.o.images.has(ref)));
      return p;
    };
    for (const m of docs) await this.check(m, hasImage);
    await this.checkHostPorts(docs);

    const plan = docs.map((m) => {
      const have = this.o.repo.get(m.name);
      const hash = specHash(m);
      const action: ApplyAction = !have ? "created" : have.specHash === hash ? "unchanged" : "configured";
      return { m, have, hash, action };
    });
    const results = plan.map((p) => ({ kind: "Workload", name: p.m.name, action: p.action }));
    if (opts.dryRun) return results;

    // Addresses first (Fabric.reserve persists and announces, idempotently); the workload rows
    // then go in one transaction. A crash in between leaves a reservation the next apply of
    // that name reuses.
    const reserved: string[] = [];
    const addresses = new Map<string, string>();
    try {
      for (const p of plan) {
        if (p.action === "unchanged") continue;
        const labelsChanged = !p.have || canonicalJson(p.have.spec.labels) !== canonicalJson(p.m.labels);
        if (!p.have) {
          addresses.set(p.m.name, (await this.o.addresses.reserve(p.m.name, p.m.labels)).address);
          reserved.push(p.m.name);
        } else if (labelsChanged) {
          await this.o.addresses.reserve(p.m.name, p.m.labels, p.have.address);
        }
      }
    } catch (e) {
      for (const n of reserved) await this.o.addresses.release(n).catch(() => undefined);
      throw e;
    }
    const now = this.now();
    this.o.repo.store.tx(() => {
      for (const p of plan) {
        if (p.action === "unchanged") continue;
        if (!p.have) {
          this.o.repo.put({
            name: p.m.name,
            spec: p.m,
            specHash: p.hash,
            generation: 1,
            desired: "running",
            address: addresses.get(p.m.name) ?? "",
            restarts: 0,
            lastExit: undefined,
            events: [{ time: now, type: "created", message: `workload created (generation 1)` }],
            createdAt: now,
            updatedAt: now,
          });
          continue;
        }
        const recreate = runtimeHash(p.have.spec) !== runtimeHash(p.m);
        const generation = p.have.generation + (recreate ? 1 : 0);
        this.o.repo.put({
          ...p.have,
          spec: p.m,
          specHash: p.hash,
          generation,
          events: [
            ...p.have.events,
            {
              time: now,
              type: "configured",
              message: recreate ? `spec changed: generation ${generation}` : "spec changed (labels or ports)",
            },
          ],
          updatedAt: now,
        });
      }
    });
    for (const p of plan) if (p.action !== "unchanged") this.o.reconciler.kick(p.m.name);
    await this.o.reconciler.syncPorts();
    return results;
  }

  private async check(m: WorkloadManifest, hasImage: (ref: string) => Promise<boolean>): Promise<void> {
    if (m.microvm) {
      await this.checkMicroVm(m);
    } else if (m.container && !(await hasImage(m.container.image))) {
      throw new CapsuleError(
        ErrorCode.NotFound,
        `${m.name}: image ${m.container.image} is not in this capsule's image store`,
        {
          hint: `push it first: capsulectl image push ARCHIVE.tar (see capsulectl image list)`,
          details: { image: m.container.image },
        },
      );
    }
    if (m.volumes.length && !this.o.volumes) {
      throw new CapsuleError(
        ErrorCode.FailedPrecondition,
        `${m.name}: volumes are not available on this capsule`,
      );
    }
    for (const v of m.volumes) this.o.volumes?.check(v.name, m.name);
  }

  /** checkMicroVm refuses a microVM this capsule cannot run: no accelerator, no kernel file, an image (not supported yet), a volume name longer than a virtio serial. */
  private async checkMicroVm(m: WorkloadManifest): Promise<void> {
    const vm = m.microvm!;
    const accel = this.o.vmAccel ? await this.o.vmAccel() : "none";
    if (accel === "none")
      throw new CapsuleError(ErrorCode.FailedPrecondition, `${m.name}: microVMs cannot run on this capsule`, {
        hint: "capsulectl capsule info -o wide shows VM-ACCEL; install qemu-system-x86 and restart capsuled",
      });
    if (vm.image !== undefined)
      throw invalidArgument(
        `${m.name}: microvm.image`,
        "is not supported yet",
        "give microvm.kernel (and microvm.initrd): absolute paths on the capsule",
      );
    if (!vm.kernel)
      throw invalidArgument(
        `${m.name}: microvm.kernel`,
        "is required",
        "the absolute path of the guest kernel on the capsule",
      );
    for (const [field, path] of [
      ["kernel", vm.kernel],
      ["initrd", vm.initrd],
    ] as const) {
      if (path === undefined) continue;
      if (!path.startsWith("/"))
        throw invalidArgument(`${m.name}: microvm.${field}`, `"${path}" is not an absolute path`);
      try {
        await access(path, constants.R_OK);
      } catch {
        throw invalidArgument(
          `${m.name}: microvm.${field}`,
          `${path} is not a readable file on this capsule`,
          "copy the file to the capsule first",
        );
      }
    }
    if (vm.cmdline !== undefined && setsCapsuleKey(vm.cmdline))
      throw invalidArgument(
        `${m.name}: microvm.cmdline`,
        "sets a capsule.* key",
        "capsule.* keys come from capsuled",
      );
    for (const v of m.volumes) {
      if (v.name.length > MAX_VOLUME_NAME)
        throw invalidArgument(
          `${m.name}: volumes`,
          `volume name ${v.name} is longer than ${MAX_VOLUME_NAME} characters`,
          "a microVM finds its volumes by virtio serial, which has 20 bytes; use a shorter volume name",
        );
      if (!isGuestMountPath(v.mountPath))
        throw invalidArgument(
          `${m.name}: volumes`,
          `mountPath ${v.mountPath} has characters a guest command line cannot carry`,
          "use letters, digits and / . _ -",
        );
    }
  }

  private async checkHostPorts(docs: readonly WorkloadManifest[]): Promise<void> {
    const inBatch = new Set(docs.map((d) => d.name));
    const claims = new Map<string, string>();
    // Ports held by workloads this apply does not touch stay theirs.
    const held = new Map<string, HostPortRow>();
    for (const p of this.o.repo.hostPorts()) held.set(portKey(p), p);
    for (const [k, p] of held) if (!inBatch.has(p.workload)) claims.set(k, p.workload);
    for (const m of docs) {
      const mine = hostPortsOf(m);
      if (mine.length && !this.o.ports) {
        throw new CapsuleError(
          ErrorCode.FailedPrecondition,
          `${m.name}: host ports are not available on this capsule`,
        );
      }
      for (const p of mine) {
        const k = portKey(p);
        const other = claims.get(k);
        if (other !== undefined && other !== m.name) {
          throw new CapsuleError(
            ErrorCode.AlreadyExists,
            `${m.name}: host port ${k} is already used by workload ${other}`,
            { hint: "pick another hostPort", details: { hostPort: p.hostPort, protocol: p.protocol } },
          );
        }
        claims.set(k, m.name);
        if (held.get(k)?.workload === m.name) continue;
        if (await this.o.ports?.portInUse(p.protocol, p.hostPort)) {
          throw new CapsuleError(
            ErrorCode.FailedPrecondition,
            `${m.name}: host port ${k} is in use on this capsule`,
            {
              hint: "pick another hostPort, or stop what listens there",
              details: { hostPort: p.hostPort, protocol: p.protocol },
            },
          );
        }
      }
    }
  }

  /** list returns every workload with its observed phase, by name. */
  async list(): Promise<WorkloadView[]> {
    const running = await this.runningPids();
    return this.o.repo.list().map((r) => this.view(r, running));
  }

  /** get returns workload `name`; CAPSULE_NOT_FOUND when there is none. */
  async get(name: string): Promise<WorkloadView> {
    const r = this.row(name);
    return this.view(r, await this.runningPids());
  }

  private async runningPids(): Promise<Map<string, number>> {
    const out = new Map<string, number>();
    try {
      for (const c of await this.o.containers.list()) if (c.state === "running") out.set(c.id, c.pid ?? 0);
    } catch {
      // containerd not answering: phases fall back to what the reconciler last saw.
    }
    return out;
  }

  private view(r: WorkloadRow, running: Map<string, number>): WorkloadView {
    const id = Reconciler.currentId(r);
    const pid = running.get(id);
    const st = this.o.reconciler.status(r.name);
    let phase: Phase = st.phase;
    let message = st.message;
    if (pid !== undefined) {
      phase = "running";
      message = "";
    } else if (r.desired === "stopped") {
      phase = "stopped";
    } else if (phase === "running") {
      phase = "pending";
    }
    const c = r.spec.container;
    return {
      name: r.name,
      labels: r.spec.labels,
      kind: c ? "container" : "microvm",
      image: c?.image ?? r.spec.microvm?.kernel ?? "",
      desired: r.desired,
      phase,
      message,
      address: r.address,
      ports: r.spec.ports.map((p) => ({ port: p.port, hostPort: p.hostPort ?? 0, protocol: p.protocol })),
      restarts: r.restarts,
      events: r.events,
      createdAt: r.createdAt,
      generation: String(r.generation),
      specJson: JSON.stringify(r.spec),
      volumes: r.spec.volumes.map((v) => v.name),
      pid: pid ?? 0,
    };
  }

  /** start sets workload `name` to run and starts it now. Idempotent. */
  async start(name: string): Promise<WorkloadView> {
    const r = this.row(name);
    if (r.desired !== "running" || this.o.reconciler.status(name).phase !== "running") {
      this.o.repo.setDesired(name, "running", this.now());
      this.o.reconciler.requestStart(name);
    }
    await this.o.reconciler.reconcile(name);
    return this.get(name);
  }

  /** stop sets workload `name` to stay stopped and stops its container (address and namespace kept). Idempotent. */
  async stop(name: string): Promise<WorkloadView> {
    this.row(name);
    this.o.repo.setDesired(name, "stopped", this.now());
    await this.o.reconciler.reconcile(name);
    return this.get(name);
  }

  /** restart stops and starts workload `name`'s container (same generation, same address) and sets it to run. */
  async restart(name: string): Promise<WorkloadView> {
    this.row(name);
    this.o.repo.setDesired(name, "running", this.now());
    this.o.reconciler.requestStart(name);
    await this.o.reconciler.withLock(name, async () => {
      const r = this.row(name);
      const id = Reconciler.currentId(r);
      const have = (await this.o.containers.list()).some((c) => c.id === id);
      if (have) {
        await this.o.containers.restart(id, { timeoutMs: STOP_GRACE_MS });
        this.o.repo.countRestart(name);
        this.o.repo.addEvent(name, {
          time: this.now(),
          type: "restarted",
          message: `container ${id} restarted by the operator`,
        });
      }
    });
    await this.o.reconciler.reconcile(name);
    return this.get(name);
  }

  /**
   * delete stops and removes workload `name`'s containers, tears down its namespace, detaches
   * its volumes, releases its address and drops it. Each step is idempotent, so a delete cut
   * short is finished by the next one. False when there was no such workload.
   */
  async delete(name: string): Promise<boolean> {
    const deleted = await this.o.reconciler.withLock(name, async () => {
      const r = this.o.repo.get(name);
      if (!r) return false;
      for (const c of await this.o.containers.list())
        if (c.workload === name) await this.o.containers.remove(c.id, { timeoutMs: STOP_GRACE_MS });
      await this.o.net.teardown(name);
      for (const v of r.spec.volumes) await this.o.volumes?.detach(v.name, name);
      await this.o.addresses.release(name);
      this.o.repo.delete(name);
      this.o.reconciler.forget(name);
      return true;
    });
    if (deleted) await this.o.reconciler.syncPorts();
    return deleted;
  }

  /** logs yields workload `name`'s output (the current generation's container); `tailLines` > 0 starts that many lines from the end. */
  async *logs(
    name: string,
    opts: { follow?: boolean; tailLines?: number; signal?: AbortSignal } = {},
  ): AsyncGenerator<string> {
    const id = Reconciler.currentId(this.row(name));
    const tail = opts.tailLines ?? 0;
    if (tail <= 0) {
      yield* this.o.containers.logs(id, {
        follow: opts.follow ?? false,
        ...(opts.signal ? { signal: opts.signal } : {}),
      });
      return;
    }
    let backlog = "";
    for await (const s of this.o.containers.logs(id)) backlog += s;
    const lines = backlog.split("\n");
    const last = lines.pop() ?? "";
    const head =
      lines
        .slice(-tail)
        .map((l) => `${l}\n`)
        .join("") + last;
    if (head) yield head;
    if (!opts.follow) return;
    let skip = backlog.length;
    for await (let s of this.o.containers.logs(id, {
      follow: true,
      ...(opts.signal ? { signal: opts.signal } : {}),
    })) {
      if (skip > 0) {
        const n = Math.min(skip, s.length);
        skip -= n;
        s = s.slice(n);
      }
      if (s) yield s;
    }
  }

  /** exec runs `argv` in workload `name`'s running container; a non-zero exit is a result. */
  exec(name: string, argv: readonly string[], timeoutMs = 60_000): Promise<ExecResult> {
    const id = Reconciler.currentId(this.row(name));
    return this.o.containers.exec(id, argv, { timeoutMs });
  }

  /**
   * execStream starts `argv` in workload `name`'s running container as an interactive session
   * (terminal, stdin, resizes; see runtime/exec.ts). CAPSULE_NOT_FOUND for no such workload,
   * CAPSULE_FAILED_PRECONDITION when it is not running.
   */
  async execStream(
    name: string,
    argv: readonly string[],
    opts: ExecStreamOptions = {},
  ): Promise<ExecSession> {
    const id = Reconciler.currentId(this.row(name));
    return this.o.containers.execStream(id, argv, opts);
  }
}
