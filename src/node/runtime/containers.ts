/**
 * Containers: workload containers on capsuled's containerd, through `ctr`.
 *
 * A container's id is derived from its workload's name and a generation ("web.3", see
 * {@link containerId}): the caller bumps the generation whenever the container must change
 * (image, command, env, mounts), so an id always means one spec. The spec's hash is stored as
 * a label and checked, so a caller that forgot to bump gets an error, not a silently stale
 * container. Labels also name the workload and generation, so {@link Containers.list} finds
 * every container of ours after a restart without any state of its own.
 *
 * The task's stdout and stderr go to `<dataDir>/<id>.log` (ctr's `--log-uri file://...`): the
 * shim writes the file itself, O_APPEND, so logs survive capsuled and containerd restarts, and
 * a restarted task appends to the same file. There is no rotation yet; O_APPEND makes a later
 * copy-and-truncate safe.
 *
 * A stopped task's exit code is only reported by deleting the task (`ctr tasks rm`), so the
 * module reaps stopped tasks when it meets them and keeps the code in `<dataDir>/<id>.exit`.
 * The container (its rootfs snapshot, spec and labels) stays until {@link Containers.remove}.
 *
 * Every command is built by a pure `*Argv` function (golden-tested) and run through the
 * CommandRunner; calls on one container id run one at a time. The one exception is
 * {@link Containers.execStream}: an interactive exec talks to containerd's API directly (see
 * containerd-api.ts for why ctr cannot do it).
 */
import { createHash, randomBytes } from "node:crypto";
import { mkdir, readFile, rm, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { pathToFileURL } from "node:url";
import { CapsuleError, ErrorCode, invalidArgument } from "../../errors.js";
import type { Clock } from "../host/clock.js";
import type { CommandRunner, RunResult } from "../host/runner.js";
import type { ContainerdApi } from "./containerd-api.js";
import { type CtrEndpoint, ctrArgv, ctrError, ctrMessage, isNotFound, parseTable } from "./ctr.js";
import { type ExecSession, type ExecStreamOptions, startExec } from "./exec.js";
import { KeyedLock } from "./keyed-lock.js";
import { followLog } from "./log-file.js";
import type { PipeMaker } from "./exec-pipes.js";
import type { Images } from "./images.js";

/** LABEL_WORKLOAD names the workload a container belongs to; {@link Containers.list} finds ours by it. */
export const LABEL_WORKLOAD = "capsule.workload";
/** LABEL_GENERATION is the workload generation a container was made for. */
export const LABEL_GENERATION = "capsule.generation";
/** LABEL_SPEC is the {@link specHash} of the spec a container was made from. */
export const LABEL_SPEC = "capsule.spec";

/** WORKLOAD_NAME is what a workload name may be: a DNS label (lowercase letters, digits, inner '-', at most 63). */
export const WORKLOAD_NAME = /^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$/;

/** MountSpec is one bind mount: `source` (host path) and `target` (container path) required, both absolute; `readOnly` unset = false. */
export interface MountSpec {
  source: string;
  target: string;
  readOnly?: boolean;
}

/**
 * ContainerSpec is one container of a workload. Required: `workload`, `generation`, `image`,
 * `netns`. Optional: `command` (unset or empty = the image's entrypoint and cmd; set = the
 * whole argv, the image's entrypoint is not prepended), `env` (unset = the image's only; set =
 * added to it, overriding equal keys), `mounts` (unset = none).
 */
export interface ContainerSpec {
  workload: string;
  /** generation is a positive integer the caller bumps when the spec changes. */
  generation: number;
  /** image is a reference to an image in the store ("demo/httpd:1"). */
  image: string;
  command?: string[];
  env?: Record<string, string>;
  /** netns is the path of the network namespace to join ("/run/netns/cw-web"). */
  netns: string;
  mounts?: MountSpec[];
}

/** ContainerState is what a container is doing. */
export type ContainerState = "running" | "stopped" | "absent";

/** ContainerStatus is one container's state: `pid` when running, `exitCode` when stopped and known. */
export interface ContainerStatus {
  id: string;
  state: ContainerState;
  pid?: number;
  exitCode?: number;
}

/** ContainerInfo is one container found by {@link Containers.list}. */
export interface ContainerInfo {
  id: string;
  workload: string;
  generation: number;
  /** image is the stored image name the container was made from. */
  image: string;
  /** state: "stopped" covers a task that exited and no task at all. */
  state: "running" | "stopped";
  pid?: number;
}

/** RunAction says what {@link Containers.run} had to do. */
export type RunAction = "created" | "started" | "running";

/** StopResult: `stopped` when a running task was stopped, `killed` when it took SIGKILL; `exitCode` when known. */
export interface StopResult {
  stopped: boolean;
  killed: boolean;
  exitCode?: number;
}

/** ExecResult is a finished exec: the process's exit code and output. */
export interface ExecResult {
  exitCode: number;
  stdout: string;
  stderr: string;
}

// ---------------------------------------------------------------------------------------------
// Pure: ids, validation, argv

/**
 * containerId is the container id of a workload's generation: `<workload>.<generation>`
 * ("web.3"). A dot never occurs in a workload name, so the id parses back
 * ({@link parseContainerId}). Throws CAPSULE_INVALID_ARGUMENT for a bad name or generation.
 */
export function containerId(workload: string, generation: number): string {
  if (!WORKLOAD_NAME.test(workload)) {
    throw invalidArgument(
      "workload",
      `"${workload}" is not a workload name`,
      "use a DNS label: a-z, 0-9, '-'",
    );
  }
  if (!Number.isSafeInteger(generation) || generation < 1 || generation > 999_999_999) {
    throw invalidArgument("generation", `${generation} is not a generation (1..999999999)`);
  }
  return `${workload}.${generation}`;
}

/** parseContainerId splits a container id made by {@link containerId}; undefined for anything else. */
export function parseContainerId(id: string): { workload: string; generation: number } | undefined {
  const m = /^([a-z0-9-]+)\.([1-9]\d{0,8})$/.exec(id);
  if (!m || !WORKLOAD_NAME.test(m[1]!)) return undefined;
  return { workload: m[1]!, generation: Number(m[2]) };
}

// Characters that would change how ctr's --mount parser (comma and '=' separated) reads a path.
const MOUNT_UNSAFE = /[,=:\s]/;

/** validateSpec checks a spec before any effect; throws CAPSULE_INVALID_ARGUMENT naming the field. */
export function validateSpec(spec: ContainerSpec): void {
  containerId(spec.workload, spec.generation);
  if (!spec.image) throw invalidArgument("image", "is empty");
  if (!spec.netns.startsWith("/")) throw invalidArgument("netns", `"${spec.netns}" is not an absolute path`);
  for (const a of spec.command ?? [])
    if (a.includes("\0")) throw invalidArgument("command", "an argument contains a NUL byte");
  for (const [k, v] of Object.entries(spec.env ?? {})) {
    if (!/^[A-Za-z_][A-Za-z0-9_]*$/.test(k)) throw invalidArgument("env", `"${k}" is not a variable name`);
    if (v.includes("\0")) throw invalidArgument("env", `${k}: the value contains a NUL byte`);
  }
  for (const m of spec.mounts ?? []) {
    for (const [field, p] of [
      ["source", m.source],
      ["target", m.target],
    ] as const) {
      if (!p.startsWith("/")) throw invalidArgument(`mounts.${field}`, `"${p}" is not an absolute path`);
      if (MOUNT_UNSAFE.test(p))
        throw invalidArgument(`mounts.${field}`, `"${p}" contains ',', '=', ':' or a space`);
    }
  }
}

/**
 * specHash is a digest of everything a container is made from (pure): the same spec, in any
 * key order, hashes the same. Stored as the {@link LABEL_SPEC} label.
 */
export function specHash(spec: ContainerSpec): string {
  const canonical = JSON.stringify([
    spec.workload,
    spec.generation,
    spec.image,
    spec.command ?? [],
    Object.entries(spec.env ?? {}).sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)),
    spec.netns,
    (spec.mounts ?? []).map((m) => [m.source, m.target, !!m.readOnly]),
  ]);
  return createHash("sha256").update(canonical).digest("hex").slice(0, 32);
}

/** RunArgvOptions: all required. */
export interface RunArgvOptions {
  /** imageName is the image's name as stored (see Images.resolve). */
  imageName: string;
  logPath: string;
  cgroupPath: string;
}

const logUri = (p: string) => pathToFileURL(p).href;

/** runArgv is the `ctr run -d` that creates and starts a container (pure). */
export function runArgv(ep: CtrEndpoint, spec: ContainerSpec, o: RunArgvOptions): string[] {
  const id = containerId(spec.workload, spec.generation);
  return ctrArgv(
    ep,
    "run",
    "-d",
    "--snapshotter",
    ep.snapshotter,
    "--cgroup",
    o.cgroupPath,
    "--log-uri",
    logUri(o.logPath),
    "--with-ns",
    `network:${spec.netns}`,
    "--label",
    `${LABEL_WORKLOAD}=${spec.workload}`,
    "--label",
    `${LABEL_GENERATION}=${spec.generation}`,
    "--label",
    `${LABEL_SPEC}=${specHash(spec)}`,
    ...Object.entries(spec.env ?? {})
      .sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))
      .flatMap(([k, v]) => ["--env", `${k}=${v}`]),
    ...(spec.mounts ?? []).flatMap((m) => [
      "--mount",
      `type=bind,src=${m.source},dst=${m.target},options=rbind:${m.readOnly ? "ro" : "rw"}`,
    ]),
    o.imageName,
    id,
    ...(spec.command ?? []),
  );
}

/** startArgv starts a new task in an existing container, output appended to the same log (pure). */
export function startArgv(ep: CtrEndpoint, id: string, logPath: string): string[] {
  return ctrArgv(ep, "tasks", "start", "-d", "--log-uri", logUri(logPath), id);
}

/** killArgv signals a container's task (pure). */
export function killArgv(ep: CtrEndpoint, id: string, signal: "SIGTERM" | "SIGKILL"): string[] {
  return ctrArgv(ep, "tasks", "kill", "-s", signal, id);
}

/** deleteTaskArgv deletes a stopped task, or with `force` one that never started (pure). */
export function deleteTaskArgv(ep: CtrEndpoint, id: string, force = false): string[] {
  return ctrArgv(ep, "tasks", "rm", ...(force ? ["-f"] : []), id);
}

/** deleteContainerArgv deletes a container and its rootfs snapshot (pure). */
export function deleteContainerArgv(ep: CtrEndpoint, id: string): string[] {
  return ctrArgv(ep, "containers", "rm", id);
}

/** execArgv runs `argv` in a running container, output through ctr, FIFOs in `fifoDir` when set (pure). */
export function execArgv(
  ep: CtrEndpoint,
  id: string,
  execId: string,
  argv: readonly string[],
  fifoDir?: string,
): string[] {
  return ctrArgv(
    ep,
    "tasks",
    "exec",
    "--exec-id",
    execId,
    ...(fifoDir ? ["--fifo-dir", fifoDir] : []),
    id,
    ...argv,
  );
}

/**
 * defaultCgroupParent is `/capsule/<12 hex of sha256(containerd address)>` (pure): one cgroup
 * per containerd, so the "web.1" of two capsules on one machine never share a cgroup (where
 * runc would find, and kill, each other's processes), grouped under /capsule.
 */
export function defaultCgroupParent(ep: CtrEndpoint): string {
  return `/capsule/${createHash("sha256").update(ep.address).digest("hex").slice(0, 12)}`;
}

/** listContainersArgv lists our containers: those carrying the workload label (pure). */
export function listContainersArgv(ep: CtrEndpoint): string[] {
  return ctrArgv(ep, "containers", "ls", `labels."${LABEL_WORKLOAD}"`);
}

/** TaskRow is one line of `ctr tasks ls`. */
export interface TaskRow {
  pid: number;
  /** status as containerd says it: RUNNING, STOPPED, CREATED, PAUSED, PAUSING, UNKNOWN. */
  status: string;
}

/** parseTasks reads `ctr tasks ls` into a map from container id to task (pure). */
export function parseTasks(text: string): Map<string, TaskRow> {
  const out = new Map<string, TaskRow>();
  for (const r of parseTable(text))
    if (r["TASK"]) out.set(r["TASK"], { pid: Number(r["PID"] ?? 0), status: r["STATUS"] ?? "UNKNOWN" });
  return out;
}

/**
 * parseDeletedExitCode reads a task's exit code from what `ctr tasks rm` printed (pure): ctr
 * 1.6 exits 0 and warns "task ID exit with non-zero exit code N" on stderr; no warning means 0.
 */
export function parseDeletedExitCode(stderr: string): number {
  const m = /exit with non-zero exit code (\d+)/.exec(stderr);
  return m ? Number(m[1]) : 0;
}

// ---------------------------------------------------------------------------------------------
// Containers

/** ContainersOptions: `runner`, `clock`, `endpoint`, `images` and `dataDir` are required; the rest are optional. */
export interface ContainersOptions {
  runner: CommandRunner;
  /** clock paces the bounded waits of stop. */
  clock: Clock;
  endpoint: CtrEndpoint;
  /** images resolves a spec's image reference to the stored name (and says CAPSULE_NOT_FOUND). */
  images: Images;
  /** dataDir holds each container's log and exit record (under the state dir; created on demand). */
  dataDir: string;
  /**
   * cgroupParent is the cgroup every container's cgroup goes under; unset =
   * {@link defaultCgroupParent} of the endpoint. The cgroup tree is host-wide (unlike /run,
   * which a capsule may have to itself), so two capsules on one machine must not share it.
   */
  cgroupParent?: string;
  /** fifoDir is where exec FIFOs are made; unset = ctr's default (/run/containerd/fifo). */
  fifoDir?: string;
  /** newExecId makes exec ids; unset = "exec-" + 12 random hex digits. */
  newExecId?: () => string;
  /** runTimeoutMs bounds `ctr run` and `ctr tasks start`; unset = 60000. */
  runTimeoutMs?: number;
  /**
   * execApi opens a connection to containerd's API for one interactive exec (closed after it);
   * `pipes` makes its FIFOs. Both unset = {@link Containers.execStream} is CAPSULE_UNSUPPORTED.
   */
  execApi?: () => ContainerdApi;
  pipes?: PipeMaker;
}

/** StopOptions: `timeoutMs` (grace between SIGTERM and SIGKILL) unset = 10000. */
export interface StopOptions {
  timeoutMs?: number;
}

/** RemoveOptions: `timeoutMs` as in {@link StopOptions}; `keepLogs` unset = false (the log file goes too). */
export interface RemoveOptions extends StopOptions {
  keepLogs?: boolean;
}

/** ExecOptions: all optional. `tty` must be unset or false (a terminal needs {@link Containers.execStream}); `input` is stdin (unset = empty); `timeoutMs` unset = 60000. */
export interface ExecOptions {
  tty?: false;
  input?: string;
  timeoutMs?: number;
}

/** LogsOptions: all optional. `follow` keeps reading as the file grows until `signal` aborts; `pollMs` unset = 250. */
export interface LogsOptions {
  follow?: boolean;
  signal?: AbortSignal;
  pollMs?: number;
}

const POLL_MS = 100;
const KILL_WAIT_MS = 5_000;

/**
 * Containers creates, runs, stops and removes workload containers, and execs in and reads the
 * logs of running ones. Every method is idempotent; see the module comment for ids, logs and
 * exit codes.
 */
export class Containers {
  private readonly runner: CommandRunner;
  private readonly clock: Clock;
  private readonly ep: CtrEndpoint;
  private readonly images: Images;
  private readonly dataDir: string;
  private readonly cgroupParent: string;
  private readonly fifoDir: string | undefined;
  private readonly newExecId: () => string;
  private readonly runTimeoutMs: number;
  private readonly execApi: (() => ContainerdApi) | undefined;
  private readonly pipes: PipeMaker | undefined;
  private readonly lock = new KeyedLock();

  constructor(opts: ContainersOptions) {
    this.runner = opts.runner;
    this.clock = opts.clock;
    this.ep = opts.endpoint;
    this.images = opts.images;
    this.dataDir = opts.dataDir;
    this.cgroupParent = (opts.cgroupParent ?? defaultCgroupParent(opts.endpoint)).replace(/\/+$/, "");
    this.fifoDir = opts.fifoDir;
    this.newExecId = opts.newExecId ?? (() => `exec-${randomBytes(6).toString("hex")}`);
    this.runTimeoutMs = opts.runTimeoutMs ?? 60_000;
    this.execApi = opts.execApi;
    this.pipes = opts.pipes;
  }

  /** logPath is where container `id`'s stdout and stderr go. */
  logPath(id: string): string {
    return join(this.dataDir, `${id}.log`);
  }

  private exitPath(id: string): string {
    return join(this.dataDir, `${id}.exit`);
  }

  private exclusive<T>(id: string, fn: () => Promise<T>): Promise<T> {
    return this.lock.run(id, fn);
  }

  private async ctr(argv: string[], timeoutMs?: number): Promise<RunResult> {
    const r = await this.runner.run(argv, { allowFailure: true, ...(timeoutMs ? { timeoutMs } : {}) });
    if (r.exitCode !== 0) throw ctrError(argv, r);
    return r;
  }

  /** info returns the container's labels and image, or undefined when there is no such container. */
  private async info(id: string): Promise<{ labels: Record<string, string>; image: string } | undefined> {
    const argv = ctrArgv(this.ep, "containers", "info", id);
    const r = await this.runner.run(argv, { allowFailure: true });
    if (r.exitCode !== 0) {
      if (isNotFound(r)) return undefined;
      throw ctrError(argv, r);
    }
    const j = JSON.parse(r.stdout) as { Labels?: Record<string, string> | null; Image?: string };
    return { labels: j.Labels ?? {}, image: j.Image ?? "" };
  }

  private async tasks(): Promise<Map<string, TaskRow>> {
    return parseTasks((await this.ctr(ctrArgv(this.ep, "tasks", "ls"))).stdout);
  }

  private async task(id: string): Promise<TaskRow | undefined> {
    return (await this.tasks()).get(id);
  }

  /** reap deletes a stopped task and records its exit code; returns the code (undefined when there was no task). */
  private async reap(id: string, force = false): Promise<number | undefined> {
    const argv = deleteTaskArgv(this.ep, id, force);
    const r = await this.runner.run(argv, { allowFailure: true });
    if (r.exitCode !== 0) {
      if (isNotFound(r)) return undefined;
      throw ctrError(argv, r);
    }
    if (force) return undefined;
    const code = parseDeletedExitCode(r.stderr);
    await mkdir(this.dataDir, { recursive: true, mode: 0o700 });
    await writeFile(this.exitPath(id), `${code}\n`);
    return code;
  }

  private async recordedExit(id: string): Promise<number | undefined> {
    const n = Number.parseInt(await readFile(this.exitPath(id), "utf8").catch(() => ""), 10);
    return Number.isInteger(n) ? n : undefined;
  }

  /** startTask makes container `id` have a running task; returns false when it already had one. */
  private async startTask(id: string): Promise<boolean> {
    const t = await this.task(id);
    if (t && (t.status === "RUNNING" || t.status === "PAUSED" || t.status === "PAUSING")) return false;
    if (t?.status === "STOPPED") await this.reap(id);
    // CREATED: a `ctr run` killed between create and start left a task that never ran.
    else if (t) await this.reap(id, true);
    await rm(this.exitPath(id), { force: true });
    await this.ctr(startArgv(this.ep, id, this.logPath(id)), this.runTimeoutMs);
    return true;
  }

  /**
   * run makes the spec's container exist and its task run, and says what it did: "created"
   * (new container, started), "started" (the container existed with no running task: a new
   * task, the log appended to), "running" (nothing to do). Idempotent, so capsuled calls it on
   * every reconcile and after a restart without making duplicates. Throws
   * CAPSULE_INVALID_ARGUMENT for a bad spec or a command the image cannot run (nothing is left
   * behind), CAPSULE_NOT_FOUND for an image not in the store, CAPSULE_FAILED_PRECONDITION when
   * the id exists with another spec (bump the generation).
   */
  async run(spec: ContainerSpec): Promise<{ id: string; action: RunAction; pid: number | undefined }> {
    validateSpec(spec);
    const id = containerId(spec.workload, spec.generation);
    return this.exclusive(id, async () => {
      const have = await this.info(id);
      if (have) {
        if (have.labels[LABEL_SPEC] !== specHash(spec)) {
          throw new CapsuleError(ErrorCode.FailedPrecondition, `container ${id} exists with another spec`, {
            hint: "a changed workload needs a new generation (or remove the old container first)",
            details: { id },
          });
        }
        const started = await this.startTask(id);
        return { id, action: started ? "started" : "running", pid: (await this.task(id))?.pid };
      }
      const img = await this.images.resolve(spec.image);
      await mkdir(this.dataDir, { recursive: true, mode: 0o700 });
      await rm(this.exitPath(id), { force: true });
      const argv = runArgv(this.ep, spec, {
        imageName: img.name,
        logPath: this.logPath(id),
        cgroupPath: `${this.cgroupParent}/${id}`,
      });
      const r = await this.runner.run(argv, { allowFailure: true, timeoutMs: this.runTimeoutMs });
      if (r.exitCode !== 0) {
        // ctr creates the container before its task; a task that cannot start (no such
        // executable) would leave a container that fails the same way on every retry.
        await this.runner.run(deleteTaskArgv(this.ep, id, true), { allowFailure: true });
        await this.runner.run(deleteContainerArgv(this.ep, id), { allowFailure: true });
        const msg = ctrMessage(r.stderr) ?? "";
        if (/executable file not found|no such file or directory|permission denied/i.test(msg)) {
          throw new CapsuleError(ErrorCode.InvalidArgument, `container ${id} cannot start: ${msg}`, {
            hint: "check the workload's command against the image",
            cause: ctrError(argv, r),
          });
        }
        throw ctrError(argv, r);
      }
      return { id, action: "created", pid: (await this.task(id))?.pid };
    });
  }

  /**
   * start gives existing container `id` a running task (after a stop, or after its process
   * exited); the new task's output is appended to the same log. Idempotent: false when it was
   * running. Throws CAPSULE_NOT_FOUND when there is no such container.
   */
  start(id: string): Promise<boolean> {
    return this.exclusive(id, async () => {
      if (!(await this.info(id))) throw this.notFound(id);
      return this.startTask(id);
    });
  }

  private notFound(id: string): CapsuleError {
    return new CapsuleError(ErrorCode.NotFound, `container ${id} does not exist`, { details: { id } });
  }

  /**
   * status says whether container `id` is running (with its pid), stopped (with its exit code
   * when known) or absent. A task found stopped is reaped on the way (its exit code recorded),
   * which changes nothing a caller can see.
   */
  status(id: string): Promise<ContainerStatus> {
    return this.exclusive(id, async () => {
      if (!(await this.info(id))) return { id, state: "absent" };
      const t = await this.task(id);
      if (t && t.status !== "STOPPED" && t.status !== "CREATED") return { id, state: "running", pid: t.pid };
      const code = t?.status === "STOPPED" ? await this.reap(id) : await this.recordedExit(id);
      return code === undefined ? { id, state: "stopped" } : { id, state: "stopped", exitCode: code };
    });
  }

  private async waitStopped(id: string, ms: number): Promise<boolean> {
    const deadline = this.clock.now() + ms;
    for (;;) {
      const t = await this.task(id);
      if (!t || t.status === "STOPPED") return true;
      if (this.clock.now() >= deadline) return false;
      await this.clock.sleep(POLL_MS);
    }
  }

  private async signal(id: string, sig: "SIGTERM" | "SIGKILL"): Promise<void> {
    const argv = killArgv(this.ep, id, sig);
    const r = await this.runner.run(argv, { allowFailure: true });
    // The process may exit between our look and the signal: that is what we wanted anyway.
    if (r.exitCode !== 0 && !isNotFound(r)) throw ctrError(argv, r);
  }

  private async stopTask(id: string, timeoutMs: number): Promise<StopResult> {
    const t = await this.task(id);
    if (!t) return { stopped: false, killed: false, ...exit(await this.recordedExit(id)) };
    if (t.status === "CREATED") {
      await this.reap(id, true);
      return { stopped: false, killed: false };
    }
    if (t.status === "STOPPED") return { stopped: false, killed: false, ...exit(await this.reap(id)) };
    await this.signal(id, "SIGTERM");
    let killed = false;
    if (!(await this.waitStopped(id, timeoutMs))) {
      // PID 1 of a container ignores signals it has no handler for (busybox httpd does).
      killed = true;
      await this.signal(id, "SIGKILL");
      if (!(await this.waitStopped(id, KILL_WAIT_MS))) {
        throw new CapsuleError(
          ErrorCode.Timeout,
          `container ${id} still runs ${KILL_WAIT_MS} ms after SIGKILL`,
        );
      }
    }
    return { stopped: true, killed, ...exit(await this.reap(id)) };
  }

  /**
   * stop ends container `id`'s task: SIGTERM, then SIGKILL after `timeoutMs`; the task is
   * reaped and its exit code recorded, the container stays (see {@link start}). Idempotent:
   * `stopped` is false when nothing was running. Throws CAPSULE_NOT_FOUND when there is no such
   * container, CAPSULE_TIMEOUT when even SIGKILL does not end it (bounded).
   */
  stop(id: string, opts: StopOptions = {}): Promise<StopResult> {
    return this.exclusive(id, async () => {
      if (!(await this.info(id))) throw this.notFound(id);
      return this.stopTask(id, opts.timeoutMs ?? 10_000);
    });
  }

  /** restart is {@link stop} then {@link start} as one operation; the log is appended to. Throws CAPSULE_NOT_FOUND when there is no such container. */
  restart(id: string, opts: StopOptions = {}): Promise<StopResult> {
    return this.exclusive(id, async () => {
      if (!(await this.info(id))) throw this.notFound(id);
      const r = await this.stopTask(id, opts.timeoutMs ?? 10_000);
      await this.startTask(id);
      return r;
    });
  }

  /**
   * remove stops container `id` (as {@link stop}), deletes it with its rootfs snapshot, its exit
   * record and, unless `keepLogs`, its log. Idempotent: false when there was no container (its
   * files are removed anyway).
   */
  remove(id: string, opts: RemoveOptions = {}): Promise<boolean> {
    return this.exclusive(id, async () => {
      const have = await this.info(id);
      if (have) {
        await this.stopTask(id, opts.timeoutMs ?? 10_000);
        const argv = deleteContainerArgv(this.ep, id);
        const r = await this.runner.run(argv, { allowFailure: true });
        if (r.exitCode !== 0 && !isNotFound(r)) throw ctrError(argv, r);
      }
      await rm(this.exitPath(id), { force: true });
      if (!opts.keepLogs) await rm(this.logPath(id), { force: true });
      return have !== undefined;
    });
  }

  /**
   * list returns every container of ours (those with the workload label), sorted by id, so a
   * restarted capsuled can adopt them. Read-only (it does not reap).
   */
  async list(): Promise<ContainerInfo[]> {
    const cs = parseTable((await this.ctr(listContainersArgv(this.ep))).stdout);
    const tasks = await this.tasks();
    const out: ContainerInfo[] = [];
    for (const c of cs) {
      const id = c["CONTAINER"] ?? "";
      const p = parseContainerId(id);
      if (!p) continue;
      const t = tasks.get(id);
      const running = t !== undefined && t.status !== "STOPPED" && t.status !== "CREATED";
      out.push({
        id,
        ...p,
        image: c["IMAGE"] ?? "",
        state: running ? "running" : "stopped",
        ...(running ? { pid: t.pid } : {}),
      });
    }
    return out.sort((a, b) => (a.id < b.id ? -1 : a.id > b.id ? 1 : 0));
  }

  /**
   * exec runs `argv` in running container `id` and returns its exit code and output (a
   * non-zero exit is a result, not an error). Changes nothing itself; the process may. Throws
   * CAPSULE_NOT_FOUND when there is no such container, CAPSULE_FAILED_PRECONDITION when it is
   * not running, CAPSULE_UNSUPPORTED for a tty, CAPSULE_COMMAND_FAILED when the process cannot
   * start (ctr's message says why).
   */
  async exec(id: string, argv: readonly string[], opts: ExecOptions = {}): Promise<ExecResult> {
    if (opts.tty)
      throw new CapsuleError(ErrorCode.Unsupported, "exec with a tty is not supported here", {
        hint: "use execStream",
      });
    if (argv.length === 0 || !argv[0]) throw invalidArgument("command", "is empty");
    await this.mustRun(id);
    if (this.fifoDir) await mkdir(this.fifoDir, { recursive: true, mode: 0o700 });
    const cmd = execArgv(this.ep, id, this.newExecId(), argv, this.fifoDir);
    const r = await this.runner.run(cmd, {
      allowFailure: true,
      input: opts.input ?? "",
      timeoutMs: opts.timeoutMs ?? 60_000,
    });
    // ctr exits with the process's code; its own failures are exit 1 with a "ctr: " line.
    if (r.exitCode === 1 && ctrMessage(r.stderr) !== undefined) throw ctrError(cmd, r);
    return { exitCode: r.exitCode, stdout: r.stdout, stderr: r.stderr };
  }

  private async mustRun(id: string): Promise<void> {
    const t = await this.task(id);
    if (t?.status !== "RUNNING") {
      if (!(await this.info(id))) throw this.notFound(id);
      throw new CapsuleError(ErrorCode.FailedPrecondition, `container ${id} is not running`, {
        hint: "start the workload first",
      });
    }
  }

  /**
   * execStream starts `argv` in running container `id` as an interactive session: stdin,
   * output and the terminal's size streamed while it runs (see exec.ts). Changes nothing itself;
   * the process may. Throws as {@link exec} does, and CAPSULE_UNSUPPORTED when this Containers
   * was made without `execApi` and `pipes`.
   */
  async execStream(id: string, argv: readonly string[], opts: ExecStreamOptions = {}): Promise<ExecSession> {
    if (!this.execApi || !this.pipes) {
      throw new CapsuleError(ErrorCode.Unsupported, "interactive exec is not available on this capsule");
    }
    if (argv.length === 0 || !argv[0]) throw invalidArgument("command", "is empty");
    await this.mustRun(id);
    return startExec({ api: this.execApi(), pipes: this.pipes, execId: this.newExecId() }, id, argv, opts);
  }

  /**
   * logs yields container `id`'s output (stdout and stderr interleaved, as the shim wrote it),
   * from the start of the log. Without `follow` it ends at the end of the file; with it, it
   * waits for more until `signal` aborts (a truncated file is read again from its start).
   * Read-only. Throws CAPSULE_NOT_FOUND when there is neither a log nor a container.
   */
  async *logs(id: string, opts: LogsOptions = {}): AsyncGenerator<string> {
    yield* followLog(this.logPath(id), this.clock, opts, async () => {
      if (!(await this.info(id))) throw this.notFound(id);
    });
  }
}

const exit = (code: number | undefined) => (code === undefined ? {} : { exitCode: code });
