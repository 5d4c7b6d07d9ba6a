// The edge plan: the whole Caddy config for a set of routes (golden JSON for two hosts, internal
// vs ACME CA, no routes), the data plane's options (internal listener, log file, ACME roots,
// redirect port), determinism, and validation errors that name the field.
import t from "tap";
import { isCapsuleError } from "../../src/errors.js";
import { canonicalJson, type EdgeRoute, type PlanOptions, planCaddyConfig } from "../../src/edge/plan.js";

const BASE: Omit<PlanOptions, "routes"> = {
  adminSocket: "/var/lib/capsule/caddy/admin.sock",
  storageDir: "/var/lib/capsule/caddy/storage",
  acmeCa: "internal",
  httpPort: 80,
  httpsPort: 443,
};

const WEB: EdgeRoute = {
  host: "www.example.com",
  upstream: "100.64.0.7:8080",
  workload: "web",
  capsule: "a",
};
const API: EdgeRoute = {
  host: "API.example.com",
  upstream: "100.64.1.2:9000",
  workload: "api",
  capsule: "b",
};

const proxy = (dial: string) => ({
  handler: "reverse_proxy",
  upstreams: [{ dial }],
  health_checks: {
    active: { uri: "/", interval: "5s", timeout: "2s" },
    passive: { fail_duration: "10s", max_fails: 3 },
  },
});

const REDIRECT = {
  listen: [":80"],
  routes: [
    {
      handle: [
        {
          handler: "static_response",
          status_code: 308,
          headers: { Location: ["https://{http.request.host}{http.request.uri}"] },
        },
      ],
    },
  ],
  automatic_https: { disable: true },
};

const golden = (issuer: unknown) => ({
  admin: { listen: "unix//var/lib/capsule/caddy/admin.sock", config: { persist: false } },
  storage: { module: "file_system", root: "/var/lib/capsule/caddy/storage" },
  apps: {
    http: {
      http_port: 80,
      https_port: 443,
      servers: {
        edge: {
          listen: [":443"],
          routes: [
            {
              "@id": "edge-route-api.example.com",
              match: [{ host: ["api.example.com"] }],
              handle: [proxy("100.64.1.2:9000")],
              terminal: true,
            },
            {
              "@id": "edge-route-www.example.com",
              match: [{ host: ["www.example.com"] }],
              handle: [proxy("100.64.0.7:8080")],
              terminal: true,
            },
            { handle: [{ handler: "static_response", status_code: 404 }] },
          ],
          automatic_https: { disable_redirects: true },
        },
        "edge-http": REDIRECT,
      },
    },
    pki: { certificate_authorities: { local: { install_trust: false } } },
    tls: {
      automation: { policies: [{ subjects: ["api.example.com", "www.example.com"], issuers: [issuer] }] },
    },
  },
});

t.test("two hosts with the internal CA", async (t) => {
  t.strictSame(planCaddyConfig({ ...BASE, routes: [WEB, API] }), golden({ module: "internal" }));
});

t.test("two hosts with an ACME directory URL, with and without email", async (t) => {
  const ca = "https://acme-staging-v02.api.letsencrypt.org/directory";
  t.strictSame(
    planCaddyConfig({ ...BASE, acmeCa: ca, email: "ops@example.com", routes: [WEB, API] }),
    golden({ module: "acme", ca, email: "ops@example.com" }),
  );
  t.strictSame(planCaddyConfig({ ...BASE, acmeCa: ca, routes: [WEB, API] }), golden({ module: "acme", ca }));
});

t.test("no routes: admin and storage kept, nothing served, no TLS policy", async (t) => {
  const c = planCaddyConfig({ ...BASE, routes: [] });
  const apps = c["apps"] as Record<string, unknown>;
  t.notOk("tls" in apps);
  t.strictSame((apps["http"] as { servers: unknown }).servers, {
    edge: {
      listen: [":443"],
      routes: [{ handle: [{ handler: "static_response", status_code: 404 }] }],
      automatic_https: { disable_redirects: true },
    },
    "edge-http": REDIRECT,
  });
  t.same(c["admin"], { listen: "unix//var/lib/capsule/caddy/admin.sock", config: { persist: false } });
});

t.test(
  "data plane options: internal listener, log file, ACME roots, non-default redirect port",
  async (t) => {
    const ca = "https://198.51.100.2:14000/dir";
    const c = planCaddyConfig({
      ...BASE,
      acmeCa: ca,
      email: "ops@example.com",
      acmeCaRoot: "/etc/capsule/acme-root.pem",
      httpsHost: "127.0.44.3",
      httpsPort: 8443,
      logFile: "/var/lib/capsule/caddy/events.log",
      routes: [WEB],
    });
    const http = (
      c["apps"] as Record<string, { servers: Record<string, { listen: string[]; routes: unknown[] }> }>
    )["http"]!;
    t.strictSame(http.servers["edge"]!.listen, ["127.0.44.3:8443"]);
    t.strictSame(http.servers["edge-http"]!.routes, [
      {
        handle: [
          {
            handler: "static_response",
            status_code: 308,
            headers: { Location: ["https://{http.request.host}:8443{http.request.uri}"] },
          },
        ],
      },
    ]);
    t.strictSame(c["logging"], {
      logs: {
        default: {
          writer: {
            output: "file",
            filename: "/var/lib/capsule/caddy/events.log",
            roll_size_mb: 10,
            roll_keep: 3,
          },
          encoder: { format: "json" },
          level: "INFO",
        },
      },
    });
    t.strictSame((c["apps"] as { tls: unknown }).tls, {
      automation: {
        policies: [
          {
            subjects: ["www.example.com"],
            issuers: [
              {
                module: "acme",
                ca,
                email: "ops@example.com",
                trusted_roots_pem_files: ["/etc/capsule/acme-root.pem"],
              },
            ],
          },
        ],
      },
    });
    // The internal CA ignores the ACME root.
    const internal = planCaddyConfig({ ...BASE, acmeCaRoot: "/etc/capsule/acme-root.pem", routes: [WEB] });
    t.match(JSON.stringify(internal), /"issuers":\[\{"module":"internal"\}\]/);
    t.notOk("logging" in planCaddyConfig({ ...BASE, routes: [] }), "no log file: Caddy's default logging");
  },
);

t.test("deterministic: route order and repeated calls give identical JSON", async (t) => {
  const a = JSON.stringify(planCaddyConfig({ ...BASE, routes: [WEB, API] }));
  const b = JSON.stringify(planCaddyConfig({ ...BASE, routes: [API, WEB] }));
  const c = JSON.stringify(planCaddyConfig({ ...BASE, routes: [WEB, API] }));
  t.equal(a, b);
  t.equal(a, c);
});

t.test("canonicalJson ignores key order only", async (t) => {
  t.equal(canonicalJson({ b: 1, a: [{ d: 2, c: 3 }] }), canonicalJson({ a: [{ c: 3, d: 2 }], b: 1 }));
  t.not(canonicalJson({ a: [1, 2] }), canonicalJson({ a: [2, 1] }));
});

t.test("validation names the field", async (t) => {
  const cases: [string, Partial<PlanOptions>, string][] = [
    ["relative admin socket", { adminSocket: "caddy.sock" }, "adminSocket"],
    ["long admin socket", { adminSocket: `/${"x".repeat(120)}` }, "adminSocket"],
    ["relative storage", { storageDir: "storage" }, "storageDir"],
    ["bad CA", { acmeCa: "letsencrypt" }, "acmeCa"],
    ["ftp CA", { acmeCa: "ftp://ca.example/dir" }, "acmeCa"],
    ["bad email", { email: "nobody" }, "email"],
    ["port 0", { httpPort: 0 }, "httpPort"],
    ["port too big", { httpsPort: 70000 }, "httpsPort"],
    ["same ports", { httpPort: 443 }, "httpsPort"],
    ["httpsHost not IPv4", { httpsHost: "localhost" }, "httpsHost"],
    ["relative log file", { logFile: "events.log" }, "logFile"],
    ["relative ACME root", { acmeCaRoot: "root.pem" }, "acmeCaRoot"],
    ["single label host", { routes: [{ ...WEB, host: "localhost" }] }, "routes.host"],
    ["IP as host", { routes: [{ ...WEB, host: "10.0.0.1" }] }, "routes.host"],
    ["wildcard host", { routes: [{ ...WEB, host: "*.example.com" }] }, "routes.host"],
    ["hyphen edge", { routes: [{ ...WEB, host: "-a.example.com" }] }, "routes.host"],
    [
      "duplicate host (case-insensitive)",
      { routes: [WEB, { ...API, host: "WWW.example.com" }] },
      "routes.host",
    ],
    ["upstream without port", { routes: [{ ...WEB, upstream: "100.64.0.7" }] }, "routes.upstream"],
    ["upstream bad ip", { routes: [{ ...WEB, upstream: "100.64.0.256:80" }] }, "routes.upstream"],
    ["upstream port 0", { routes: [{ ...WEB, upstream: "100.64.0.7:0" }] }, "routes.upstream"],
    ["upstream hostname", { routes: [{ ...WEB, upstream: "web:80" }] }, "routes.upstream"],
    ["empty workload", { routes: [{ ...WEB, workload: "" }] }, "routes.workload"],
    ["bad capsule", { routes: [{ ...WEB, capsule: "a b" }] }, "routes.capsule"],
  ];
  for (const [name, patch, field] of cases) {
    try {
      planCaddyConfig({ ...BASE, routes: [WEB], ...patch });
      t.fail(`${name}: accepted`);
    } catch (e) {
      t.ok(isCapsuleError(e, "CAPSULE_INVALID_ARGUMENT"), `${name}: invalid argument`);
      t.match((e as Error).message, new RegExp(`^${field.replace(".", "\\.")}: `), `${name}: names ${field}`);
    }
  }
});
