/**
 * Edge plan: the whole Caddy JSON config of an edge capsule.
 *
 * The config does not depend on the routes. Caddy terminates TLS for every name HAProxy's router
 * knows (certificates on demand: Caddy asks the router before obtaining one) and proxies every
 * request to that router, which picks the upstream by Host from a map it changes at runtime. So
 * a route change never reloads Caddy; a Caddy reload would close idle keep-alive connections and
 * race requests already on the wire. {@link planCaddyConfig} is pure and deterministic, so the
 * applier can compare the plan with what Caddy reports (`GET /config/`) and skip the load. The
 * config is complete and loaded with `POST /load`, which replaces Caddy's config atomically (a
 * rejected config leaves the old one serving).
 *
 * Shape, and why:
 * - `admin.listen` is `unix//<adminSocket>`: no TCP admin port for anything on the host to reach;
 *   `admin.config.persist` is false so Caddy writes no autosave.json outside the state dir
 *   (capsuled loads the config again after every Caddy start).
 * - `storage` is a `file_system` root under the state dir: certificates, ACME accounts and the
 *   internal CA live there and survive restarts.
 * - `apps.pki.certificate_authorities.local.install_trust` is false: the internal CA must never
 *   be added to the host's trust store.
 * - `apps.http.servers.edge` listens on the HTTPS port only, on `httpsHost` when given (the edge
 *   data plane puts it on an internal loopback address behind HAProxy, see ./handoff.ts), with
 *   TLS on every connection (`tls_connection_policies: [{}]`). Its automatic redirects are off
 *   (`disable_redirects`): they would listen on `httpsHost`'s address only and redirect to that
 *   port. Instead `apps.http.servers.edge-http` listens on `:<httpPort>` with automatic HTTPS
 *   disabled and 308-redirects every request to `https://{host}{uri}` (with `:<httpsPort>` only
 *   when that is not 443). Caddy still answers ACME HTTP-01 challenges on that server before any
 *   route runs.
 * - One route: `reverse_proxy` to `router.proxy`, without health checks (the router answers for
 *   each workload; one workload's failures must not take the others out). `trusted_proxies` is
 *   unset on purpose: Caddy 2.6 then ignores any X-Forwarded-For a visitor sends and sets it to
 *   the visitor's address, which the router passes on to the workload.
 * - `logging.logs.default` writes Caddy's JSON log to `logFile` when given, so the edge can read
 *   ACME progress and failures back.
 * - `apps.tls.automation`: one on-demand policy issuing with the ACME issuer (`ca` = the
 *   directory URL, `email` when given, `trusted_roots_pem_files` = [`acmeCaRoot`] when given) or
 *   with the `internal` issuer (Caddy's local CA) when the CA is "internal"; `on_demand.ask` is
 *   `router.ask`, which answers 200 only for routed names, so nobody can make the edge request
 *   certificates for names it does not serve.
 */
import { invalidArgument } from "../errors.js";
import { socketPathFits } from "../node/host/socket-path.js";

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
  /**
   * router: where every terminated request is proxied (`proxy`, HTTP `ip:port`: HAProxy's
   * router, which picks the upstream by Host from a map it updates without a reload) and the
   * URL on-demand TLS asks before obtaining a certificate for a name (`ask`).
   */
  router: { proxy: string; ask: string };
}

/** EDGE_SERVER is the name of the HTTPS server in the plan. */
export const EDGE_SERVER = "edge";
/** REDIRECT_SERVER is the name of the plain-HTTP server (ACME HTTP-01 and redirects). */
export const REDIRECT_SERVER = "edge-http";

/** IPV4 matches a dotted-quad IPv4 address. */
export const IPV4 = /^(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(\.(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)){3}$/;
const LABEL = /^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$/;
const EMAIL = /^[^\s@]+@[^\s@]+\.[^\s@]+$/;

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
 * same order. Throws CAPSULE_INVALID_ARGUMENT naming the field on a relative path, an over-long
 * admin socket path, a CA that is neither "internal" nor an http(s) URL, a malformed email, a
 * bad or shared port, a relative log file or CA root, an `httpsHost` that is not an IPv4
 * address, a `router.proxy` that is not ip:port or a `router.ask` that is not http://ip:port/.
 */
export function planCaddyConfig(opts: PlanOptions): Record<string, unknown> {
  checkAbsolute("adminSocket", opts.adminSocket);
  if (!socketPathFits(opts.adminSocket))
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

  checkUpstream(opts.router.proxy, "router.proxy");
  const ask = /^http:\/\/([0-9.]+):(\d{1,5})\/\S*$/.exec(opts.router.ask);
  if (!ask || !IPV4.test(ask[1] ?? "") || Number(ask[2]) < 1 || Number(ask[2]) > 65535)
    throw invalidArgument("router.ask", `"${opts.router.ask}" is not an http://ip:port/ URL`);

  const httpRoutes: unknown[] = [
    {
      handle: [
        {
          handler: "reverse_proxy",
          // No health checks on the router: it answers 503 itself for a workload that is down,
          // and one workload's failures must not take every route out.
          upstreams: [{ dial: opts.router.proxy }],
        },
      ],
    },
  ];

  const portSuffix = opts.httpsPort === 443 ? "" : `:${opts.httpsPort}`;
  const apps: Record<string, unknown> = {
    http: {
      http_port: opts.httpPort,
      https_port: opts.httpsPort,
      servers: {
        [EDGE_SERVER]: {
          listen: [`${opts.httpsHost ?? ""}:${opts.httpsPort}`],
          routes: httpRoutes,
          tls_connection_policies: [{}],
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
  apps["tls"] = {
    automation: {
      policies: [{ issuers: [issuerFor(opts.acmeCa, opts.email, opts.acmeCaRoot)], on_demand: true }],
      on_demand: { ask: opts.router.ask },
    },
  };
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

/** canonicalJson: see api/canonical.ts (Caddy's `GET /config/` sorts keys, so configs compare as strings). */
export { canonicalJson } from "../api/canonical.js";
