/**
 * Session is what one capsulectl invocation works with: its streams and environment, the
 * global flags, the config dir, and the fan-out of one RPC over the selected targets.
 * Commands are thin: pick the RPC and the view, the session does the rest.
 */
import { type Endpoint, type ProbeResult, probeCertificate, RpcClient } from "../api/client.js";
import type { Signer } from "../api/token.js";
import { invalidArgument } from "../errors.js";
import {
  type CapsuleConfig,
  defaultConfigDir,
  loadConfig,
  loadOperatorKey,
  saveConfig,
  updateConfig,
} from "./config.js";
import { fanOut, type FanOutResult } from "./fanout.js";
import { type OutputFormat, renderObject, renderResults, type View } from "./output.js";
import { endpointOf, resolveTargets, type Target } from "./targets.js";
import { processTerminal, type Terminal } from "./terminal.js";

/** Writer is the part of a stream the CLI writes to; `isTTY` (optional) says a terminal is attached. */
export interface Writer {
  write(chunk: string | Uint8Array): unknown;
  isTTY?: boolean;
}

/** RpcCaller is the part of {@link RpcClient} commands use; tests pass a fake through {@link CliIO.dial}. */
export type RpcCaller = Pick<
  RpcClient,
  "call" | "close" | "callClientStream" | "callServerStream" | "callBidiStream"
>;

/** Dial opens a client to one pinned capsule; `signer` null sends no token (Claim). */
export type Dial = (endpoint: Endpoint, signer: Signer | null) => RpcCaller;

/** Probe shows what certificate a server presents, trusting nothing (see probeCertificate). */
export type Probe = (address: string, timeoutMs: number) => Promise<ProbeResult>;

/** CliIO is everything capsulectl touches outside its config dir; every field is required here (see {@link defaultIO}). */
export interface CliIO {
  stdout: Writer;
  stderr: Writer;
  env: Record<string, string | undefined>;
  /** stdin answers the adopt prompt; prompting happens only when `isTTY` is true. */
  stdin: NodeJS.ReadableStream & { isTTY?: boolean };
  dial: Dial;
  probe: Probe;
  /** now is the wall clock (addedAt). */
  now: () => Date;
  /** onInterrupt runs `fn` on Ctrl-C (SIGINT) instead of dying; the returned function undoes it. */
  onInterrupt: (fn: () => void) => () => void;
  /** sleep waits `ms` (polling); tests make it instant. */
  sleep: (ms: number) => Promise<void>;
  /** terminal is the user's terminal for interactive commands (`workload exec -t -i`). */
  terminal: Terminal;
}

/** defaultIO is the real process: its streams and env, real gRPC clients and TLS probes. */
export function defaultIO(): CliIO {
  return {
    stdout: process.stdout,
    stderr: process.stderr,
    env: process.env,
    stdin: process.stdin,
    dial: (endpoint, signer) => new RpcClient(endpoint, signer),
    probe: (address, timeoutMs) => probeCertificate(address, timeoutMs),
    now: () => new Date(),
    onInterrupt: (fn) => {
      process.once("SIGINT", fn);
      return () => process.removeListener("SIGINT", fn);
    },
    sleep: (ms) => new Promise((r) => setTimeout(r, ms)),
    terminal: processTerminal(),
  };
}

/** GlobalOptions are the parsed global flags. `configDir` unset = the default dir; `capsule` unset = default targets. */
export interface GlobalOptions {
  capsule?: string | undefined;
  all?: boolean | undefined;
  output: OutputFormat;
  configDir?: string | undefined;
  /** timeoutMs is the per-target deadline. */
  timeoutMs: number;
}

/** Session carries one invocation's IO, flags and resulting exit code. */
export class Session {
  readonly io: CliIO;
  readonly globals: GlobalOptions;
  readonly configDir: string;
  /** exitCode is what the process exits with unless an error escapes (then 1). */
  exitCode = 0;

  constructor(io: CliIO, globals: GlobalOptions) {
    this.io = io;
    this.globals = globals;
    this.configDir = globals.configDir || defaultConfigDir(io.env);
  }

  /** output is the `-o` format. */
  get output(): OutputFormat {
    return this.globals.output;
  }

  /** out writes to stdout. */
  out(text: string): void {
    if (text) this.io.stdout.write(text);
  }

  /** err writes to stderr. */
  err(text: string): void {
    if (text) this.io.stderr.write(text);
  }

  /** loadConfig reads the config dir's contexts. */
  loadConfig(): Promise<CapsuleConfig> {
    return loadConfig(this.configDir);
  }

  /** saveConfig writes the contexts atomically. Prefer {@link updateConfig} for read-modify-write. */
  saveConfig(cfg: CapsuleConfig): Promise<void> {
    return saveConfig(this.configDir, cfg);
  }

  /** updateConfig changes the contexts under the config dir's lock (see config.ts updateConfig). */
  updateConfig(
    change: (cfg: CapsuleConfig) => CapsuleConfig | undefined | Promise<CapsuleConfig | undefined>,
  ): Promise<CapsuleConfig> {
    return updateConfig(this.configDir, change);
  }

  /** targets resolves `--capsule` / `--all` / `$CAPSULE_HOST` / the current context. */
  async targets(): Promise<Target[]> {
    return resolveTargets(await this.loadConfig(), this.globals, this.io.env);
  }

  /**
   * isMulti says whether output takes the several-targets shape (CAPSULE column, JSON list):
   * more than one target, or `--all` even when it selects one, so scripts see one shape.
   */
  isMulti(targets: readonly Target[]): boolean {
    return targets.length > 1 || this.globals.all === true;
  }

  /**
   * rpc calls `method` on every selected target in parallel (see fanOut), with a fresh token
   * per call and the `--timeout` deadline per target. `request` builds each target's request.
   */
  async rpc<V>(
    method: string,
    request: (t: Target) => object,
  ): Promise<{ results: FanOutResult<Target, V>[]; multi: boolean }> {
    const targets = await this.targets();
    const results = await this.rpcTo<V>(targets, method, request);
    return { results, multi: this.isMulti(targets) };
  }

  /**
   * rpcTo calls `method` on the given targets in parallel, as {@link rpc} does for the
   * selected ones. `deadlineMs` unset = the `--timeout` deadline. Never rejects for a target's
   * failure: each target's outcome is in its result.
   */
  async rpcTo<V>(
    targets: readonly Target[],
    method: string,
    request: (t: Target) => object,
    opts: { deadlineMs?: number } = {},
  ): Promise<FanOutResult<Target, V>[]> {
    const deadlineMs = opts.deadlineMs ?? this.globals.timeoutMs;
    return this.withEach(targets, (client, t) => client.call<V>(method, request(t), { deadlineMs }), {
      deadlineMs,
    });
  }

  /**
   * withEach runs `work` with a fresh client on every target in parallel (see fanOut), for
   * commands that make more than one unary call per target (streams, apply --wait). The client
   * is closed when `work` settles or its deadline (`deadlineMs`, default `--timeout`) passes.
   * Never rejects for a target's failure.
   */
  async withEach<V>(
    targets: readonly Target[],
    work: (client: RpcCaller, t: Target, signal: AbortSignal) => Promise<V>,
    opts: { deadlineMs?: number } = {},
  ): Promise<FanOutResult<Target, V>[]> {
    const signer = await loadOperatorKey(this.configDir);
    const deadlineMs = opts.deadlineMs ?? this.globals.timeoutMs;
    return fanOut(
      targets,
      async (t, signal) => {
        const client = this.io.dial(endpointOf(t), signer);
        // Closing the channel on abort stops a hung call from keeping the process alive.
        const onAbort = () => client.close();
        signal.addEventListener("abort", onAbort, { once: true });
        try {
          return await work(client, t, signal);
        } finally {
          signal.removeEventListener("abort", onAbort);
          client.close();
        }
      },
      { deadlineMs, label: (t) => t.name },
    );
  }

  /** dial opens a client to one target with the operator key; the caller closes it. */
  async dial(target: Target): Promise<RpcCaller> {
    return this.io.dial(endpointOf(target), await loadOperatorKey(this.configDir));
  }

  /**
   * one resolves the selected targets and insists on exactly one, for commands that talk to a
   * single capsule (`workload logs`, `workload exec`). `what` names the command in the error.
   */
  async one(what: string): Promise<Target> {
    const targets = await this.targets();
    const [t] = targets;
    if (!t || targets.length !== 1) {
      throw invalidArgument(
        "--capsule",
        `${what} talks to one capsule, ${targets.length} selected`,
        `name it: capsulectl --capsule NAME ${what} ...`,
      );
    }
    return t;
  }

  /** callOne calls `method` on one target (see {@link rpcTo}) and returns its answer or throws its error. */
  async callOne<V>(target: Target, method: string, request: object): Promise<V> {
    const [r] = await this.rpcTo<V>([target], method, () => request);
    if (!r) throw new Error("callOne: no result");
    if (!r.ok) throw r.error;
    return r.value;
  }

  /**
   * target resolves one context by name (or a pinned HOST:PORT), for commands whose arguments
   * name capsules (`fabric enroll A B`). Errors as {@link targets} does.
   */
  async target(name: string): Promise<Target> {
    if (name.includes(",")) throw invalidArgument("capsule", `"${name}": name one capsule, not a list`);
    const found = resolveTargets(await this.loadConfig(), { capsule: name }, this.io.env);
    const [t] = found;
    if (!t || found.length !== 1) throw invalidArgument("capsule", `"${name}" must name exactly one capsule`);
    return t;
  }

  /** show prints fan-out results through `view` and records a failure in the exit code. */
  show<V, R>(results: readonly FanOutResult<Target, V>[], view: View<V, R>, multi: boolean): void {
    const r = renderResults(results, view, this.output, { multi });
    this.out(r.stdout);
    this.err(r.stderr);
    if (r.exitCode) this.exitCode = r.exitCode;
  }

  /** rpcAndShow is the whole of a read command: fan the RPC out, print through `view`. */
  async rpcAndShow<V, R>(method: string, request: (t: Target) => object, view: View<V, R>): Promise<void> {
    const { results, multi } = await this.rpc<V>(method, request);
    this.show(results, view, multi);
  }

  /** print prints one local value: raw for json/yaml, else `table()`'s text. */
  print(value: unknown, table: () => string): void {
    const f = this.output;
    this.out(f === "json" || f === "yaml" ? renderObject(value, f) : table());
  }
}
