/**
 * Edge plan: the whole Caddy JSON config of an edge capsule, computed from the desired routes.
 *
 * {@link planCaddyConfig} is pure and deterministic (routes sorted by host, keys in a fixed
 * order), so two plans of the same routes are byte-identical and the applier can compare a plan
 * with what Caddy reports (`GET /config/`) to skip a reload. The config is always complete: it
 * is loaded with `POST /load`, which replaces Caddy's config atomically (a rejected config
 * leaves the old one serving), never patched.
 *
 * Shape, and why:
 * - `admin.listen` is `unix//<adminSocket>`: no TCP admin port for anything on the host to reach;
 *   `admin.config.persist` is false so Caddy writes no autosave.json outside the state dir
 *   (capsuled re-applies its routes after every Caddy start).
 * - `storage` is a `file_system` root under the state dir: certificates, ACME accounts and the
 *   internal CA live there and survive restarts.
 * - `apps.pki.certificate_authorities.local.install_trust` is false: the internal CA must never
 *   be added to the host's trust store.
 * - `apps.http.servers.edge` listens on the HTTPS port only, on `httpsHost` when given (the edge
 *   data plane puts it on an internal loopback address behind HAProxy, see ./handoff.ts);
 *   Caddy's automatic HTTPS then serves TLS for every host matcher. Its automatic redirects are
 *   off (`disable_redirects`): they would listen on `httpsHost`'s address only and redirect to
 *   that port. Instead `apps.http.servers.edge-http` listens on `:<httpPort>` with automatic
 *   HTTPS disabled and 308-redirects every request to `https://{host}{uri}` (with `:<httpsPort>`
 *   only when that is not 443). Caddy still answers ACME HTTP-01 challenges on that server
 *   before any route runs (checked against pebble, test/root/edge-dataplane.test.ts).
 * - `logging.logs.default` writes Caddy's JSON log to `logFile` when given, so the edge can read
 *   ACME failures back ("could not get certificate from issuer").
 * - One route per host: a `host` matcher, a `reverse_proxy` to the upstream over the fabric with
 *   active (HTTP `GET /` every {@link ACTIVE_INTERVAL}, 2xx/3xx healthy) and passive health
 *   checks. `trusted_proxies` is left unset on purpose: Caddy 2.6 then ignores any
 *   X-Forwarded-For a visitor sends and sets it to the visitor's address, which is what the
 *   workload sees. A final catch-all route answers 404 for unknown hosts.
 * - `apps.tls.automation.policies` has one policy whose subjects are exactly the routed hosts,
 *   issuing with the ACME issuer (`ca` = the directory URL, `email` when given,
 *   `trusted_roots_pem_files` = [`acmeCaRoot`] when given) or with the `internal` issuer (Caddy's local CA) when the CA is "internal". With no routes the policy and
 *   the hosts are absent: the config is valid, keeps admin and storage, and serves nothing.
 */
import { invalidArgument } from "../errors.js";

/** EdgeRoute is one hostname the edge serves over HTTPS. All fields are required. */
export interface EdgeRoute {
  /** host is the DNS name visitors use (case-insensitive; planned lowercased). Unique across routes. */
  host: string;
  /** upstream is the workload's `ip:port` on the fabric (IPv4). */
  upstream: string;
  /** workload is the exposed workload's name (validated; kept for the caller's bookkeeping). */
  workload: string;
  /** capsule is the capsule the workload runs on (validated; kept for the caller's bookkeeping). */
  capsule: string;
}

/** ACME_INTERNAL is the `acmeCa` value that selects Caddy's own CA instead of an ACME directory. */
export const ACME_INTERNAL = "internal";

/** PlanOptions: everything is required except `email`. */
export interface PlanOptions {
  /** adminSocket is the absolute path of Caddy's admin unix socket. */
  adminSocket: string;
  /** storageDir is the absolute directory Caddy keeps certificates, accounts and its CA in. */
  storageDir: string;
  /** acmeCa is an ACME directory URL (http or https) or {@link ACME_INTERNAL}. */
  acmeCa: string;
  /** email is the ACME account contact; unset = no contact (ignored with the internal CA). */
  email?: string | undefined;
  /** acmeCaRoot is a PEM file of extra roots for the ACME directory's TLS; unset = system roots (ignored with the internal CA). */
  acmeCaRoot?: string | undefined;
  /** httpPort is where Caddy redirects to HTTPS and answers ACME HTTP challenges (all addresses). */
  httpPort: number;
  /** httpsPort is the port visitors use for HTTPS and the one Caddy's TLS server listens on. */
  httpsPort: number;
  /** httpsHost is the IPv4 address Caddy's TLS server binds; unset = all addresses. */
  httpsHost?: string | undefined;
  /** logFile is the absolute path of Caddy's JSON log; unset = Caddy's default (stderr). */
  logFile?: string | undefined;
  /** routes: empty is valid (a config that serves nothing). */
  routes: readonly EdgeRoute[];
}

/** EDGE_SERVER is the name of the HTTPS server in the plan. */
export const EDGE_SERVER = "edge";
/** REDIRECT_SERVER is the name of the plain-HTTP server (ACME HTTP-01 and redirects). */
export const REDIRECT_SERVER = "edge-http";
/** ACTIVE_INTERVAL is how often Caddy probes each upstream. */
export const ACTIVE_INTERVAL = "5s";

/** IPV4 matches a dotted-quad IPv4 address. */
export const IPV4 = /^(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(\.(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)){3}$/;
const LABEL = /^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$/;
const NAME = /^[A-Za-z0-9]([A-Za-z0-9_.-]{0,62})$/;
const EMAIL = /^[^\s@]+@[^\s@]+\.[^\s@]+$/;
/** SOCKET_PATH_MAX is the longest unix socket path Linux takes. */
const SOCKET_PATH_MAX = 107;

function checkPort(field: string, p: number): void {
  if (!Number.isInteger(p) || p < 1 || p > 65535)
    throw invalidArgument(field, `${String(p)} is not a port (1-65535)`);
}

/**
 * normalizeHost lowercases `host` and checks it is a fully qualified DNS name: two or more
 * labels of letters, digits and inner hyphens (1-63 each), 253 characters at most, a
 * non-numeric last label (so an IP address is refused). No wildcards. Throws
 * CAPSULE_INVALID_ARGUMENT naming `field`.
 */
export function normalizeHost(host: string, field = "host"): string {
  const h = host.toLowerCase();
  const labels = h.split(".");
  if (
    h.length > 253 ||
    labels.length < 2 ||
    !labels.every((l) => LABEL.test(l)) ||
    /^\d+$/.test(labels[labels.length - 1] ?? "")
  )
    throw invalidArgument(field, `"${host}" is not a DNS name`, "use a name like app.example.com");
  return h;
}

/** checkUpstream checks `ip:port` (IPv4, port 1-65535). Throws CAPSULE_INVALID_ARGUMENT naming `field`. */
export function checkUpstream(upstream: string, field = "upstream"): void {
  const m = /^([0-9.]+):(\d{1,5})$/.exec(upstream);
  if (!m || !IPV4.test(m[1] ?? "") || Number(m[2]) < 1 || Number(m[2]) > 65535)
    throw invalidArgument(field, `"${upstream}" is not an IPv4 ip:port`);
}

function checkAbsolute(field: string, p: string): void {
  if (!p.startsWith("/") || p.includes("\0")) throw invalidArgument(field, `"${p}" is not an absolute path`);
}

/** issuerFor is the TLS issuer module for `acmeCa` (see {@link PlanOptions.acmeCa}). */
function issuerFor(
  acmeCa: string,
  email: string | undefined,
  root: string | undefined,
): Record<string, unknown> {
  if (acmeCa === ACME_INTERNAL) return { module: "internal" };
  const issuer: Record<string, unknown> = { module: "acme", ca: acmeCa };
  if (email) issuer["email"] = email;
  if (root) issuer["trusted_roots_pem_files"] = [root];
  return issuer;
}

/**
 * planCaddyConfig returns the complete Caddy config for `opts` (see the module comment for its
 * shape). Pure and deterministic: the same options give a deep-equal object with keys in the
 * same order; routes are sorted by host. Throws CAPSULE_INVALID_ARGUMENT naming the field on a
 * relative path, an over-long admin socket path, a CA that is neither "internal" nor an
 * http(s) URL, a malformed email, a bad or shared port, a host that is not a DNS name or is
 * routed twice, a malformed upstream, an empty workload/capsule name, a relative log file or
 * CA root, or an `httpsHost` that is not an IPv4 address.
 */
export function planCaddyConfig(opts: PlanOptions): Record<string, unknown> {
  checkAbsolute("adminSocket", opts.adminSocket);
  if (Buffer.byteLength(opts.adminSocket) > SOCKET_PATH_MAX)
    throw invalidArgument("adminSocket", `"${opts.adminSocket}" is longer than a unix socket path can be`);
  checkAbsolute("storageDir", opts.storageDir);
  if (opts.acmeCa !== ACME_INTERNAL) {
    let ok = false;
    try {
      const u = new URL(opts.acmeCa);
      ok = (u.protocol === "https:" || u.protocol === "http:") && u.hostname !== "";
    } catch {
      ok = false;
    }
    if (!ok)
      throw invalidArgument(
        "acmeCa",
        `"${opts.acmeCa}" is neither "internal" nor an ACME directory URL`,
        "e.g. https://acme-v02.api.letsencrypt.org/directory",
      );
  }
  if (opts.email !== undefined && !EMAIL.test(opts.email))
    throw invalidArgument("email", `"${opts.email}" is not an email address`);
  checkPort("httpPort", opts.httpPort);
  checkPort("httpsPort", opts.httpsPort);
  if (opts.httpPort === opts.httpsPort)
    throw invalidArgument("httpsPort", `${opts.httpsPort} is also the httpPort`);
  if (opts.httpsHost !== undefined && !IPV4.test(opts.httpsHost))
    throw invalidArgument("httpsHost", `"${opts.httpsHost}" is not an IPv4 address`);
  if (opts.logFile !== undefined) checkAbsolute("logFile", opts.logFile);
  if (opts.acmeCaRoot !== undefined) checkAbsolute("acmeCaRoot", opts.acmeCaRoot);

  const byHost = new Map<string, { host: string; upstream: string }>();
  for (const r of opts.routes) {
    const host = normalizeHost(r.host, "routes.host");
    checkUpstream(r.upstream, "routes.upstream");
    if (!NAME.test(r.workload))
      throw invalidArgument("routes.workload", `"${r.workload}" is not a workload name`);
    if (!NAME.test(r.capsule))
      throw invalidArgument("routes.capsule", `"${r.capsule}" is not a capsule name`);
    if (byHost.has(host)) throw invalidArgument("routes.host", `"${host}" is routed more than once`);
    byHost.set(host, { host, upstream: r.upstream });
  }
  const routes = [...byHost.values()].sort((a, b) => (a.host < b.host ? -1 : a.host > b.host ? 1 : 0));
  const hosts = routes.map((r) => r.host);

  const httpRoutes: unknown[] = routes.map((r) => ({
    "@id": `edge-route-${r.host}`,
    match: [{ host: [r.host] }],
    handle: [
      {
        handler: "reverse_proxy",
        upstreams: [{ dial: r.upstream }],
        health_checks: {
          active: { uri: "/", interval: ACTIVE_INTERVAL, timeout: "2s" },
          passive: { fail_duration: "10s", max_fails: 3 },
        },
      },
    ],
    terminal: true,
  }));
  httpRoutes.push({ handle: [{ handler: "static_response", status_code: 404 }] });

  const portSuffix = opts.httpsPort === 443 ? "" : `:${opts.httpsPort}`;
  const apps: Record<string, unknown> = {
    http: {
      http_port: opts.httpPort,
      https_port: opts.httpsPort,
      servers: {
        [EDGE_SERVER]: {
          listen: [`${opts.httpsHost ?? ""}:${opts.httpsPort}`],
          routes: httpRoutes,
          automatic_https: { disable_redirects: true },
        },
        [REDIRECT_SERVER]: {
          listen: [`:${opts.httpPort}`],
          routes: [
            {
              handle: [
                {
                  handler: "static_response",
                  status_code: 308,
                  headers: { Location: [`https://{http.request.host}${portSuffix}{http.request.uri}`] },
                },
              ],
            },
          ],
          automatic_https: { disable: true },
        },
      },
    },
    pki: { certificate_authorities: { local: { install_trust: false } } },
  };
  if (hosts.length > 0) {
    apps["tls"] = {
      automation: {
        policies: [{ subjects: hosts, issuers: [issuerFor(opts.acmeCa, opts.email, opts.acmeCaRoot)] }],
      },
    };
  }
  const config: Record<string, unknown> = {
    admin: { listen: `unix/${opts.adminSocket}`, config: { persist: false } },
    storage: { module: "file_system", root: opts.storageDir },
  };
  if (opts.logFile !== undefined)
    config["logging"] = {
      logs: {
        default: {
          writer: { output: "file", filename: opts.logFile, roll_size_mb: 10, roll_keep: 3 },
          encoder: { format: "json" },
          level: "INFO",
        },
      },
    };
  config["apps"] = apps;
  return config;
}

/**
 * canonicalJson renders `v` as JSON with object keys sorted at every level, so configs that
 * differ only in key order (Caddy's `GET /config/` sorts them) compare equal as strings. Pure.
 */
export function canonicalJson(v: unknown): string {
  return JSON.stringify(sortKeys(v));
}

function sortKeys(v: unknown): unknown {
  if (Array.isArray(v)) return v.map(sortKeys);
  if (v && typeof v === "object") {
    const o = v as Record<string, unknown>;
    return Object.fromEntries(
      Object.keys(o)
        .sort()
        .map((k) => [k, sortKeys(o[k])]),
    );
  }
  return v;
}
