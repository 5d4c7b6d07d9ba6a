import { CapsuleError, ErrorCode } from "../errors.js";
import type { CaddyAdmin } from "./admin.js";
import type { EdgeDataPlane, EdgeDesired, RouteStatus } from "./dataplane.js";

/**
 * FakeCaddyAdmin is the test double of Caddy's admin API: it records every config it accepted
 * (`loads`), serves the current one from `config()`, and, like Caddy, keeps the old config when
 * it rejects a load (see {@link FakeCaddyAdmin.rejectWhen}). `up` = false makes every call fail
 * as an unreachable Caddy would (ping answers false).
 */
export class FakeCaddyAdmin implements CaddyAdmin {
  /** loads are the accepted configs, in order (deep copies). */
  readonly loads: unknown[] = [];
  /** attempts counts every load call, accepted or not. */
  attempts = 0;
  /** current is the running config; null until something is loaded. */
  current: unknown = null;
  up = true;
  private reject: ((config: unknown) => string | undefined) | undefined;

  /** rejectWhen makes load fail with the returned message (Caddy's error) whenever `fn` returns one. */
  rejectWhen(fn: ((config: unknown) => string | undefined) | undefined): this {
    this.reject = fn;
    return this;
  }

  private check(): void {
    if (!this.up) throw new CapsuleError(ErrorCode.Unreachable, "caddy admin (fake): connection refused");
  }

  async load(config: unknown): Promise<void> {
    this.check();
    this.attempts++;
    const why = this.reject?.(config);
    if (why !== undefined)
      throw new CapsuleError(ErrorCode.InvalidConfig, `caddy rejected the config: ${why}`, {
        cause: new Error(JSON.stringify({ error: why })),
      });
    this.current = structuredClone(config);
    this.loads.push(structuredClone(config));
  }

  async config(): Promise<unknown> {
    this.check();
    return structuredClone(this.current);
  }

  async ping(): Promise<boolean> {
    return this.up;
  }

  async close(): Promise<void> {}
}

/**
 * FakeEdgeDataPlane is the test double of the edge data plane: it records every desired state
 * it accepted (`applied`, deep copies; `current` is the last), serves `statuses` from status(),
 * and {@link FakeEdgeDataPlane.failNext} makes the next apply throw (nothing recorded).
 */
export class FakeEdgeDataPlane implements EdgeDataPlane {
  readonly applied: EdgeDesired[] = [];
  current: EdgeDesired | undefined;
  statuses: RouteStatus[] = [];
  started = false;
  stopped = false;
  private failure: string | undefined;

  /** failNext makes the next apply throw CAPSULE_COMMAND_FAILED with `message`. */
  failNext(message: string): this {
    this.failure = message;
    return this;
  }

  async start(): Promise<void> {
    this.started = true;
  }

  async apply(d: EdgeDesired): Promise<void> {
    const why = this.failure;
    if (why !== undefined) {
      this.failure = undefined;
      throw new CapsuleError(ErrorCode.CommandFailed, why);
    }
    this.current = structuredClone(d);
    this.applied.push(structuredClone(d));
  }

  async status(): Promise<RouteStatus[]> {
    return structuredClone(this.statuses);
  }

  async stop(): Promise<void> {
    this.stopped = true;
  }

  async shutdown(): Promise<void> {
    this.stopped = true;
  }
}
