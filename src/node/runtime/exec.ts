/**
 * Interactive exec: a process started in a running container through containerd's API (see
 * containerd-api.ts for why not `ctr`), its stdio through FIFOs (exec-pipes.ts), streamed both
 * ways while it runs.
 *
 * Phases, each undone when a later one fails: spec (the container's process, our argv, the
 * terminal size) → pipes → Exec (created) → Wait (armed before the start, so no exit is
 * missed) → Start → attach the output. The session ends when the process exited and its output
 * is drained; the exec process is then deleted from containerd and the FIFOs removed, whatever
 * happened. A session whose caller goes away is ended with SIGKILL ({@link ExecSession.kill}).
 */
import type { Readable } from "node:stream";
import { CapsuleError, ErrorCode, invalidArgument } from "../../errors.js";
import { type ConsoleSize, type ContainerdApi, execProcessSpec, SIGKILL } from "./containerd-api.js";
import type { ExecPipes, PipeMaker } from "./exec-pipes.js";

/**
 * ExecStreamOptions: all optional. `tty` (unset = false) gives the process a terminal (stdout
 * and stderr are then one stream); `stdin` (unset = false) opens its stdin for
 * {@link ExecSession.write}, else it reads EOF (no terminal) or nothing ever (terminal); `size`
 * is the terminal's initial size (unset or zero = runc's 0x0).
 */
export interface ExecStreamOptions {
  tty?: boolean;
  stdin?: boolean;
  size?: ConsoleSize | undefined;
}

/** ExecOutput is one chunk of a process's output; with a terminal every chunk is "stdout". */
export interface ExecOutput {
  stream: "stdout" | "stderr";
  data: Buffer;
}

/** ExecSession is one running exec process. */
export interface ExecSession {
  execId: string;
  /** pid is the process's pid in the capsule's pid namespace. */
  pid: number;
  /** output yields the process's output as it comes and ends with it. It has one consumer, who must read it for the session to end. */
  output: AsyncIterable<ExecOutput>;
  /** write sends `data` to the process's stdin and resolves when it was taken (backpressure); ignored without stdin or after closeStdin. */
  write(data: Buffer): Promise<void>;
  /** closeStdin ends the process's stdin (it reads EOF; a terminal hangs up). Idempotent. */
  closeStdin(): Promise<void>;
  /** resize sets the terminal's size; ignored without a terminal. */
  resize(size: ConsoleSize): Promise<void>;
  /** kill ends the process with SIGKILL unless it exited. Idempotent. */
  kill(): Promise<void>;
  /** exit resolves with the exit code once the process exited, its output ended and the exec was cleaned up. */
  exit: Promise<number>;
}

/** ExecDeps are one session's seams: the API connection (closed at the end), the FIFO maker and the exec id. */
export interface ExecDeps {
  api: ContainerdApi;
  pipes: PipeMaker;
  execId: string;
  /** drainMs: after the exit, output that stops moving for this long is cut (a background child holding it open); unset = 2000. */
  drainMs?: number;
}

const HIGH_WATER = 256 * 1024;

/**
 * OutputMerger interleaves stdout and stderr into one async iterable, in arrival order, pausing
 * the sources while more than {@link HIGH_WATER} bytes wait for the consumer.
 */
class OutputMerger {
  private readonly queue: ExecOutput[] = [];
  private queued = 0;
  private open: number;
  private wake: (() => void) | undefined;
  /** lastMove is when data last arrived or was taken. */
  lastMove = Date.now();
  readonly done: Promise<void>;
  private finish!: () => void;

  constructor(private readonly sources: [Readable, ExecOutput["stream"]][]) {
    this.open = sources.length;
    this.done = new Promise((r) => (this.finish = r));
    for (const [s, stream] of sources) {
      let ended = false;
      const end = () => {
        if (ended) return;
        ended = true;
        if (--this.open === 0) this.finish();
        this.poke();
      };
      s.on("data", (d: Buffer) => {
        this.queue.push({ stream, data: d });
        this.queued += d.length;
        this.lastMove = Date.now();
        if (this.queued > HIGH_WATER) for (const [x] of this.sources) x.pause();
        this.poke();
      });
      s.on("end", end);
      s.on("close", end);
      s.on("error", end);
    }
    if (this.open === 0) this.finish();
  }

  private poke() {
    const w = this.wake;
    this.wake = undefined;
    w?.();
  }

  /** cut ends the output now (what is queued is still delivered). */
  cut(): void {
    for (const [s] of this.sources) s.destroy();
  }

  async *[Symbol.asyncIterator](): AsyncGenerator<ExecOutput> {
    for (;;) {
      const next = this.queue.shift();
      if (next) {
        this.queued -= next.data.length;
        this.lastMove = Date.now();
        if (this.queued <= HIGH_WATER / 2) for (const [x] of this.sources) x.resume();
        yield next;
        continue;
      }
      if (this.open === 0) return;
      await new Promise<void>((r) => (this.wake = r));
    }
  }
}

/**
 * startExec runs `argv` in running container `id` and returns the session (see the module
 * comment for the phases). Throws CAPSULE_INVALID_ARGUMENT for an empty argv, CAPSULE_NOT_FOUND
 * when the container is gone, CAPSULE_COMMAND_FAILED when the process cannot start (containerd's
 * message says why: no such executable, ...); nothing is left behind then. Not idempotent:
 * every call starts a process.
 */
export async function startExec(
  deps: ExecDeps,
  id: string,
  argv: readonly string[],
  opts: ExecStreamOptions = {},
): Promise<ExecSession> {
  if (argv.length === 0 || !argv[0]) throw invalidArgument("command", "is empty");
  if (argv.some((a) => a.includes("\0"))) throw invalidArgument("command", "an argument contains a NUL byte");
  const { api, execId } = deps;
  const tty = opts.tty === true;
  let pipes: ExecPipes | undefined;
  let created = false;
  try {
    const proc = execProcessSpec(await api.containerSpec(id), argv, { tty, size: opts.size });
    pipes = await deps.pipes.make(execId, { stdin: opts.stdin === true, stderr: !tty });
    await api.exec({ containerId: id, execId, ...pipes.paths, terminal: tty, process: proc });
    created = true;
    const waited = api.wait(id, execId);
    // A failed start ends the wait too (the process is deleted below); nobody awaits it then.
    waited.catch(() => {});
    let pid: number;
    try {
      pid = await api.start(id, execId);
    } catch (e) {
      const msg = (e as Error).message;
      throw new CapsuleError(ErrorCode.CommandFailed, `cannot run ${argv[0]} in ${id}: ${msg}`, {
        hint: /not found|no such file/i.test(msg) ? "check the command against the image" : undefined,
        cause: e,
      });
    }
    return session(deps, id, pid, pipes, waited, tty);
  } catch (e) {
    if (created) await api.deleteProcess(id, execId).catch(() => {});
    await pipes?.dispose();
    api.close();
    throw e;
  }
}

function session(
  deps: ExecDeps,
  id: string,
  pid: number,
  pipes: ExecPipes,
  waited: Promise<number>,
  tty: boolean,
): ExecSession {
  const { api, execId } = deps;
  const { stdout, stderr } = pipes.attach();
  const sources: [Readable, ExecOutput["stream"]][] = [[stdout, "stdout"]];
  if (stderr) sources.push([stderr, "stderr"]);
  const merger = new OutputMerger(sources);
  let exited = false;
  let stdinOpen = pipes.stdin !== undefined;

  const exit = (async () => {
    try {
      const code = await waited;
      exited = true;
      // The output ends when the shim closed its ends; a background child may hold them open.
      const drainMs = deps.drainMs ?? 2_000;
      while (
        !(await Promise.race([
          merger.done.then(() => true),
          new Promise<false>((r) => setTimeout(() => r(false), 100)),
        ]))
      ) {
        if (Date.now() - merger.lastMove > drainMs) {
          merger.cut();
          break;
        }
      }
      return code;
    } finally {
      exited = true;
      await api.deleteProcess(id, execId).catch(() => {});
      await pipes.dispose();
      api.close();
    }
  })();

  return {
    execId,
    pid,
    output: merger,
    write: (data) =>
      new Promise<void>((resolve) => {
        const w = pipes.stdin;
        if (!w || !stdinOpen || data.length === 0) return resolve();
        if (w.write(data)) resolve();
        else {
          const done = () => {
            w.off("drain", done);
            w.off("close", done);
            resolve();
          };
          w.on("drain", done);
          w.on("close", done);
        }
      }),
    closeStdin: async () => {
      if (!stdinOpen) return;
      stdinOpen = false;
      pipes.stdin?.end();
      if (!exited) await api.closeStdin(id, execId).catch(() => {});
    },
    resize: async (size) => {
      if (!tty || exited || !(size.rows > 0 && size.cols > 0)) return;
      await api.resizePty(id, execId, size);
    },
    kill: async () => {
      if (exited) return;
      await api.kill(id, execId, SIGKILL).catch(() => {});
    },
    exit,
  };
}
