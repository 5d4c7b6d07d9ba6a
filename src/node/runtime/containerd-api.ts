/**
 * ContainerdApi: the few calls of containerd's own gRPC API that interactive exec needs
 * (Containers.Get, Tasks.Exec/Start/Wait/ResizePty/CloseIO/Kill/DeleteProcess), spoken directly
 * over containerd's unix socket.
 *
 * Everything else goes through `ctr` (see ctr.ts for why). Streaming exec cannot: ctr 1.6's
 * `tasks exec --tty` needs a terminal on its own stdin, and it starts the process before it
 * sends the first size, so a command that asks for its size at once (`stty size`, `tput cols`)
 * sees 0x0. Here the process spec carries `consoleSize`, which runc applies to the new terminal
 * before the command runs, and there is one terminal (the container's), not two.
 *
 * The wire types are a hand-written subset of containerd's API protos (field numbers as in
 * containerd/api, stable since 1.0); unknown fields are skipped by protobuf, so the subset reads
 * what we need from a full answer. No TLS: the socket is local and root-only.
 */
import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";
import { CapsuleError, ErrorCode } from "../../errors.js";
import type { CtrEndpoint } from "./ctr.js";

/** NAMESPACE_METADATA is the gRPC metadata key containerd reads the namespace from. */
export const NAMESPACE_METADATA = "containerd-namespace";

/** PROCESS_TYPE_URL is the Any type of an OCI process spec, as containerd's typeurl registers it. */
export const PROCESS_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/Process";

/** SIGKILL is signal 9, what {@link ContainerdApi.kill} sends to end an exec process. */
export const SIGKILL = 9;

const str = (id: number) => ({ type: "string", id });
const u32 = (id: number) => ({ type: "uint32", id });
const bool = (id: number) => ({ type: "bool", id });
const msg = (type: string, id: number) => ({ type, id });
const rpc = (requestType: string, responseType: string) => ({ requestType, responseType });

/** API_DESCRIPTOR is the protobufjs JSON of the subset of containerd's API we use. */
export const API_DESCRIPTOR = {
  nested: {
    google: {
      nested: {
        protobuf: {
          nested: {
            Any: { fields: { type_url: str(1), value: { type: "bytes", id: 2 } } },
            Empty: { fields: {} },
            Timestamp: { fields: { seconds: { type: "int64", id: 1 }, nanos: { type: "int32", id: 2 } } },
          },
        },
      },
    },
    containerd: {
      nested: {
        services: {
          nested: {
            tasks: {
              nested: {
                v1: {
                  nested: {
                    Tasks: {
                      methods: {
                        Start: rpc("StartRequest", "StartResponse"),
                        DeleteProcess: rpc("DeleteProcessRequest", "DeleteResponse"),
                        Kill: rpc("KillRequest", "google.protobuf.Empty"),
                        Exec: rpc("ExecProcessRequest", "google.protobuf.Empty"),
                        ResizePty: rpc("ResizePtyRequest", "google.protobuf.Empty"),
                        CloseIO: rpc("CloseIORequest", "google.protobuf.Empty"),
                        Wait: rpc("WaitRequest", "WaitResponse"),
                      },
                    },
                    StartRequest: { fields: { container_id: str(1), exec_id: str(2) } },
                    StartResponse: { fields: { pid: u32(1) } },
                    DeleteProcessRequest: { fields: { container_id: str(1), exec_id: str(2) } },
                    DeleteResponse: {
                      fields: {
                        id: str(1),
                        pid: u32(2),
                        exit_status: u32(3),
                        exited_at: msg("google.protobuf.Timestamp", 4),
                      },
                    },
                    KillRequest: {
                      fields: { container_id: str(1), exec_id: str(2), signal: u32(3), all: bool(4) },
                    },
                    ExecProcessRequest: {
                      fields: {
                        container_id: str(1),
                        stdin: str(2),
                        stdout: str(3),
                        stderr: str(4),
                        terminal: bool(5),
                        spec: msg("google.protobuf.Any", 6),
                        exec_id: str(7),
                      },
                    },
                    ResizePtyRequest: {
                      fields: { container_id: str(1), exec_id: str(2), width: u32(3), height: u32(4) },
                    },
                    CloseIORequest: { fields: { container_id: str(1), exec_id: str(2), stdin: bool(3) } },
                    WaitRequest: { fields: { container_id: str(1), exec_id: str(2) } },
                    WaitResponse: {
                      fields: { exit_status: u32(1), exited_at: msg("google.protobuf.Timestamp", 2) },
                    },
                  },
                },
              },
            },
            containers: {
              nested: {
                v1: {
                  nested: {
                    Containers: { methods: { Get: rpc("GetContainerRequest", "GetContainerResponse") } },
                    GetContainerRequest: { fields: { id: str(1) } },
                    GetContainerResponse: { fields: { container: msg("Container", 1) } },
                    Container: { fields: { id: str(1), image: str(3), spec: msg("google.protobuf.Any", 5) } },
                  },
                },
              },
            },
          },
        },
      },
    },
  },
};

/** ConsoleSize is a terminal's size in character cells. */
export interface ConsoleSize {
  rows: number;
  cols: number;
}

/**
 * OciProcess is the part of an OCI runtime spec's `process` we touch; every other field (env,
 * cwd, user, capabilities, rlimits, ...) is carried through unchanged.
 */
export interface OciProcess {
  args?: string[];
  terminal?: boolean;
  consoleSize?: { height: number; width: number };
  [field: string]: unknown;
}

/**
 * execProcessSpec is the process spec of an exec in a container whose OCI spec is `spec` (pure):
 * the container's own process (environment, working directory, user, capabilities, as `ctr
 * tasks exec` takes them) with `argv`, `terminal` and, for a terminal with a known size,
 * `consoleSize`. An unset or zero `size` leaves the terminal's size to runc (0x0). Throws
 * CAPSULE_INTERNAL when the spec has no process.
 */
export function execProcessSpec(
  spec: unknown,
  argv: readonly string[],
  opts: { tty: boolean; size?: ConsoleSize | undefined },
): OciProcess {
  const p = (spec as { process?: unknown } | null)?.process;
  if (!p || typeof p !== "object") {
    throw new CapsuleError(ErrorCode.Internal, "the container's OCI spec has no process");
  }
  const out: OciProcess = { ...(p as OciProcess), args: [...argv], terminal: opts.tty };
  delete out.consoleSize;
  if (opts.tty && opts.size && opts.size.rows > 0 && opts.size.cols > 0) {
    out.consoleSize = { height: opts.size.rows, width: opts.size.cols };
  }
  return out;
}

/** ExecProcessRequest creates an exec process: FIFO paths ("" = none) and the process spec. */
export interface ExecProcessRequest {
  containerId: string;
  execId: string;
  stdin: string;
  stdout: string;
  stderr: string;
  terminal: boolean;
  process: OciProcess;
}

/**
 * ContainerdApi is the exec part of containerd's API for one namespace. One instance serves one
 * exec session and is closed after it ({@link ContainerdApi.close}); none of the calls retries.
 */
export interface ContainerdApi {
  /** containerSpec returns container `id`'s OCI runtime spec (parsed JSON); CAPSULE_NOT_FOUND when there is none. */
  containerSpec(id: string): Promise<unknown>;
  /** exec creates (does not start) an exec process. */
  exec(req: ExecProcessRequest): Promise<void>;
  /** start starts a created exec process and returns its pid. */
  start(id: string, execId: string): Promise<number>;
  /** wait resolves with the exec process's exit status once it exited (no deadline). */
  wait(id: string, execId: string): Promise<number>;
  /** resizePty sets the size of the exec process's terminal. */
  resizePty(id: string, execId: string, size: ConsoleSize): Promise<void>;
  /** closeStdin closes the exec process's stdin (it reads EOF). */
  closeStdin(id: string, execId: string): Promise<void>;
  /** kill sends `signal` (a number) to the exec process. */
  kill(id: string, execId: string, signal: number): Promise<void>;
  /** deleteProcess removes an exited (or never started) exec process from containerd. Idempotent: a missing one is not an error. */
  deleteProcess(id: string, execId: string): Promise<void>;
  /** close releases the connection. Idempotent. */
  close(): void;
}

type Callback<T> = (err: grpc.ServiceError | null, res: T) => void;
type Method = (req: object, md: grpc.Metadata, opts: grpc.CallOptions, cb: Callback<unknown>) => unknown;
type ApiClient = grpc.Client & Record<string, Method>;

let loaded: grpc.GrpcObject | undefined;
function apiPackage(): grpc.GrpcObject {
  loaded ??= grpc.loadPackageDefinition(
    protoLoader.fromJSON(API_DESCRIPTOR as Parameters<typeof protoLoader.fromJSON>[0], {
      keepCase: true,
      longs: String,
      defaults: true,
    }),
  );
  return loaded;
}

function ctor(path: string): typeof grpc.Client {
  let o: unknown = apiPackage();
  for (const p of path.split(".")) o = (o as Record<string, unknown>)[p];
  return o as typeof grpc.Client;
}

/** apiError turns a failed containerd call into a CapsuleError naming the call. */
function apiError(method: string, e: grpc.ServiceError): CapsuleError {
  const code =
    e.code === grpc.status.NOT_FOUND
      ? ErrorCode.NotFound
      : e.code === grpc.status.UNAVAILABLE
        ? ErrorCode.Unreachable
        : e.code === grpc.status.FAILED_PRECONDITION
          ? ErrorCode.FailedPrecondition
          : ErrorCode.CommandFailed;
  return new CapsuleError(code, `containerd ${method}: ${e.details || e.message}`, { cause: e });
}

/** GrpcContainerdApi is the real {@link ContainerdApi}: grpc-js over containerd's unix socket. */
export class GrpcContainerdApi implements ContainerdApi {
  private readonly tasks: ApiClient;
  private readonly containers: ApiClient;
  private readonly md = new grpc.Metadata();
  private closed = false;

  constructor(ep: Pick<CtrEndpoint, "address" | "namespace">) {
    const target = `unix://${ep.address}`;
    const creds = grpc.credentials.createInsecure();
    this.tasks = new (ctor("containerd.services.tasks.v1.Tasks"))(target, creds) as ApiClient;
    // Same target and options: grpc-js shares the connection.
    this.containers = new (ctor("containerd.services.containers.v1.Containers"))(target, creds) as ApiClient;
    this.md.set(NAMESPACE_METADATA, ep.namespace);
  }

  private call<T>(client: ApiClient, method: string, req: object, deadlineMs: number | null = 30_000) {
    const opts: grpc.CallOptions = deadlineMs === null ? {} : { deadline: Date.now() + deadlineMs };
    return new Promise<T>((resolve, reject) => {
      const fn = client[method];
      if (!fn) return reject(new CapsuleError(ErrorCode.Internal, `containerd API: no method ${method}`));
      fn.call(client, req, this.md, opts, (err, res) =>
        err ? reject(apiError(method, err)) : resolve(res as T),
      );
    });
  }

  async containerSpec(id: string): Promise<unknown> {
    const r = await this.call<{ container?: { spec?: { value?: Buffer } } }>(this.containers, "Get", { id });
    const value = r.container?.spec?.value;
    if (!value?.length) throw new CapsuleError(ErrorCode.Internal, `container ${id} has no OCI spec`);
    return JSON.parse(value.toString("utf8")) as unknown;
  }

  async exec(req: ExecProcessRequest): Promise<void> {
    await this.call(this.tasks, "Exec", {
      container_id: req.containerId,
      exec_id: req.execId,
      stdin: req.stdin,
      stdout: req.stdout,
      stderr: req.stderr,
      terminal: req.terminal,
      spec: { type_url: PROCESS_TYPE_URL, value: Buffer.from(JSON.stringify(req.process)) },
    });
  }

  async start(id: string, execId: string): Promise<number> {
    const r = await this.call<{ pid: number }>(this.tasks, "Start", { container_id: id, exec_id: execId });
    return r.pid;
  }

  async wait(id: string, execId: string): Promise<number> {
    const r = await this.call<{ exit_status: number }>(
      this.tasks,
      "Wait",
      { container_id: id, exec_id: execId },
      null,
    );
    return r.exit_status;
  }

  async resizePty(id: string, execId: string, size: ConsoleSize): Promise<void> {
    await this.call(this.tasks, "ResizePty", {
      container_id: id,
      exec_id: execId,
      width: size.cols,
      height: size.rows,
    });
  }

  async closeStdin(id: string, execId: string): Promise<void> {
    await this.call(this.tasks, "CloseIO", { container_id: id, exec_id: execId, stdin: true });
  }

  async kill(id: string, execId: string, signal: number): Promise<void> {
    await this.call(this.tasks, "Kill", { container_id: id, exec_id: execId, signal, all: false });
  }

  async deleteProcess(id: string, execId: string): Promise<void> {
    try {
      await this.call(this.tasks, "DeleteProcess", { container_id: id, exec_id: execId });
    } catch (e) {
      if ((e as CapsuleError).code !== ErrorCode.NotFound) throw e;
    }
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.tasks.close();
    this.containers.close();
  }
}

/**
 * FakeContainerdApi records every call as canonical text in `calls` ("Exec web.1 e1 tty 33x101
 * stdin=/f/e1-stdin: sh -c tty") and plays containerd: {@link FakeContainerdApi.exit} ends the
 * process (a pending or later `wait` resolves), `onStart` runs when a process starts (a test
 * acting as the shim writes its output there), `failStart` makes `start` throw. One instance
 * may serve several sessions; `closed` counts closes.
 */
export class FakeContainerdApi implements ContainerdApi {
  readonly calls: string[] = [];
  /** spec is what containerSpec returns (unset = a minimal spec with env and cwd). */
  spec: unknown = { process: { args: ["sleep", "3600"], env: ["PATH=/bin"], cwd: "/", terminal: false } };
  /** failStart, when set, is thrown by start. */
  failStart: Error | undefined;
  /** onStart runs after a process started. */
  onStart: ((execId: string) => void) | undefined;
  closed = 0;
  private readonly exits = new Map<string, { code?: number; waiters: ((code: number) => void)[] }>();

  private state(execId: string) {
    let s = this.exits.get(execId);
    if (!s) this.exits.set(execId, (s = { waiters: [] }));
    return s;
  }

  /** exit ends exec process `execId` with `code`, as if it returned. */
  exit(execId: string, code: number): void {
    const s = this.state(execId);
    if (s.code !== undefined) return;
    s.code = code;
    for (const w of s.waiters.splice(0)) w(code);
  }

  async containerSpec(id: string): Promise<unknown> {
    this.calls.push(`Containers.Get ${id}`);
    return this.spec;
  }

  async exec(req: ExecProcessRequest): Promise<void> {
    const size = req.process.consoleSize
      ? ` ${req.process.consoleSize.height}x${req.process.consoleSize.width}`
      : "";
    const io = [`stdin=${req.stdin}`, `stdout=${req.stdout}`, `stderr=${req.stderr}`].join(" ");
    this.calls.push(
      `Exec ${req.containerId} ${req.execId} ${req.terminal ? "tty" : "notty"}${size} ${io}: ${(req.process.args ?? []).join(" ")}`,
    );
  }

  async start(id: string, execId: string): Promise<number> {
    this.calls.push(`Start ${id} ${execId}`);
    if (this.failStart) throw this.failStart;
    this.onStart?.(execId);
    return 4242;
  }

  wait(id: string, execId: string): Promise<number> {
    this.calls.push(`Wait ${id} ${execId}`);
    const s = this.state(execId);
    if (s.code !== undefined) return Promise.resolve(s.code);
    return new Promise((r) => s.waiters.push(r));
  }

  async resizePty(id: string, execId: string, size: ConsoleSize): Promise<void> {
    this.calls.push(`ResizePty ${id} ${execId} ${size.rows}x${size.cols}`);
  }

  async closeStdin(id: string, execId: string): Promise<void> {
    this.calls.push(`CloseIO ${id} ${execId} stdin`);
  }

  async kill(id: string, execId: string, signal: number): Promise<void> {
    this.calls.push(`Kill ${id} ${execId} ${signal}`);
    if (signal === SIGKILL) this.exit(execId, 128 + signal);
  }

  async deleteProcess(id: string, execId: string): Promise<void> {
    this.calls.push(`DeleteProcess ${id} ${execId}`);
  }

  close(): void {
    this.closed++;
  }
}
