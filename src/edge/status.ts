/**
 * Route status of an edge, from what the components themselves report. The functions here are
 * pure; the data plane (./dataplane.ts) gathers their inputs.
 *
 * Certificates (terminated hosts only; passthrough and TCP routes report "none"):
 * - "valid": Caddy's storage holds a certificate for the host from the configured issuer
 *   (`certificates/<issuer key>/<host>/<host>.crt`, the path certmagic uses) that has not
 *   expired; the detail is its notAfter and issuer.
 * - "failed": no usable certificate, and the last certificate event Caddy logged for the host
 *   is an error (e.g. "could not get certificate from issuer", a failed challenge); the detail
 *   is Caddy's error text. An expired certificate is "failed" too. Caddy keeps retrying with
 *   backoff; the state stays "failed" until an attempt succeeds.
 * - "pending": no certificate and no logged error yet (Caddy is still obtaining it).
 *
 * Health:
 * - http and tcp: a TCP connect from the edge to the upstream with a short timeout (the router
 *   picks each request's upstream from a map, so there is no per-upstream check in HAProxy).
 * - passthrough: HAProxy's own TCP check (`show stat`, server status): UP = "healthy", DOWN =
 *   "unhealthy", anything else (no check yet, MAINT, no such backend) = "unknown".
 */
import { X509Certificate } from "node:crypto";
import { PASSTHROUGH_PREFIX, PASSTHROUGH_SERVER } from "./haproxy-plan.js";
import type { StatRow } from "./haproxy.js";
import { ACME_INTERNAL } from "./plan.js";
import type { CertState, RouteStatus } from "./dataplane.js";

/**
 * issuerKey is the directory certmagic stores an issuer's certificates under: "local" for
 * Caddy's internal CA; for ACME the directory URL's host and path, "/" and ":" made "-", then
 * made a safe key (lowercase; only word characters, "@", "." and "-"). Pure.
 */
export function issuerKey(acmeCa: string): string {
  if (acmeCa === ACME_INTERNAL) return "local";
  let key = acmeCa;
  try {
    const u = new URL(acmeCa);
    key = u.host;
    const path = u.pathname.replace(/[/\\]/g, "-").replace(/^-+|-+$/g, "");
    if (path) key += `-${path}`;
  } catch {
    // not a URL: certmagic keeps the raw string
  }
  return key
    .toLowerCase()
    .trim()
    .replace(/ /g, "_")
    .replace(/\+/g, "_plus_")
    .replace(/\*/g, "wildcard_")
    .replace(/:/g, "-")
    .replace(/\.\./g, "")
    .replace(/[^\w@.-]/g, "");
}

/** CertEvent is the last certificate event Caddy logged for one host. */
export interface CertEvent {
  ok: boolean;
  /** error is Caddy's error text when `ok` is false. */
  error: string;
  /** ts is Caddy's timestamp (seconds since the epoch). */
  ts: number;
  /** progress is the last step Caddy logged while obtaining (no error yet), e.g. "trying to solve challenge (http-01)". */
  progress?: string;
}

/** PROGRESS are the info-level steps of obtaining a certificate that `pending` reports. */
const PROGRESS = new Set([
  "obtaining certificate",
  "trying to solve challenge",
  "validations succeeded; finalizing order",
]);

/**
 * lastCertEvents reads Caddy's JSON log lines and returns, per host, the last certificate
 * event: "certificate obtained successfully" (ok), or an error-level entry about the host (its
 * `identifier`, or an error text starting with "[host]"). Lines that are not JSON are skipped.
 * Pure.
 */
export function lastCertEvents(log: string): Map<string, CertEvent> {
  const out = new Map<string, CertEvent>();
  for (const line of log.split("\n")) {
    if (!line.startsWith("{")) continue;
    let e: Record<string, unknown>;
    try {
      e = JSON.parse(line) as Record<string, unknown>;
    } catch {
      continue;
    }
    const ts = typeof e["ts"] === "number" ? e["ts"] : 0;
    const err = typeof e["error"] === "string" ? e["error"] : "";
    let host = typeof e["identifier"] === "string" ? e["identifier"].toLowerCase() : "";
    if (!host) host = /^\[([^\]\s]+)\]/.exec(err)?.[1]?.toLowerCase() ?? "";
    if (!host) continue;
    if (e["msg"] === "certificate obtained successfully") out.set(host, { ok: true, error: "", ts });
    else if (typeof e["msg"] === "string" && PROGRESS.has(e["msg"])) {
      const prev = out.get(host);
      if (prev && !prev.ok && !prev.progress) continue; // failed stays failed until a success
      const how = typeof e["challenge_type"] === "string" ? ` (${e["challenge_type"]})` : "";
      const since = prev?.progress ? prev.ts : ts;
      out.set(host, {
        ok: false,
        error: "",
        ts: since,
        progress: `${e["msg"]}${how} since ${new Date(since * 1000).toISOString()}`,
      });
    } else if (e["level"] === "error" && err) {
      const msg = typeof e["msg"] === "string" ? e["msg"] : "error";
      out.set(host, { ok: false, error: `${msg}: ${err}`, ts });
    }
  }
  return out;
}

/**
 * certStatus decides a terminated host's certificate state from its stored certificate (PEM,
 * or undefined when there is none), the last logged event, and the time now (ms). Pure but for
 * parsing the PEM. See the module comment.
 */
export function certStatus(
  pem: string | undefined,
  event: CertEvent | undefined,
  nowMs: number,
): { cert: CertState; certDetail: string } {
  if (pem !== undefined) {
    try {
      const x = new X509Certificate(pem);
      const notAfter = new Date(x.validTo);
      const issuer = /(?:^|\n)CN=([^\n]*)/.exec(x.issuer)?.[1] ?? x.issuer.replace(/\n/g, ", ");
      if (notAfter.getTime() > nowMs)
        return { cert: "valid", certDetail: `expires ${notAfter.toISOString()} (issuer ${issuer})` };
      const last = event && !event.ok ? `; ${event.error}` : "";
      return { cert: "failed", certDetail: `expired ${notAfter.toISOString()} (issuer ${issuer})${last}` };
    } catch {
      // unreadable certificate: decide from the log
    }
  }
  if (event?.progress) return { cert: "pending", certDetail: event.progress };
  if (event && !event.ok) return { cert: "failed", certDetail: event.error };
  return { cert: "pending", certDetail: "" };
}

/** passthroughHealth reads the host's backend server status from `show stat` rows. Pure. */
export function passthroughHealth(host: string, rows: readonly StatRow[]): RouteStatus["health"] {
  const row = rows.find((r) => r.proxy === `${PASSTHROUGH_PREFIX}${host}` && r.server === PASSTHROUGH_SERVER);
  if (!row) return "unknown";
  if (row.status.startsWith("UP")) return "healthy";
  if (row.status.startsWith("DOWN")) return "unhealthy";
  return "unknown";
}
