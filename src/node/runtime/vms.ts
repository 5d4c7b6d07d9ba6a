/**
 * MicroVms: microVM workloads, each one QEMU process (qemu-plan.ts draws its command line).
 *
 * A VM's id is its workload's name and generation ("web.3", as for containers), and its
 * files live in `<dataDir>/<id>/`: `spec.json` (the spec and its hash), `qemu.pid`,
 * `qemu.log` (QEMU's own stderr), `console.log` (the guest's serial console, appended: this
 * is `workload logs`) and `exit.json` (how it last stopped, when capsuled stopped it). QMP and
 * the guest agent listen on unix sockets under `<dataDir>/sock/` (short names: a socket path
 * has 107 bytes at most), or under /run/capsule-<hash>/vms when even those would not fit.
 *
 * QEMU is started detached in its own session (the ProcessSpawner seam, as for wireguard-go),
 * so a SIGKILLed capsuled takes no VM down. `-daemonize` is not used: its fork is a process
 * spawn that QEMU's own `-sandbox spawn=deny` kills. A start is complete when QMP answers
 * `query-status` (QEMU listens once the machine is set up, and runs it at once: no `-S`); if
 * QEMU exits first, its last stderr line is the error.
 *
 * Nothing about a VM is kept in memory: {@link MicroVms.list} reads the directories and checks
 * each pid against /proc (the process must still be the QEMU whose command line names the VM's
 * QMP socket), so a restarted capsuled adopts running VMs as they are and never starts a second
 * QEMU for one.
 *
 * Stop is clean first: the guest agent's `guest-shutdown` (the guest unmounts its volumes and
 * syncs, then powers off, and `-no-reboot` ends QEMU), then QMP `quit` (QEMU flushes its block
 * devices), then SIGKILL, each after a bounded wait. Exec runs through the guest agent
 * (`guest-exec`); there is no terminal, and output arrives when the command ends.
 */
import { createHash, randomBytes } from "node:crypto";
import { mkdir, readdir, readFile, rename, rm, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { CapsuleError, ErrorCode } from "../../errors.js";
import type { Clock } from "../host/clock.js";
import type { ProcessSpawner } from "../host/spawner.js";
import { canonicalJson } from "../../api/canonical.js";
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
} from "./containers.js";
import { containerId, parseContainerId } from "./containers.js";
import type { ExecSession, ExecStreamOptions } from "./exec.js";
import { type GuestAgent, guestAgent } from "./guest-agent.js";
import { fallbackSocketDir, socketPathFits } from "../host/socket-path.js";
import { KeyedLock } from "./keyed-lock.js";
import { followLog } from "./log-file.js";
import { GATEWAY, HOST_MAC, workloadNetNames } from "./netns.js";
import type { AccelChoice } from "./qemu-accel.js";
import { QEMU_INSTALL_HINT } from "./qemu-accel.js";
import { planQemuArgv, type QemuSpec } from "./qemu-plan.js";
import { connectQmp, type Qmp } from "./qmp.js";

/** MicroVmVolume is one volume given to the guest: its block device or image file, and where the guest mounts it. */
export interface MicroVmVolume {
  name: string;
  path: string;
  mountPath: string;
}

/** MicroVmSpec is one VM of a workload. `initrd` and `cmdline` are optional. */
export interface MicroVmSpec {
  workload: string;
  /** generation is a positive integer the caller bumps when the spec changes. */
  generation: number;
  /** kernel and initrd are absolute paths on the capsule. */
  kernel: string;
  initrd?: string;
  /** cmdline is appended to the kernel command line. */
  cmdline?: string;
  cpus: number;
  memoryMib: number;
  /** address is the workload's fabric address. */
  address: string;
  volumes: MicroVmVolume[];
}

/** MicroVmsOptions: `runner`-free; all required except the ones marked optional. */
export interface MicroVmsOptions {
  clock: Clock;
  spawner: ProcessSpawner;
  /** dataDir holds a directory per VM ("<stateDir>/vms"). */
  dataDir: string;
  /** accel resolves to the accelerator detected at start (qemu-accel.ts). */
  accel: () => Promise<AccelChoice>;
  /** runAs is the unprivileged user QEMU drops to (`-runas`); unset = stays root. */
  runAs?: { user: string; group?: string };
  /** sandbox turns on QEMU's seccomp sandbox; unset = true. */
  sandbox?: boolean;
  /** qmp connects to a QMP socket; unset = {@link connectQmp}. */
  qmp?: (socket: string, timeoutMs: number) => Promise<Qmp>;
  /** agent makes a guest agent client for a socket; unset = {@link guestAgent}. */
  agent?: (socket: string) => GuestAgent;
  /** procRoot is where /proc is; unset = "/proc" (tests point it at a fake tree). */
  procRoot?: string;
  /** startTimeoutMs bounds a start (QEMU up and QMP answering); unset = 20000. */
  startTimeoutMs?: number;
  /** hostTscKhz is the host's TSC rate, given to TCG guests; unset = read from /proc/cpuinfo. */
  hostTscKhz?: number;
  /** kill sends a signal to a pid; unset = process.kill. */
  kill?: (pid: number, signal: NodeJS.Signals) => void;
}

interface SpecFile {
  id: string;
  hash: string;
  spec: MicroVmSpec;
}

/** ExitRecord is how a VM last stopped, as capsuled saw it. */
interface ExitRecord {
  exitCode: number;
  reason: string;
  at: string;
}

/** vmSpecHash is a digest of everything a VM is made from (pure). */
export function vmSpecHash(spec: MicroVmSpec): string {
  return createHash("sha256").update(canonicalJson(spec)).digest("hex").slice(0, 32);
}

/** guestMac is the stable MAC of a workload's eth0: locally administered, unicast, from its name (pure). */
export function guestMac(workload: string): string {
  const h = createHash("sha256").update(`mac:${workload}`).digest();
  return ["02", ...[...h.subarray(0, 5)].map((b) => b.toString(16).padStart(2, "0"))].join(":");
}

/**
 * TCG_CMDLINE is added under TCG: the guest trusts its TSC instead of calibrating it against an
 * emulated timer (seconds saved at boot). With {@link tcgCmdline}'s `tsc_early_khz` it skips
 * the calibration altogether: under load the emulated PIT calibration fails ("Unable to
 * calibrate against PIT") and the guest hangs with no clocksource (seen here).
 */
export const TCG_CMDLINE = "tsc=reliable no_timer_check";

/** tcgCmdline is {@link TCG_CMDLINE} plus the TSC rate: under TCG the guest reads the host's TSC (pure). */
export function tcgCmdline(hostTscKhz: number | undefined): string {
  return hostTscKhz && hostTscKhz > 0
    ? `${TCG_CMDLINE} tsc_early_khz=${Math.round(hostTscKhz)}`
    : TCG_CMDLINE;
}

/**
 * parseCpuMhz reads the first "cpu MHz" of /proc/cpuinfo as kHz (pure); undefined when absent.
 * On a host with a constant TSC (every x86 of the last fifteen years) that is the TSC's rate.
 */
export function parseCpuMhz(cpuinfo: string): number | undefined {
  const m = /^cpu MHz\s*:\s*([0-9.]+)/m.exec(cpuinfo);
  const mhz = m ? Number(m[1]) : NaN;
  return Number.isFinite(mhz) && mhz > 0 ? Math.round(mhz * 1000) : undefined;
}

/** BASE_CMDLINE is added to every guest's kernel command line: a quiet console with one UART. */
export const BASE_CMDLINE = "quiet 8250.nr_uarts=1";

/** vmQemuSpec turns a VM spec into the QEMU spec for `accel`, with the VM's paths (pure). */
export function vmQemuSpec(
  spec: MicroVmSpec,
  accel: AccelChoice,
  paths: { qmp: string; ga: string; console: string },
  o: { runAs?: { user: string; group?: string }; sandbox: boolean; hostTscKhz?: number | undefined },
): QemuSpec {
  if (accel.accel === "none")
    throw new CapsuleError(
      ErrorCode.FailedPrecondition,
      "microVMs cannot run on this capsule: QEMU has no usable accelerator",
      {
        hint: QEMU_INSTALL_HINT,
      },
    );
  const cmdline = [BASE_CMDLINE, accel.accel === "tcg" ? tcgCmdline(o.hostTscKhz) : "", spec.cmdline ?? ""]
    .filter(Boolean)
    .join(" ");
  return {
    name: spec.workload,
    accel: accel.accel,
    ...(accel.cpu ? { cpu: accel.cpu } : {}),
    cpus: spec.cpus,
    memoryMib: spec.memoryMib,
    kernel: spec.kernel,
    ...(spec.initrd ? { initrd: spec.initrd } : {}),
    cmdline,
    tap: workloadNetNames(spec.workload).hostIface,
    mac: guestMac(spec.workload),
    address: spec.address,
    gateway: GATEWAY,
    gatewayMac: HOST_MAC,
    volumes: spec.volumes.map((v) => ({ name: v.name, path: v.path, mountPath: v.mountPath })),
    qmpSocket: paths.qmp,
    gaSocket: paths.ga,
    serialLog: paths.console,
    sandbox: o.sandbox,
    ...(o.runAs ? { runAs: o.runAs } : {}),
  };
}

/** lastLine is the last non-empty line of QEMU's stderr, for an error message (pure). */
export function lastLine(text: string): string {
  const lines = text
    .split("\n")
    .map((l) => l.trim())
    .filter(Boolean);
  return lines[lines.length - 1] ?? "";
}

const GA_STOP_TIMEOUT_MS = 2_000;
const QUIT_WAIT_MS = 3_000;
const KILL_WAIT_MS = 3_000;
const POLL_MS = 100;

/** MicroVms runs microVM workloads under QEMU (see the module comment). */
export class MicroVms {
  private readonly o: MicroVmsOptions;
  private readonly lock = new KeyedLock();
  private readonly qmp: (socket: string, timeoutMs: number) => Promise<Qmp>;
  private readonly agent: (socket: string) => GuestAgent;
  private readonly procRoot: string;
  private readonly kill: (pid: number, signal: NodeJS.Signals) => void;
  private tscKhz: number | undefined;
  /** sockDir holds the QMP and agent sockets: `<dataDir>/sock`, or under /run when that is too long for a socket path. */
  private readonly sockDir: string;

  constructor(o: MicroVmsOptions) {
    this.o = o;
    this.qmp = o.qmp ?? ((s, timeoutMs) => connectQmp(s, { timeoutMs }));
    this.agent = o.agent ?? ((s) => guestAgent(s));
    this.procRoot = o.procRoot ?? "/proc";
    this.kill = o.kill ?? ((pid, sig) => process.kill(pid, sig));
    const local = join(o.dataDir, "sock");
    this.sockDir = socketPathFits(join(local, "0123456789ab.qmp"))
      ? local
      : join(fallbackSocketDir(o.dataDir), "vms");
  }

  private dir(id: string): string {
    return join(this.o.dataDir, id);
  }

  /** paths are a VM's files and sockets. */
  paths(id: string): {
    pid: string;
    log: string;
    console: string;
    spec: string;
    exit: string;
    qmp: string;
    ga: string;
  } {
    const d = this.dir(id);
    const h = createHash("sha256").update(id).digest("hex").slice(0, 12);
    const s = this.sockDir;
    return {
      pid: join(d, "qemu.pid"),
      log: join(d, "qemu.log"),
      console: join(d, "console.log"),
      spec: join(d, "spec.json"),
      exit: join(d, "exit.json"),
      qmp: join(s, `${h}.qmp`),
      ga: join(s, `${h}.ga`),
    };
  }

  private exclusive<T>(id: string, fn: () => Promise<T>): Promise<T> {
    return this.lock.run(id, fn);
  }

  /** has reports whether VM `id` exists (its directory does). Read-only. */
  async has(id: string): Promise<boolean> {
    return (await this.readSpec(id)) !== undefined;
  }

  private async readSpec(id: string): Promise<SpecFile | undefined> {
    try {
      return JSON.parse(await readFile(this.paths(id).spec, "utf8")) as SpecFile;
    } catch (e) {
      // Missing, or unreadable JSON (not ours, or a disk that lost it): no VM by that id.
      if ((e as NodeJS.ErrnoException).code === "ENOENT" || e instanceof SyntaxError) return undefined;
      throw e;
    }
  }

  /**
   * livePid is VM `id`'s QEMU pid when that process runs: the pid file names a process that is
   * not a zombie and whose command line names this VM's QMP socket (a recycled pid does not).
   */
  async livePid(id: string): Promise<number | undefined> {
    let pid: number;
    try {
      pid = Number((await readFile(this.paths(id).pid, "utf8")).trim());
    } catch {
      return undefined;
    }
    if (!Number.isInteger(pid) || pid <= 0) return undefined;
    try {
      const stat = await readFile(join(this.procRoot, String(pid), "stat"), "utf8");
      const state = stat.slice(stat.lastIndexOf(")") + 2, stat.lastIndexOf(")") + 3);
      if (state === "Z" || state === "X") return undefined;
      const cmdline = await readFile(join(this.procRoot, String(pid), "cmdline"), "utf8");
      return cmdline.includes(this.paths(id).qmp) ? pid : undefined;
    } catch {
      return undefined;
    }
  }

  /**
   * run makes VM `spec` run: created and booted when new, booted when stopped, left alone when
   * running (a restarted capsuled adopts it). CAPSULE_INTERNAL when the VM exists with another
   * spec under the same generation.
   */
  run(spec: MicroVmSpec): Promise<{ id: string; action: RunAction; pid: number | undefined }> {
    const id = containerId(spec.workload, spec.generation);
    return this.exclusive(id, async () => {
      const hash = vmSpecHash(spec);
      const have = await this.readSpec(id);
      if (have && have.hash !== hash)
        throw new CapsuleError(ErrorCode.Internal, `microVM ${id} exists with another spec`, {
          hint: "a changed spec needs a new generation",
        });
      let action: RunAction = "started";
      if (!have) {
        await mkdir(this.dir(id), { recursive: true });
        // Written whole or not at all: a torn spec.json would otherwise make every list fail.
        const tmp = `${this.paths(id).spec}.tmp`;
        await writeFile(tmp, `${JSON.stringify({ id, hash, spec } satisfies SpecFile)}\n`);
        await rename(tmp, this.paths(id).spec);
        action = "created";
      } else {
        const pid = await this.livePid(id);
        if (pid) return { id, action: "running", pid };
      }
      return { id, action, pid: await this.boot(id, spec) };
    });
  }

  private async boot(id: string, spec: MicroVmSpec): Promise<number> {
    const p = this.paths(id);
    const accel = await this.o.accel();
    if (accel.accel === "tcg" && this.tscKhz === undefined)
      this.tscKhz =
        this.o.hostTscKhz ??
        parseCpuMhz(await readFile(join(this.procRoot, "cpuinfo"), "utf8").catch(() => "")) ??
        0;
    const argv = planQemuArgv(
      vmQemuSpec(
        spec,
        accel,
        { qmp: p.qmp, ga: p.ga, console: p.console },
        {
          sandbox: this.o.sandbox ?? true,
          hostTscKhz: this.tscKhz,
          ...(this.o.runAs ? { runAs: this.o.runAs } : {}),
        },
      ),
    );
    await mkdir(this.sockDir, { recursive: true });
    await rm(p.qmp, { force: true });
    await rm(p.ga, { force: true });
    await rm(p.exit, { force: true });
    await writeFile(p.log, "");
    const pid = await this.o.spawner.spawnDetached(argv, { logFile: p.log });
    await writeFile(p.pid, `${pid}\n`);
    const deadline = this.o.clock.now() + (this.o.startTimeoutMs ?? 20_000);
    for (;;) {
      if (!(await this.o.spawner.isAlive(pid))) {
        const why = lastLine(await readFile(p.log, "utf8").catch(() => "")) || "QEMU exited";
        throw new CapsuleError(ErrorCode.CommandFailed, `microVM ${id} did not start: ${why}`, {
          hint: `see ${p.log}`,
          details: { argv },
        });
      }
      try {
        const q = await this.qmp(p.qmp, 1_000);
        try {
          await q.execute("query-status");
        } finally {
          q.close();
        }
        return pid;
      } catch {
        // Not listening yet.
      }
      if (this.o.clock.now() > deadline) {
        this.signal(pid, "SIGKILL");
        throw new CapsuleError(
          ErrorCode.Timeout,
          `microVM ${id}: QMP did not answer within ${this.o.startTimeoutMs ?? 20_000} ms`,
          {
            hint: `see ${p.log}`,
          },
        );
      }
      await this.o.clock.sleep(POLL_MS);
    }
  }

  private signal(pid: number, sig: NodeJS.Signals): void {
    try {
      this.kill(pid, sig);
    } catch {
      // Gone already.
    }
  }

  /** status is VM `id`'s state; CAPSULE_NOT_FOUND when there is no such VM. Read-only. */
  async status(id: string): Promise<ContainerStatus> {
    if (!(await this.has(id))) throw this.notFound(id);
    const pid = await this.livePid(id);
    if (pid) return { id, state: "running", pid };
    const exit = await this.readExit(id);
    return { id, state: "stopped", ...(exit ? { exitCode: exit.exitCode } : {}) };
  }

  private async readExit(id: string): Promise<ExitRecord | undefined> {
    try {
      return JSON.parse(await readFile(this.paths(id).exit, "utf8")) as ExitRecord;
    } catch {
      return undefined;
    }
  }

  /** list returns every VM (running or not), by id. Read-only. */
  async list(): Promise<ContainerInfo[]> {
    let names: string[];
    try {
      names = await readdir(this.o.dataDir);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === "ENOENT") return [];
      throw e;
    }
    const out: ContainerInfo[] = [];
    for (const id of names.sort()) {
      const parsed = parseContainerId(id);
      if (!parsed) continue;
      const s = await this.readSpec(id);
      if (!s) continue;
      const pid = await this.livePid(id);
      out.push({
        id,
        workload: parsed.workload,
        generation: parsed.generation,
        image: s.spec.kernel,
        state: pid ? "running" : "stopped",
        ...(pid ? { pid } : {}),
      });
    }
    return out;
  }

  private async waitGone(pid: number, ms: number): Promise<boolean> {
    const deadline = this.o.clock.now() + ms;
    for (;;) {
      if (!(await this.o.spawner.isAlive(pid))) return true;
      if (this.o.clock.now() >= deadline) return false;
      await this.o.clock.sleep(POLL_MS);
    }
  }

  /**
   * stop shuts VM `id` down: the guest agent's shutdown (the guest flushes and unmounts), then
   * QMP `quit` after `timeoutMs` (default 5000), then SIGKILL. Idempotent.
   */
  stop(id: string, opts: StopOptions = {}): Promise<StopResult> {
    return this.exclusive(id, () => this.stopLocked(id, opts));
  }

  private async stopLocked(id: string, opts: StopOptions): Promise<StopResult> {
    if (!(await this.has(id))) throw this.notFound(id);
    const pid = await this.livePid(id);
    if (!pid) return { stopped: false, killed: false };
    const p = this.paths(id);
    let how = "guest shutdown";
    try {
      await Promise.race([
        this.agent(p.ga).shutdown("powerdown"),
        this.o.clock.sleep(GA_STOP_TIMEOUT_MS).then(() => {
          throw new Error("guest agent did not answer");
        }),
      ]);
    } catch {
      how = "no guest agent";
    }
    // Without an agent nothing asked the guest to stop: straight to QMP quit.
    let gone = await this.waitGone(pid, how === "guest shutdown" ? (opts.timeoutMs ?? 5_000) : 0);
    let killed = false;
    if (!gone) {
      how = "QMP quit";
      try {
        const q = await this.qmp(p.qmp, 1_000);
        try {
          await q.execute("quit").catch(() => undefined);
        } finally {
          q.close();
        }
      } catch {
        // QMP gone: SIGKILL below.
      }
      gone = await this.waitGone(pid, QUIT_WAIT_MS);
    }
    if (!gone) {
      how = "SIGKILL";
      killed = true;
      this.signal(pid, "SIGKILL");
      await this.waitGone(pid, KILL_WAIT_MS);
    }
    const exitCode = killed ? 137 : 0;
    const rec: ExitRecord = {
      exitCode,
      reason: `stopped (${how})`,
      at: new Date(this.o.clock.now()).toISOString(),
    };
    await writeFile(p.exit, `${JSON.stringify(rec)}\n`);
    return { stopped: true, killed, exitCode };
  }

  /** restart stops VM `id` (as {@link stop}) and boots it again with its spec. */
  restart(id: string, opts: StopOptions = {}): Promise<StopResult> {
    return this.exclusive(id, async () => {
      const r = await this.stopLocked(id, opts);
      const s = await this.readSpec(id);
      if (!s) throw this.notFound(id);
      await this.boot(id, s.spec);
      return r;
    });
  }

  /** remove stops VM `id` and deletes its files (console log included unless `keepLogs`). False when there was none. */
  remove(id: string, opts: RemoveOptions = {}): Promise<boolean> {
    return this.exclusive(id, async () => {
      if (!(await this.has(id))) return false;
      await this.stopLocked(id, opts);
      const p = this.paths(id);
      await rm(p.qmp, { force: true });
      await rm(p.ga, { force: true });
      if (opts.keepLogs) {
        for (const f of [p.spec, p.pid, p.exit, p.log]) await rm(f, { force: true });
      } else {
        await rm(this.dir(id), { recursive: true, force: true });
      }
      return true;
    });
  }

  private async mustRun(id: string): Promise<void> {
    if (!(await this.has(id))) throw this.notFound(id);
    if (!(await this.livePid(id)))
      throw new CapsuleError(ErrorCode.FailedPrecondition, `microVM ${id} is not running`, {
        hint: "start it first: capsulectl workload start NAME",
      });
  }

  /** exec runs `argv` in VM `id` through its guest agent; a non-zero exit is a result. */
  async exec(id: string, argv: readonly string[], opts: ExecOptions = {}): Promise<ExecResult> {
    await this.mustRun(id);
    const r = await this.agent(this.paths(id).ga).exec(argv, {
      ...(opts.input !== undefined ? { input: opts.input } : {}),
      timeoutMs: opts.timeoutMs ?? 60_000,
    });
    return { exitCode: r.exitCode, stdout: r.stdout, stderr: r.stderr };
  }

  /**
   * execStream runs `argv` through the guest agent as a session: stdin (when asked for) is
   * collected until it closes and then given to the command; its output comes when it ends.
   * CAPSULE_UNSUPPORTED for a terminal (the guest agent has none).
   */
  async execStream(id: string, argv: readonly string[], opts: ExecStreamOptions = {}): Promise<ExecSession> {
    if (opts.tty)
      throw new CapsuleError(ErrorCode.Unsupported, "a microVM has no terminal exec", {
        hint: "run the command without -t (exec in a microVM goes through its guest agent)",
      });
    await this.mustRun(id);
    return agentSession(this.agent(this.paths(id).ga), argv, opts.stdin === true);
  }

  /** logs yields VM `id`'s serial console from its start; `follow` as for containers. */
  async *logs(id: string, opts: LogsOptions = {}): AsyncGenerator<string> {
    yield* followLog(this.paths(id).console, this.o.clock, opts, async () => {
      if (!(await this.has(id))) throw this.notFound(id);
    });
  }

  private notFound(id: string): CapsuleError {
    return new CapsuleError(ErrorCode.NotFound, `microVM ${id} does not exist`);
  }
}

/** agentSession is an {@link ExecSession} over one guest-agent exec (see {@link MicroVms.execStream}). */
export function agentSession(agent: GuestAgent, argv: readonly string[], stdin: boolean): ExecSession {
  const input: Buffer[] = [];
  let closed = !stdin;
  let killed = false;
  let startNow: () => void = () => undefined;
  const started = new Promise<void>((r) => (startNow = r));
  if (closed) startNow();
  // Killed before stdin closed: the command never runs (it would run on partial input).
  const result = started.then(() =>
    killed
      ? { exitCode: 137, stdout: "", stderr: "" }
      : agent.exec(argv, {
          ...(input.length ? { input: Buffer.concat(input) } : {}),
          timeoutMs: 24 * 3600_000,
        }),
  );
  async function* output() {
    const r = await result;
    if (r.stdout) yield { stream: "stdout" as const, data: Buffer.from(r.stdout) };
    if (r.stderr) yield { stream: "stderr" as const, data: Buffer.from(r.stderr) };
  }
  return {
    execId: `ga-${randomBytes(6).toString("hex")}`,
    pid: 0,
    output: output(),
    write: async (data) => {
      if (!closed) input.push(data);
    },
    closeStdin: async () => {
      if (closed) return;
      closed = true;
      startNow();
    },
    resize: async () => undefined,
    kill: async () => {
      if (!closed) {
        closed = true;
        killed = true;
        startNow();
      }
    },
    exit: result.then((r) => r.exitCode),
  };
}
