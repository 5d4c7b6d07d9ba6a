/**
 * QMP, the QEMU Machine Protocol, over QEMU's unix socket (`-chardev socket,...,server=on,wait=off`
 * + `-mon chardev=...,mode=control`): {@link connectQmp} returns a {@link Qmp}, {@link FakeQmp}
 * is the test double.
 *
 * Wire format (QEMU 7.2): JSON objects, each ended by CRLF. On connect QEMU sends a greeting
 * `{"QMP": {...}}`; the client must send `qmp_capabilities` before any other command. Each
 * command gets exactly one answer, `{"return": ...}` or `{"error": {"class", "desc"}}`, in the
 * order the commands were sent, echoing the command's `id`. Asynchronous events
 * `{"event", "data", "timestamp"}` may arrive at any time, also between a command and its answer.
 * A chardev socket server serves one client at a time: a second client's connect succeeds at the
 * kernel but gets no greeting until the first one leaves (so: a timeout, never a refusal).
 *
 * {@link JsonChannel} (the framing: JSON objects split by brace counting, the 0xFF byte as a
 * parser reset) is shared with the guest agent client (guest-agent.ts), which speaks the same
 * protocol without greeting.
 *
 * Errors: a refused or missing socket is CAPSULE_UNREACHABLE, a deadline CAPSULE_TIMEOUT, an
 * `{"error"}` answer a {@link QmpError} (CAPSULE_COMMAND_FAILED; CAPSULE_UNSUPPORTED for the
 * class `CommandNotFound`), each message naming the command.
 */
import { createConnection, type Socket } from "node:net";
import { CapsuleError, ErrorCode, type ErrorCodeValue } from "../../errors.js";

/** QMP_CONNECT_TIMEOUT_MS bounds {@link connectQmp} (connect, greeting, capabilities) when unset. */
export const QMP_CONNECT_TIMEOUT_MS = 5_000;

/** QMP_COMMAND_TIMEOUT_MS bounds one {@link Qmp.execute} when its `timeoutMs` is unset. */
export const QMP_COMMAND_TIMEOUT_MS = 30_000;

/** QmpEvent is one asynchronous event (`SHUTDOWN`, `STOP`, `DEVICE_DELETED`, ...). */
export interface QmpEvent {
  event: string;
  data?: unknown;
  /** timestamp is QEMU's host time of the event; unset on fakes. */
  timestamp?: { seconds: number; microseconds: number };
}

/** QmpExecuteOptions: all optional. */
export interface QmpExecuteOptions {
  /** timeoutMs bounds the call from the moment it is made (queueing included); unset = {@link QMP_COMMAND_TIMEOUT_MS}. */
  timeoutMs?: number;
}

/**
 * Qmp is a QMP session. Commands are serialized per connection: concurrent calls queue and go on
 * the wire one at a time, in call order.
 */
export interface Qmp {
  /**
   * execute runs one command and resolves with its `return` value. Throws a {@link QmpError}
   * for an `{"error"}` answer, CAPSULE_TIMEOUT after `timeoutMs` (the connection stays usable:
   * the late answer is recognised by its id and dropped), CAPSULE_UNREACHABLE when the
   * connection closes first (QEMU exited; note that `quit` may close before it answers).
   */
  execute<T = unknown>(command: string, args?: Record<string, unknown>, opts?: QmpExecuteOptions): Promise<T>;
  /**
   * events yields the asynchronous events received since the connection was made (the last
   * {@link QMP_EVENT_BUFFER} are kept until read), then new ones as they come; it ends when the
   * connection closes. Events are consumed: two iterators share one stream.
   */
  events(): AsyncIterable<QmpEvent>;
  /** close drops the connection; pending calls fail with CAPSULE_UNREACHABLE. Idempotent. */
  close(): void;
}

/** QMP_EVENT_BUFFER is how many unread events a connection keeps (older ones are dropped). */
export const QMP_EVENT_BUFFER = 256;

/** QmpError is an `{"error": {"class", "desc"}}` answer from QEMU or qemu-ga. */
export class QmpError extends CapsuleError {
  override name = "QmpError";
  /** command is what was executed. */
  readonly command: string;
  /** errorClass is QEMU's error class (`GenericError`, `CommandNotFound`, `DeviceNotFound`, ...). */
  readonly errorClass: string;
  /** desc is QEMU's human-readable description. */
  readonly desc: string;

  constructor(command: string, errorClass: string, desc: string, what = "QMP") {
    const code: ErrorCodeValue =
      errorClass === "CommandNotFound" ? ErrorCode.Unsupported : ErrorCode.CommandFailed;
    super(code, `${what} ${command}: ${desc}${errorClass !== "GenericError" ? ` (${errorClass})` : ""}`, {
      details: { command, errorClass, desc },
    });
    this.command = command;
    this.errorClass = errorClass;
    this.desc = desc;
  }
}

/** timeoutError is the CAPSULE_TIMEOUT every client here throws. */
export function timeoutError(message: string, hint?: string): CapsuleError {
  return new CapsuleError(ErrorCode.Timeout, message, { hint });
}

/** unreachableError is the CAPSULE_UNREACHABLE every client here throws. */
export function unreachableError(message: string, hint?: string, cause?: unknown): CapsuleError {
  return new CapsuleError(ErrorCode.Unreachable, message, { hint, cause });
}

type Json = Record<string, unknown>;

/**
 * JsonChannel frames a byte stream into JSON objects: brace counting outside strings (what
 * QEMU's own streamer does, so no reliance on line ends), bytes between objects skipped, and
 * the byte 0xFF (never valid in UTF-8 JSON) resetting the parser, as the guest agent's
 * `guest-sync-delimited` prescribes. Internal to the QMP and guest agent clients.
 */
export class JsonChannel {
  private chunks: Buffer[] = [];
  private partial: Buffer = Buffer.alloc(0);
  private depth = 0;
  private inString = false;
  private escaped = false;
  private queue: Json[] = [];
  private waiter: { resolve: (m: Json) => void; reject: (e: Error) => void } | undefined;
  private closeError: Error | undefined;
  /** closed resolves when the connection has closed (either side). */
  readonly closed: Promise<void>;
  /** onEvent receives every `{"event": ...}` message; they never reach {@link next}. */
  onEvent: ((ev: QmpEvent) => void) | undefined;

  private constructor(
    private readonly sock: Socket,
    /** what names the peer in messages ("QMP", "guest agent"). */
    readonly what: string,
    readonly path: string,
  ) {
    sock.on("data", (d: Buffer) => this.feed(d));
    this.closed = new Promise((resolve) => {
      sock.once("close", () => {
        this.fail(unreachableError(`${what} connection to ${path} closed`, "did QEMU exit?"));
        resolve();
      });
    });
    sock.on("error", (e) => this.fail(unreachableError(`${what} ${path}: ${e.message}`, undefined, e)));
  }

  /** connect opens the unix socket; refusal and deadline become CapsuleErrors with hints. */
  static connect(path: string, what: string, timeoutMs: number): Promise<JsonChannel> {
    return new Promise((resolve, reject) => {
      const sock = createConnection(path);
      const timer = setTimeout(() => {
        sock.destroy();
        reject(timeoutError(`${what} ${path}: connect timed out after ${timeoutMs} ms`));
      }, timeoutMs);
      sock.once("connect", () => {
        clearTimeout(timer);
        sock.removeAllListeners("error");
        resolve(new JsonChannel(sock, what, path));
      });
      sock.once("error", (e: NodeJS.ErrnoException) => {
        clearTimeout(timer);
        const hint =
          e.code === "ENOENT" || e.code === "ECONNREFUSED"
            ? `is the VM running? nothing listens on ${path}`
            : undefined;
        reject(unreachableError(`${what} ${path}: ${e.code ?? e.message}`, hint, e));
      });
    });
  }

  /** isClosed says whether the connection is gone. */
  get isClosed(): boolean {
    return this.closeError !== undefined;
  }

  /** send writes one object (or raw bytes, such as the 0xFF sync byte). */
  send(msg: Json | Buffer): void {
    if (this.closeError) throw this.closeError;
    this.sock.write(Buffer.isBuffer(msg) ? msg : JSON.stringify(msg) + "\n");
  }

  /** next resolves with the next non-event object; rejects on close or after `timeoutMs`. */
  next(timeoutMs: number, deadlineMessage: () => CapsuleError): Promise<Json> {
    const q = this.queue.shift();
    if (q) return Promise.resolve(q);
    if (this.closeError) return Promise.reject(this.closeError);
    if (this.waiter) return Promise.reject(new Error("JsonChannel.next: one reader at a time"));
    return new Promise((resolve, reject) => {
      const timer = setTimeout(
        () => {
          this.waiter = undefined;
          reject(deadlineMessage());
        },
        Math.max(0, timeoutMs),
      );
      this.waiter = {
        resolve: (m) => {
          clearTimeout(timer);
          resolve(m);
        },
        reject: (e) => {
          clearTimeout(timer);
          reject(e);
        },
      };
    });
  }

  /** close destroys the socket; idempotent. */
  close(): void {
    this.sock.destroy();
  }

  private fail(e: Error): void {
    if (this.closeError) return;
    this.closeError = e;
    const w = this.waiter;
    this.waiter = undefined;
    w?.reject(e);
  }

  private deliver(m: Json): void {
    if (typeof m.event === "string") {
      this.onEvent?.(m as unknown as QmpEvent);
      return;
    }
    const w = this.waiter;
    if (w) {
      this.waiter = undefined;
      w.resolve(m);
    } else this.queue.push(m);
  }

  private feed(d: Buffer): void {
    let start = this.depth > 0 ? 0 : -1;
    for (let i = 0; i < d.length; i++) {
      const c = d[i]!;
      if (c === 0xff) {
        // Parser reset: drop whatever was half-read, including anything queued before it.
        this.partial = Buffer.alloc(0);
        this.chunks = [];
        this.depth = 0;
        this.inString = false;
        this.escaped = false;
        this.queue = [];
        start = -1;
        continue;
      }
      if (this.depth === 0) {
        if (c === 0x7b /* { */) {
          this.depth = 1;
          start = i;
        }
        continue; // whitespace or stray bytes between objects
      }
      if (this.inString) {
        if (this.escaped) this.escaped = false;
        else if (c === 0x5c /* \ */) this.escaped = true;
        else if (c === 0x22 /* " */) this.inString = false;
        continue;
      }
      if (c === 0x22) this.inString = true;
      else if (c === 0x7b || c === 0x5b) this.depth++;
      else if (c === 0x7d || c === 0x5d) {
        this.depth--;
        if (this.depth === 0) {
          const text = Buffer.concat([this.partial, d.subarray(Math.max(start, 0), i + 1)]).toString("utf8");
          this.partial = Buffer.alloc(0);
          start = -1;
          let m: unknown;
          try {
            m = JSON.parse(text);
          } catch {
            continue; // garbage (e.g. a stale half object): skip it
          }
          if (m && typeof m === "object" && !Array.isArray(m)) this.deliver(m as Json);
        }
      }
    }
    if (this.depth > 0) this.partial = Buffer.concat([this.partial, d.subarray(Math.max(start, 0))]);
  }
}

/** errorOf returns QEMU's error answer, if the message is one. */
export function errorOf(m: Json): { class: string; desc: string } | undefined {
  const e = m.error as { class?: unknown; desc?: unknown } | undefined;
  if (!e || typeof e !== "object") return undefined;
  return { class: String(e.class ?? "GenericError"), desc: String(e.desc ?? "unknown error") };
}

/** RealQmp is the socket-backed {@link Qmp}; build it with {@link connectQmp}. */
class RealQmp implements Qmp {
  private tail: Promise<unknown> = Promise.resolve();
  private nextId = 1;
  private buffered: QmpEvent[] = [];
  private wake: (() => void) | undefined;

  constructor(
    private readonly ch: JsonChannel,
    /** greeting is QEMU's `QMP` object (version, capabilities). */
    readonly greeting: Json,
  ) {
    ch.onEvent = (ev) => {
      this.buffered.push(ev);
      if (this.buffered.length > QMP_EVENT_BUFFER) this.buffered.shift();
      this.wakeUp();
    };
    void ch.closed.then(() => this.wakeUp());
  }

  /** closed resolves when the connection has closed (QEMU exited or {@link close}). */
  get closed(): Promise<void> {
    return this.ch.closed;
  }

  execute<T = unknown>(
    command: string,
    args?: Record<string, unknown>,
    opts: QmpExecuteOptions = {},
  ): Promise<T> {
    const timeoutMs = opts.timeoutMs ?? QMP_COMMAND_TIMEOUT_MS;
    const deadline = Date.now() + timeoutMs;
    const id = `capsule-${this.nextId++}`;
    const late = () =>
      timeoutError(
        `QMP ${command}: no answer within ${timeoutMs} ms`,
        "QEMU may be busy or hung; check its process and the serial log",
      );
    const run = async (): Promise<T> => {
      if (Date.now() >= deadline) throw late();
      this.ch.send({ execute: command, ...(args ? { arguments: args } : {}), id });
      for (;;) {
        const m = await this.ch.next(deadline - Date.now(), late);
        if (m.id !== undefined && m.id !== id) continue; // a late answer to a timed-out call
        const err = errorOf(m);
        if (err) throw new QmpError(command, err.class, err.desc);
        if ("return" in m) return m.return as T;
      }
    };
    const p = this.tail.then(run, run);
    this.tail = p.catch(() => undefined);
    return p;
  }

  async *events(): AsyncIterable<QmpEvent> {
    for (;;) {
      const ev = this.buffered.shift();
      if (ev) {
        yield ev;
        continue;
      }
      if (this.ch.isClosed) return;
      await new Promise<void>((r) => (this.wake = r));
    }
  }

  close(): void {
    this.ch.close();
  }

  private wakeUp(): void {
    const w = this.wake;
    this.wake = undefined;
    w?.();
  }
}

/** ConnectQmpOptions: all optional. */
export interface ConnectQmpOptions {
  /** timeoutMs bounds connect + greeting + `qmp_capabilities`; unset = {@link QMP_CONNECT_TIMEOUT_MS}. */
  timeoutMs?: number;
}

/**
 * connectQmp connects to QEMU's QMP socket, reads the greeting and leaves negotiation mode with
 * `qmp_capabilities`, all within `timeoutMs`. Throws CAPSULE_UNREACHABLE (socket missing or
 * refused: QEMU is not running) or CAPSULE_TIMEOUT (no greeting: QEMU hung, or another client
 * holds the socket).
 */
export async function connectQmp(socketPath: string, opts: ConnectQmpOptions = {}): Promise<Qmp> {
  const timeoutMs = opts.timeoutMs ?? QMP_CONNECT_TIMEOUT_MS;
  const deadline = Date.now() + timeoutMs;
  const ch = await JsonChannel.connect(socketPath, "QMP", timeoutMs);
  try {
    const late = () =>
      timeoutError(
        `QMP ${socketPath}: no greeting within ${timeoutMs} ms`,
        "QEMU serves one QMP client at a time: is another client connected? Otherwise QEMU is hung",
      );
    const hello = await ch.next(deadline - Date.now(), late);
    if (!hello.QMP || typeof hello.QMP !== "object")
      throw new CapsuleError(
        ErrorCode.Internal,
        `QMP ${socketPath}: unexpected greeting ${JSON.stringify(hello)}`,
      );
    const qmp = new RealQmp(ch, hello.QMP as Json);
    await qmp.execute("qmp_capabilities", undefined, { timeoutMs: Math.max(1, deadline - Date.now()) });
    return qmp;
  } catch (e) {
    ch.close();
    throw e;
  }
}

/** FakeQmpHandler answers one command: return the `return` value, or throw (e.g. {@link QmpError}). */
export type FakeQmpHandler = (args: Record<string, unknown> | undefined) => unknown;

/**
 * FakeQmp is a scripted {@link Qmp} for unit tests. Every call is recorded as canonical text in
 * {@link FakeQmp.commands}: the command, then its arguments as JSON when given
 * (`device_del {"id":"vol-data"}`). Unscripted commands fail as QEMU would
 * (`CommandNotFound`), except `qmp_capabilities` (answers `{}`).
 */
export class FakeQmp implements Qmp {
  readonly commands: string[] = [];
  /** isClosed turns true on {@link close}; later calls fail with CAPSULE_UNREACHABLE. */
  isClosed = false;
  private handlers = new Map<string, FakeQmpHandler>();
  private buffered: QmpEvent[] = [];
  private wake: (() => void) | undefined;

  /** on scripts a command: a handler, or a fixed `return` value. The last one set wins. */
  on(command: string, answer: FakeQmpHandler | unknown): this {
    this.handlers.set(
      command,
      typeof answer === "function" ? (answer as FakeQmpHandler) : () => structuredClone(answer),
    );
    return this;
  }

  /** fail scripts a command to answer `{"error": {"class", "desc"}}`. */
  fail(command: string, desc: string, errorClass = "GenericError"): this {
    return this.on(command, () => {
      throw new QmpError(command, errorClass, desc);
    });
  }

  /** emit queues an asynchronous event for {@link events}. */
  emit(ev: QmpEvent): this {
    this.buffered.push(ev);
    this.wakeUp();
    return this;
  }

  async execute<T = unknown>(command: string, args?: Record<string, unknown>): Promise<T> {
    this.commands.push(args ? `${command} ${JSON.stringify(args)}` : command);
    if (this.isClosed) throw unreachableError(`QMP connection closed`, "did QEMU exit?");
    const h = this.handlers.get(command) ?? (command === "qmp_capabilities" ? () => ({}) : undefined);
    if (!h) throw new QmpError(command, "CommandNotFound", `The command ${command} has not been found`);
    return (await h(args)) as T;
  }

  async *events(): AsyncIterable<QmpEvent> {
    for (;;) {
      const ev = this.buffered.shift();
      if (ev) {
        yield ev;
        continue;
      }
      if (this.isClosed) return;
      await new Promise<void>((r) => (this.wake = r));
    }
  }

  close(): void {
    this.isClosed = true;
    this.wakeUp();
  }

  private wakeUp(): void {
    const w = this.wake;
    this.wake = undefined;
    w?.();
  }
}
