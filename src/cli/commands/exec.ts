/**
 * `capsulectl workload exec [-t] [-i] NAME -- CMD...` as a Workloads/ExecStream session: the
 * command's output as it comes, capsulectl's stdin with -i, a terminal with -t (its size, then
 * every SIGWINCH; stdin in raw mode when it is a terminal and -i is given, restored on every
 * way out), and the command's exit code as capsulectl's.
 */
import { CapsuleError, ErrorCode } from "../../errors.js";
import type { ExecOutput__Output } from "../../gen/capsule/v1/ExecOutput.js";
import type { Session } from "../session.js";

/** EXIT_INTERRUPTED is the exit code of a session cut short by Ctrl-C or SIGTERM (128 + SIGINT). */
export const EXIT_INTERRUPTED = 130;

/** INPUT_HIGH_WATER is how many stdin messages may wait to be sent before stdin is paused. */
const INPUT_HIGH_WATER = 64;

/**
 * InputQueue is an async iterable fed from callbacks (stdin, SIGWINCH): push() adds a message,
 * close() ends the iteration once what is queued was taken. `onDrain` runs when the queue
 * falls back under the high-water mark.
 */
export class InputQueue<T> implements AsyncIterable<T> {
  private readonly items: T[] = [];
  private closed = false;
  private wake: (() => void) | undefined;
  /** onDrain runs when the queue falls to half the high-water mark after being over it. */
  onDrain: (() => void) | undefined;

  /** push queues `item` (ignored after close) and says whether the caller may keep pushing. */
  push(item: T): boolean {
    if (this.closed) return false;
    this.items.push(item);
    const w = this.wake;
    this.wake = undefined;
    w?.();
    return this.items.length < INPUT_HIGH_WATER;
  }

  /** close ends the iteration after the queued items. Idempotent. */
  close(): void {
    this.closed = true;
    const w = this.wake;
    this.wake = undefined;
    w?.();
  }

  async *[Symbol.asyncIterator](): AsyncGenerator<T> {
    for (;;) {
      const next = this.items.shift();
      if (next !== undefined) {
        if (this.items.length === INPUT_HIGH_WATER / 2) this.onDrain?.();
        yield next;
        continue;
      }
      if (this.closed) return;
      await new Promise<void>((r) => (this.wake = r));
    }
  }
}

/** ExecStreamOptions: `tty` and `stdin` as the -t and -i flags (unset = off). */
export interface ExecStreamOptions {
  tty?: boolean;
  stdin?: boolean;
}

/**
 * workloadExecStream runs `argv` in NAME on one capsule as an interactive session (see the
 * module comment) and sets the exit code to the command's (1 for one outside 1..255, 130 when
 * interrupted). Ctrl-C (when not in raw mode), SIGTERM and SIGHUP cancel the call, which kills
 * the command on the capsule. Not idempotent: the command runs each time.
 */
export async function workloadExecStream(
  s: Session,
  name: string,
  argv: string[],
  opts: ExecStreamOptions,
): Promise<void> {
  const target = await s.one("workload exec");
  const client = await s.dial(target);
  const { terminal, stdin } = s.io;
  const tty = opts.tty === true;
  const interactive = opts.stdin === true;
  const size = tty ? terminal.size() : undefined;
  const input = new InputQueue<object>();
  input.push({
    start: { name, argv, tty, stdin: interactive, rows: size?.rows ?? 0, cols: size?.cols ?? 0 },
  });
  const ac = new AbortController();
  const undo: (() => void)[] = [];
  const interrupt = () => ac.abort(new CapsuleError(ErrorCode.Internal, "interrupted"));
  undo.push(s.io.onInterrupt(interrupt));
  undo.push(terminal.onTerminate(interrupt));
  if (tty) {
    undo.push(
      terminal.onResize(() => {
        const z = terminal.size();
        if (z) input.push({ resize: z });
      }),
    );
  }
  if (interactive) {
    // Raw mode only for a terminal we read from: keys go to the command, Ctrl-C included.
    if (tty && stdin.isTTY) undo.push(terminal.raw());
    const onData = (d: Buffer | string) => {
      if (!input.push({ stdin: typeof d === "string" ? Buffer.from(d) : d })) stdin.pause();
    };
    const onEnd = () => input.push({ stdinClosed: true });
    input.onDrain = () => stdin.resume();
    stdin.on("data", onData);
    stdin.once("end", onEnd);
    stdin.resume();
    undo.push(() => {
      stdin.removeListener("data", onData);
      stdin.removeListener("end", onEnd);
      // A paused stdin no longer holds the process open.
      stdin.pause();
    });
  }
  let code: number | undefined;
  try {
    const stream = client.callBidiStream<ExecOutput__Output>("Workloads/ExecStream", input, {
      deadlineMs: null,
      signal: ac.signal,
    });
    for await (const m of stream) {
      if (m.msg === "stdout" && m.stdout?.length) s.io.stdout.write(m.stdout);
      else if (m.msg === "stderr" && m.stderr?.length) s.io.stderr.write(m.stderr);
      else if (m.msg === "exitCode") code = m.exitCode;
    }
  } catch (e) {
    if (!ac.signal.aborted) throw e;
    s.exitCode = EXIT_INTERRUPTED;
    return;
  } finally {
    input.close();
    for (const u of undo.reverse()) u();
    client.close();
  }
  if (code === undefined) {
    throw new CapsuleError(
      ErrorCode.Internal,
      `the exec session on ${target.name} ended without an exit code`,
    );
  }
  // A negative code (killed by a signal, as some runtimes report it) still fails.
  s.exitCode = code === 0 ? 0 : code > 0 && code < 256 ? code : 1;
}
