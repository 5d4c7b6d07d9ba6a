import { CapsuleError, ErrorCode } from "../errors.js";
import type { CaddyAdmin } from "./admin.js";

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
