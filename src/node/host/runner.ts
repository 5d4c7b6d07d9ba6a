import { execa } from "execa";
import { CommandError } from "../../errors.js";

/** RunOptions: all fields optional. `input` is written to stdin; `timeoutMs` bounds the run (default 30 s). */
export interface RunOptions {
  input?: string;
  timeoutMs?: number;
  /** allowFailure returns a non-zero exit as a result instead of throwing. */
  allowFailure?: boolean;
  env?: Record<string, string>;
}

/** RunResult is what a finished command produced. */
export interface RunResult {
  exitCode: number;
  stdout: string;
  stderr: string;
}

/**
 * CommandRunner is the subprocess seam. Every OS effect made by running a tool goes through
 * it, so tests can swap in {@link FakeRunner} and diff the exact command lines.
 */
export interface CommandRunner {
  /** run executes argv[0] with the rest as arguments; throws {@link CommandError} on failure unless allowFailure. */
  run(argv: readonly string[], opts?: RunOptions): Promise<RunResult>;
}

/** ExecaRunner runs real commands with a pinned environment (LC_ALL=C) so output parses. */
export class ExecaRunner implements CommandRunner {
  async run(argv: readonly string[], opts: RunOptions = {}): Promise<RunResult> {
    const [file, ...args] = argv;
    if (!file) throw new CommandError(argv, undefined, "", "empty command");
    const r = await execa(file, args, {
      input: opts.input,
      timeout: opts.timeoutMs ?? 30_000,
      reject: false,
      env: { LC_ALL: "C", ...opts.env },
      stripFinalNewline: false,
    });
    const res = {
      exitCode: r.exitCode ?? -1,
      stdout: String(r.stdout ?? ""),
      stderr: String(r.stderr ?? ""),
    };
    if (res.exitCode !== 0 && !opts.allowFailure) {
      throw new CommandError(
        argv,
        r.exitCode,
        res.stdout,
        res.stderr + (r.timedOut ? " (timed out)" : ""),
        r.cause,
      );
    }
    return res;
  }
}

/** FakeResponder decides what a faked command returns; return undefined for the default (exit 0, no output). */
export type FakeResponder = (
  argv: readonly string[],
  input: string | undefined,
) => Partial<RunResult> | undefined;

/**
 * FakeRunner records every command as canonical text (`argv.join(" ")`, plus `<<stdin` when
 * input was given) so table tests can diff the exact lines the code would run.
 */
export class FakeRunner implements CommandRunner {
  readonly commands: string[] = [];
  readonly inputs: (string | undefined)[] = [];
  private responders: FakeResponder[] = [];

  /** on adds a responder; the most recently added one that answers wins. */
  on(responder: FakeResponder): this {
    this.responders.unshift(responder);
    return this;
  }

  async run(argv: readonly string[], opts: RunOptions = {}): Promise<RunResult> {
    this.commands.push(argv.join(" "));
    this.inputs.push(opts.input);
    let res: RunResult = { exitCode: 0, stdout: "", stderr: "" };
    for (const r of this.responders) {
      const got = r(argv, opts.input);
      if (got) {
        res = { ...res, ...got };
        break;
      }
    }
    if (res.exitCode !== 0 && !opts.allowFailure)
      throw new CommandError(argv, res.exitCode, res.stdout, res.stderr);
    return res;
  }
}
