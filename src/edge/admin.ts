/**
 * Caddy's admin API, behind the {@link CaddyAdmin} seam: the real one talks HTTP over Caddy's
 * admin unix socket ({@link UnixCaddyAdmin}); tests use FakeCaddyAdmin (./fakes.ts).
 */
import { Client, errors as undiciErrors } from "undici";
import { CapsuleError, ErrorCode } from "../errors.js";

/**
 * CaddyAdmin is the part of Caddy's admin API the edge uses. `load` replaces the whole config
 * atomically (Caddy keeps the old one serving when it rejects the new); `config` reads the
 * running config back; `ping` reports whether the admin endpoint answers.
 */
export interface CaddyAdmin {
  /** load POSTs `config` to `/load`. Throws CAPSULE_INVALID_CONFIG when Caddy rejects it (the old config keeps serving). */
  load(config: unknown): Promise<void>;
  /** config returns the running config (`GET /config/`; null when Caddy has none). */
  config(): Promise<unknown>;
  /** ping is true when the admin endpoint answers within a short timeout. Never throws. */
  ping(): Promise<boolean>;
  /** close releases connections. Idempotent. */
  close(): Promise<void>;
}

/** UnixCaddyAdminOptions: `socketPath` is required; `timeoutMs` is optional (default 10000; ping uses 1000). */
export interface UnixCaddyAdminOptions {
  /** socketPath is the admin socket (the path after `unix/` in `admin.listen`). */
  socketPath: string;
  /** timeoutMs bounds each request (headers and body). */
  timeoutMs?: number;
}

const PING_MS = 1_000;

/**
 * UnixCaddyAdmin speaks to Caddy's admin API over its unix socket with undici. Requests carry an
 * empty Host header: Caddy's admin endpoint on a unix socket accepts only that (its
 * DNS-rebinding guard). Errors are one line: Caddy's `error` text in the message, the full
 * response body as the cause.
 */
export class UnixCaddyAdmin implements CaddyAdmin {
  private readonly socketPath: string;
  private readonly timeoutMs: number;
  private client: Client | undefined;

  constructor(opts: UnixCaddyAdminOptions) {
    this.socketPath = opts.socketPath;
    this.timeoutMs = opts.timeoutMs ?? 10_000;
  }

  private get http(): Client {
    // The origin is only a placeholder: the socket is what is dialed.
    this.client ??= new Client("http://caddy-admin", {
      socketPath: this.socketPath,
      connectTimeout: Math.min(this.timeoutMs, 5_000),
    });
    return this.client;
  }

  private async request(
    method: "GET" | "POST",
    path: string,
    body: string | undefined,
    timeoutMs: number,
  ): Promise<string> {
    let status: number;
    let text: string;
    try {
      const r = await this.http.request({
        method,
        path,
        headers: body === undefined ? { host: "" } : { host: "", "content-type": "application/json" },
        body,
        // A new connection per call: a config load restarts Caddy's admin server and closes
        // kept-alive connections, and the next call on one would fail with EPIPE (seen in CI).
        reset: true,
        headersTimeout: timeoutMs,
        bodyTimeout: timeoutMs,
        signal: AbortSignal.timeout(timeoutMs),
      });
      status = r.statusCode;
      text = await r.body.text();
    } catch (e) {
      const timedOut =
        e instanceof undiciErrors.HeadersTimeoutError ||
        e instanceof undiciErrors.BodyTimeoutError ||
        e instanceof undiciErrors.ConnectTimeoutError ||
        (e instanceof Error && (e.name === "TimeoutError" || e.name === "AbortError"));
      const msg = e instanceof Error ? e.message : String(e);
      throw new CapsuleError(
        timedOut ? ErrorCode.Timeout : ErrorCode.Unreachable,
        `caddy admin ${method} ${path} on ${this.socketPath}: ${timedOut ? `no answer within ${timeoutMs} ms` : msg}`,
        { cause: e, hint: "is Caddy running? see caddy.log in the edge's state dir" },
      );
    }
    if (status < 200 || status > 299) {
      const reason = caddyError(text);
      throw new CapsuleError(
        path === "/load" && status === 400 ? ErrorCode.InvalidConfig : ErrorCode.CommandFailed,
        path === "/load" && status === 400
          ? `caddy rejected the config: ${reason}`
          : `caddy admin ${method} ${path}: HTTP ${status}: ${reason}`,
        { cause: new Error(text.trim() || `HTTP ${status}`), details: { status } },
      );
    }
    return text;
  }

  async load(config: unknown): Promise<void> {
    await this.request("POST", "/load", JSON.stringify(config), this.timeoutMs);
  }

  async config(): Promise<unknown> {
    const text = await this.request("GET", "/config/", undefined, this.timeoutMs);
    return text.trim() === "" ? null : (JSON.parse(text) as unknown);
  }

  async ping(): Promise<boolean> {
    try {
      await this.request("GET", "/config/", undefined, Math.min(PING_MS, this.timeoutMs));
      return true;
    } catch {
      return false;
    }
  }

  async close(): Promise<void> {
    const c = this.client;
    this.client = undefined;
    await c?.destroy().catch(() => undefined);
  }
}

/** caddyError is the first line of Caddy's `{"error": "..."}` body, or of the raw body. */
function caddyError(body: string): string {
  let msg = body.trim();
  try {
    const j = JSON.parse(body) as { error?: unknown };
    if (typeof j.error === "string") msg = j.error;
  } catch {
    // not JSON: keep the raw text
  }
  return (msg.split("\n")[0] ?? "").slice(0, 500) || "(empty response)";
}
