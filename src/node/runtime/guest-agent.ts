/**
 * The qemu-guest-agent client: {@link guestAgent} talks to qemu-ga through the unix socket of
 * QEMU's chardev (`-chardev socket,id=ga0,path=<gaSocket>,server=on,wait=off` behind the
 * virtio-serial port `org.qemu.guest_agent.0`); {@link FakeGuestAgent} is the test double.
 *
 * The protocol is QMP's (see qmp.ts) without a greeting or capabilities negotiation. The chardev
 * serves one client at a time and the agent keeps no per-client state, so each call here
 * connects, resynchronises, runs its commands and closes; calls on one {@link GuestAgent} are
 * serialized. Resync, as the QGA docs prescribe: send the byte 0xFF (the agent drops whatever
 * half-read JSON a previous client left), then `guest-sync-delimited` with a random id; the
 * agent answers with 0xFF followed by `{"return": id}`, and everything before that answer
 * (stale answers to a previous client's commands) is dropped.
 *
 * Errors: as qmp.ts (CAPSULE_UNREACHABLE: socket missing/refused or the agent went away;
 * CAPSULE_TIMEOUT: no answer, e.g. qemu-ga is not running in the guest yet; QmpError for an
 * `{"error"}` answer, e.g. CAPSULE_UNSUPPORTED when guest-exec is not built in or disabled).
 */
import { randomInt } from "node:crypto";
import { CapsuleError, ErrorCode } from "../../errors.js";
import { errorOf, JsonChannel, QmpError, timeoutError, unreachableError } from "./qmp.js";

/** GA_CONNECT_TIMEOUT_MS bounds connect + resync when `connectTimeoutMs` is unset. */
export const GA_CONNECT_TIMEOUT_MS = 5_000;
/** GA_COMMAND_TIMEOUT_MS bounds ping and each command when `timeoutMs` is unset. */
export const GA_COMMAND_TIMEOUT_MS = 10_000;
/** GA_EXEC_TIMEOUT_MS bounds {@link GuestAgent.exec} (start to exit) when `timeoutMs` is unset. */
export const GA_EXEC_TIMEOUT_MS = 60_000;
/** GA_SHUTDOWN_WAIT_MS is how long {@link GuestAgent.shutdown} waits for an error answer. */
export const GA_SHUTDOWN_WAIT_MS = 3_000;

/** GuestExecOptions: all optional. */
export interface GuestExecOptions {
  /** input is written to the process's stdin, which is then closed; unset = no stdin. */
  input?: string | Buffer;
  /** env is the process's whole environment (`KEY=value` entries); unset = qemu-ga's own. */
  env?: readonly string[];
  /** timeoutMs bounds start to exit; unset = {@link GA_EXEC_TIMEOUT_MS}. */
  timeoutMs?: number;
}

/** GuestExecResult is a finished guest process. */
export interface GuestExecResult {
  /** exitCode is the exit status; 128 + signal when a signal ended it. */
  exitCode: number;
  /** stdout and stderr are the captured output, decoded as UTF-8. */
  stdout: string;
  stderr: string;
  /** signal is the signal that ended the process; unset when it exited. */
  signal?: number;
  /** truncated says qemu-ga cut stdout or stderr (it keeps at most 16 MiB each). */
  truncated?: boolean;
  /** pid is the guest process id. */
  pid: number;
}

/** GuestAgent is qemu-ga in one VM. Every method is one connection; calls are serialized. */
export interface GuestAgent {
  /** ping resolves once the agent answers `guest-ping`. */
  ping(opts?: { timeoutMs?: number }): Promise<void>;
  /**
   * exec runs argv[0] (searched in the guest's PATH) with `guest-exec` (output captured, input
   * given as base64), then polls `guest-exec-status` with backoff until it exits. On timeout it
   * throws CAPSULE_TIMEOUT; the process keeps running in the guest (the error names its pid).
   */
  exec(argv: readonly string[], opts?: GuestExecOptions): Promise<GuestExecResult>;
  /**
   * shutdown asks the guest to power down, halt or reboot (`guest-shutdown`, default
   * `powerdown`). qemu-ga answers only on failure, so EOF or silence after sending is success;
   * an error answer throws. Resolves when the request is delivered, not when QEMU has exited.
   */
  shutdown(mode?: "powerdown" | "halt" | "reboot"): Promise<void>;
  /** fsFreeze freezes the guest's filesystems (`guest-fsfreeze-freeze`); resolves with how many. */
  fsFreeze?(): Promise<number>;
  /** fsThaw thaws them (`guest-fsfreeze-thaw`); resolves with how many. */
  fsThaw?(): Promise<number>;
}

/** GuestAgentOptions: all optional. */
export interface GuestAgentOptions {
  /** connectTimeoutMs bounds connect + resync per call; unset = {@link GA_CONNECT_TIMEOUT_MS}. */
  connectTimeoutMs?: number;
  /** pollMs is the first guest-exec-status interval (it grows 1.5x up to `maxPollMs`); unset = 20. */
  pollMs?: number;
  /** maxPollMs caps the poll interval; unset = 500. */
  maxPollMs?: number;
  /** shutdownWaitMs is how long shutdown waits for an error answer; unset = {@link GA_SHUTDOWN_WAIT_MS}. */
  shutdownWaitMs?: number;
}

type Json = Record<string, unknown>;

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Session is one connection after resync. */
class Session {
  private nextId = 1;
  constructor(private readonly ch: JsonChannel) {}

  static async open(path: string, timeoutMs: number): Promise<Session> {
    const deadline = Date.now() + timeoutMs;
    const ch = await JsonChannel.connect(path, "guest agent", timeoutMs);
    try {
      const token = randomInt(1, 2 ** 31 - 1);
      ch.send(Buffer.from([0xff]));
      ch.send({ execute: "guest-sync-delimited", arguments: { id: token } });
      const late = () =>
        timeoutError(
          `guest agent ${path}: no answer to guest-sync-delimited within ${timeoutMs} ms`,
          "is qemu-ga running in the guest? It starts late in boot; retry, or read the serial log",
        );
      for (;;) {
        const m = await ch.next(deadline - Date.now(), late);
        if (m.return === token) return new Session(ch);
        // Anything else is a stale answer meant for a previous client.
      }
    } catch (e) {
      ch.close();
      throw e;
    }
  }

  /** call runs one command within `timeoutMs` and returns its `return` value. */
  async call<T>(command: string, args: Json | undefined, timeoutMs: number): Promise<T> {
    const id = this.nextId++;
    this.ch.send({ execute: command, ...(args ? { arguments: args } : {}), id });
    const deadline = Date.now() + timeoutMs;
    const late = () =>
      timeoutError(`guest agent ${command}: no answer within ${timeoutMs} ms`, "is the guest hung or busy?");
    for (;;) {
      const m = await this.ch.next(deadline - Date.now(), late);
      if (m.id !== undefined && m.id !== id) continue;
      const err = errorOf(m);
      if (err) throw new QmpError(command, err.class, err.desc, "guest agent");
      if ("return" in m) return m.return as T;
    }
  }

  /** sendOnly writes a command whose success has no answer (guest-shutdown). */
  sendOnly(command: string, args: Json | undefined): void {
    this.ch.send({ execute: command, ...(args ? { arguments: args } : {}) });
  }

  /** waitAnswer resolves with the next message, or undefined on close or silence. */
  async waitAnswer(timeoutMs: number): Promise<Json | undefined> {
    try {
      return await this.ch.next(timeoutMs, () => timeoutError("silence"));
    } catch {
      return undefined;
    }
  }

  close(): void {
    this.ch.close();
  }
}

interface ExecStatus {
  exited: boolean;
  exitcode?: number;
  signal?: number;
  "out-data"?: string;
  "err-data"?: string;
  "out-truncated"?: boolean;
  "err-truncated"?: boolean;
}

/** RealGuestAgent is the socket-backed {@link GuestAgent}; build it with {@link guestAgent}. */
class RealGuestAgent implements GuestAgent {
  private tail: Promise<unknown> = Promise.resolve();
  private readonly connectTimeoutMs: number;
  private readonly pollMs: number;
  private readonly maxPollMs: number;
  private readonly shutdownWaitMs: number;

  constructor(
    private readonly path: string,
    opts: GuestAgentOptions,
  ) {
    this.connectTimeoutMs = opts.connectTimeoutMs ?? GA_CONNECT_TIMEOUT_MS;
    this.pollMs = opts.pollMs ?? 20;
    this.maxPollMs = opts.maxPollMs ?? 500;
    this.shutdownWaitMs = opts.shutdownWaitMs ?? GA_SHUTDOWN_WAIT_MS;
  }

  /** session runs `fn` on a fresh, resynchronised connection, one at a time, and closes it. */
  private session<T>(fn: (s: Session) => Promise<T>): Promise<T> {
    const run = async () => {
      const s = await Session.open(this.path, this.connectTimeoutMs);
      try {
        return await fn(s);
      } finally {
        s.close();
      }
    };
    const p = this.tail.then(run, run);
    this.tail = p.catch(() => undefined);
    return p;
  }

  ping(opts: { timeoutMs?: number } = {}): Promise<void> {
    return this.session(async (s) => {
      await s.call("guest-ping", undefined, opts.timeoutMs ?? GA_COMMAND_TIMEOUT_MS);
    });
  }

  exec(argv: readonly string[], opts: GuestExecOptions = {}): Promise<GuestExecResult> {
    const [path, ...arg] = argv;
    if (!path) return Promise.reject(new CapsuleError(ErrorCode.InvalidArgument, "exec: empty argv"));
    const timeoutMs = opts.timeoutMs ?? GA_EXEC_TIMEOUT_MS;
    return this.session(async (s) => {
      const deadline = Date.now() + timeoutMs;
      const left = () => Math.max(1, Math.min(GA_COMMAND_TIMEOUT_MS, deadline - Date.now()));
      const input = opts.input === undefined ? undefined : Buffer.from(opts.input).toString("base64");
      const { pid } = await s.call<{ pid: number }>(
        "guest-exec",
        {
          path,
          arg,
          ...(opts.env ? { env: [...opts.env] } : {}),
          ...(input !== undefined ? { "input-data": input } : {}),
          "capture-output": true,
        },
        left(),
      );
      const stillRunning = (cause?: unknown) =>
        new CapsuleError(
          ErrorCode.Timeout,
          `guest exec ${argv.join(" ")}: not finished after ${timeoutMs} ms; it keeps running in the guest as pid ${pid}`,
          {
            hint: `give it more time, or end it: exec kill ${pid}`,
            details: { pid, argv: [...argv] },
            cause,
          },
        );
      let wait = this.pollMs;
      for (;;) {
        let st: ExecStatus;
        try {
          st = await s.call<ExecStatus>("guest-exec-status", { pid }, left());
        } catch (e) {
          if (e instanceof CapsuleError && e.code === ErrorCode.Timeout && Date.now() >= deadline)
            throw stillRunning(e);
          throw e;
        }
        if (st.exited) {
          const out = Buffer.from(st["out-data"] ?? "", "base64").toString("utf8");
          const err = Buffer.from(st["err-data"] ?? "", "base64").toString("utf8");
          return {
            pid,
            exitCode: st.exitcode ?? (st.signal !== undefined ? 128 + st.signal : -1),
            stdout: out,
            stderr: err,
            ...(st.signal !== undefined ? { signal: st.signal } : {}),
            ...(st["out-truncated"] || st["err-truncated"] ? { truncated: true } : {}),
          };
        }
        const now = Date.now();
        if (now >= deadline) throw stillRunning();
        await sleep(Math.min(wait, deadline - now));
        wait = Math.min(this.maxPollMs, Math.ceil(wait * 1.5));
      }
    });
  }

  shutdown(mode: "powerdown" | "halt" | "reboot" = "powerdown"): Promise<void> {
    return this.session(async (s) => {
      s.sendOnly("guest-shutdown", { mode });
      // Success has no answer: the guest goes down (EOF) or stays silent while it does.
      const m = await s.waitAnswer(this.shutdownWaitMs);
      const err = m && errorOf(m);
      if (err) throw new QmpError("guest-shutdown", err.class, err.desc, "guest agent");
    });
  }

  fsFreeze(): Promise<number> {
    return this.session((s) => s.call<number>("guest-fsfreeze-freeze", undefined, GA_COMMAND_TIMEOUT_MS));
  }

  fsThaw(): Promise<number> {
    return this.session((s) => s.call<number>("guest-fsfreeze-thaw", undefined, GA_COMMAND_TIMEOUT_MS));
  }
}

/**
 * guestAgent returns a client for the qemu-ga behind `socketPath`. Nothing is opened until a
 * method is called (each call is its own connection), so it is cheap and never fails itself.
 */
export function guestAgent(socketPath: string, opts: GuestAgentOptions = {}): GuestAgent {
  return new RealGuestAgent(socketPath, opts);
}

/** FakeExecHandler answers a faked exec; unset fields default to exit 0 and no output. */
export type FakeExecHandler = (
  argv: readonly string[],
  opts: GuestExecOptions,
) => Partial<GuestExecResult> | undefined | Promise<Partial<GuestExecResult> | undefined>;

/**
 * FakeGuestAgent is a scripted {@link GuestAgent} for unit tests. Every call is recorded as
 * canonical text in {@link FakeGuestAgent.calls}: `ping`, `exec <argv joined by spaces>` (plus
 * ` <<<input` when input was given), `shutdown <mode>`, `fsfreeze`, `fsthaw`.
 * Unscripted execs exit 0 with no output; {@link FakeGuestAgent.down} makes every call fail
 * with CAPSULE_UNREACHABLE, as a VM without a running agent would.
 */
export class FakeGuestAgent implements GuestAgent {
  readonly calls: string[] = [];
  /** down: when true, every call fails with CAPSULE_UNREACHABLE (no agent). */
  down = false;
  /** shutdownMode is the last mode {@link shutdown} was asked for; unset = never. */
  shutdownMode: string | undefined;
  /** frozen says whether the filesystems are frozen. */
  frozen = false;
  private handlers: FakeExecHandler[] = [];

  /** onExec adds a handler; the most recently added one that answers wins. */
  onExec(handler: FakeExecHandler): this {
    this.handlers.unshift(handler);
    return this;
  }

  private check(): void {
    if (this.down) throw unreachableError("guest agent: ECONNREFUSED", "is the VM running?");
  }

  async ping(): Promise<void> {
    this.calls.push("ping");
    this.check();
  }

  async exec(argv: readonly string[], opts: GuestExecOptions = {}): Promise<GuestExecResult> {
    this.calls.push(
      `exec ${argv.join(" ")}${opts.input !== undefined ? ` <<<${Buffer.from(opts.input).toString("utf8")}` : ""}`,
    );
    this.check();
    let res: Partial<GuestExecResult> = {};
    for (const h of this.handlers) {
      const got = await h(argv, opts);
      if (got) {
        res = got;
        break;
      }
    }
    return { pid: 1000 + this.calls.length, exitCode: 0, stdout: "", stderr: "", ...res };
  }

  async shutdown(mode: "powerdown" | "halt" | "reboot" = "powerdown"): Promise<void> {
    this.calls.push(`shutdown ${mode}`);
    this.check();
    this.shutdownMode = mode;
  }

  async fsFreeze(): Promise<number> {
    this.calls.push("fsfreeze");
    this.check();
    this.frozen = true;
    return 1;
  }

  async fsThaw(): Promise<number> {
    this.calls.push("fsthaw");
    this.check();
    this.frozen = false;
    return 1;
  }
}
