/**
 * ExecPipes: the FIFOs an exec process's stdio runs through. containerd's shim opens the far
 * ends (it reads stdin, writes stdout and stderr; with a terminal, stdout carries both).
 *
 * The opening order matters, and is what containerd's own client does in its way:
 * - every FIFO is first opened O_RDWR|O_NONBLOCK here. That never blocks and never fails for
 *   want of a peer, so the shim's blocking opens succeed whenever it makes them;
 * - stdin is written through that O_RDWR descriptor (never read from it);
 * - stdout and stderr are read through a second, O_RDONLY descriptor opened after the process
 *   started (the shim has its write end open by then), and the O_RDWR one is closed at that
 *   moment. Only then does the reader see EOF, once the shim closed its end after the last byte,
 *   and not before: output buffered in the FIFO in between is kept.
 * Every descriptor is a libuv pipe (net.Socket), so no thread of the pool blocks on a FIFO.
 */
import { closeSync, constants, openSync } from "node:fs";
import { mkdir, rm } from "node:fs/promises";
import { Socket } from "node:net";
import { join } from "node:path";
import { PassThrough, type Readable, type Writable } from "node:stream";
import type { CommandRunner } from "../host/runner.js";

/** PipePaths are the FIFO paths an Exec request names; "" for a stream not made. */
export interface PipePaths {
  stdin: string;
  stdout: string;
  stderr: string;
}

/** ExecPipes are one exec process's stdio FIFOs, from the capsule's side. */
export interface ExecPipes {
  paths: PipePaths;
  /** stdin is written to the process's stdin; undefined when no stdin was asked for. */
  stdin: Writable | undefined;
  /**
   * attach opens the read ends, once the process started (see the module comment), and returns
   * them; `stderr` is undefined when it was not asked for (a terminal). Call it once.
   */
  attach(): { stdout: Readable; stderr: Readable | undefined };
  /** dispose closes every descriptor and removes the FIFOs. Idempotent. */
  dispose(): Promise<void>;
}

/** PipeWants says which FIFOs to make: stdout always; `stdin` and `stderr` when true. */
export interface PipeWants {
  stdin: boolean;
  stderr: boolean;
}

/** PipeMaker makes the FIFOs of one exec process (implemented by {@link FifoPipes}, faked by {@link MemoryPipes}). */
export interface PipeMaker {
  /** make creates the FIFOs for exec `execId` and opens this side's holds. Not idempotent: one call per exec. */
  make(execId: string, want: PipeWants): Promise<ExecPipes>;
}

/** pipePaths are the FIFO paths of exec `execId` under `dir` (pure). */
export function pipePaths(dir: string, execId: string, want: PipeWants): PipePaths {
  return {
    stdin: want.stdin ? join(dir, `${execId}-stdin`) : "",
    stdout: join(dir, `${execId}-stdout`),
    stderr: want.stderr ? join(dir, `${execId}-stderr`) : "",
  };
}

const quiet = (s: Socket) => {
  // A peer gone early is the exec's business (its exit code says it), never capsuled's crash.
  s.on("error", () => {});
  return s;
};

/** FifoPipes makes real FIFOs under `dir` (`mkfifo` through the runner; created mode 0700). */
export class FifoPipes implements PipeMaker {
  constructor(
    private readonly runner: CommandRunner,
    private readonly dir: string,
  ) {}

  async make(execId: string, want: PipeWants): Promise<ExecPipes> {
    const paths = pipePaths(this.dir, execId, want);
    const files = [paths.stdin, paths.stdout, paths.stderr].filter(Boolean);
    await mkdir(this.dir, { recursive: true, mode: 0o700 });
    await this.runner.run(["mkfifo", "-m", "600", ...files]);
    const fds: number[] = [];
    const sockets: Socket[] = [];
    let disposed = false;
    const dispose = async () => {
      if (disposed) return;
      disposed = true;
      for (const s of sockets) s.destroy();
      for (const fd of fds.splice(0))
        try {
          closeSync(fd);
        } catch {}
      await Promise.all(files.map((f) => rm(f, { force: true })));
    };
    try {
      const hold = (p: string) => {
        const fd = openSync(p, constants.O_RDWR | constants.O_NONBLOCK);
        fds.push(fd);
        return fd;
      };
      let stdin: Socket | undefined;
      if (paths.stdin) {
        const fd = hold(paths.stdin);
        fds.pop(); // the socket owns it now
        stdin = quiet(new Socket({ fd, readable: false, writable: true }));
        sockets.push(stdin);
      }
      const outHold = hold(paths.stdout);
      const errHold = paths.stderr ? hold(paths.stderr) : undefined;
      let attached = false;
      return {
        paths,
        stdin,
        attach: () => {
          if (attached) throw new Error("ExecPipes.attach called twice");
          attached = true;
          const reader = (p: string, held: number) => {
            const fd = openSync(p, constants.O_RDONLY | constants.O_NONBLOCK);
            const s = quiet(new Socket({ fd, readable: true, writable: false }));
            sockets.push(s);
            closeSync(held);
            fds.splice(fds.indexOf(held), 1);
            return s;
          };
          return {
            stdout: reader(paths.stdout, outHold),
            stderr: errHold === undefined ? undefined : reader(paths.stderr, errHold),
          };
        },
        dispose,
      };
    } catch (e) {
      await dispose();
      throw e;
    }
  }
}

/** MemoryPipe is one fake exec's streams, as {@link MemoryPipes} made them. */
export interface MemoryPipe {
  execId: string;
  /** input collects what was written to the process's stdin. */
  input: string;
  /** stdinEnded says the capsule's side ended stdin. */
  stdinEnded: boolean;
  /** stdout and stderr are written (and ended) by the test, acting as the shim. */
  stdout: PassThrough;
  stderr: PassThrough;
  disposed: boolean;
}

/**
 * MemoryPipes is the test double of {@link FifoPipes}: in-memory streams, no files. The test
 * plays the shim through {@link MemoryPipes.pipes}; `calls` records `make e1 stdin stderr`,
 * `attach e1`, `dispose e1`.
 */
export class MemoryPipes implements PipeMaker {
  readonly calls: string[] = [];
  readonly pipes = new Map<string, MemoryPipe>();

  async make(execId: string, want: PipeWants): Promise<ExecPipes> {
    this.calls.push(
      ["make", execId, ...(want.stdin ? ["stdin"] : []), ...(want.stderr ? ["stderr"] : [])].join(" "),
    );
    const m: MemoryPipe = {
      execId,
      input: "",
      stdinEnded: false,
      stdout: new PassThrough(),
      stderr: new PassThrough(),
      disposed: false,
    };
    this.pipes.set(execId, m);
    let stdin: PassThrough | undefined;
    if (want.stdin) {
      stdin = new PassThrough();
      stdin.on("data", (d: Buffer) => (m.input += d.toString()));
      stdin.on("end", () => (m.stdinEnded = true));
    }
    return {
      paths: pipePaths("/fifo", execId, want),
      stdin,
      attach: () => {
        this.calls.push(`attach ${execId}`);
        return { stdout: m.stdout, stderr: want.stderr ? m.stderr : undefined };
      },
      dispose: async () => {
        if (m.disposed) return;
        m.disposed = true;
        this.calls.push(`dispose ${execId}`);
        m.stdout.destroy();
        m.stderr.destroy();
        stdin?.destroy();
      },
    };
  }
}
