// The edge plan: the whole, static Caddy config of an edge (golden JSON: one route that proxies
// every terminated request to HAProxy's router, on-demand TLS that asks the router, the redirect
// server; internal vs ACME CA), the data plane's options (internal listener, log file, ACME
// roots, redirect port), determinism (nothing route-like goes in, so the same options give the
// same bytes), and validation errors that name the field.
import t from "tap";
import { isCapsuleError } from "../../src/errors.js";
import {
  canonicalJson,
  checkUpstream,
  normalizeHost,
  type PlanOptions,
  planCaddyConfig,
} from "../../src/edge/plan.js";

const BASE: PlanOptions = {
  adminSocket: "/var/lib/capsule/caddy/admin.sock",
  storageDir: "/var/lib/capsule/caddy/storage",
  acmeCa: "internal",
  httpPort: 80,
  httpsPort: 443,
  router: { proxy: "127.0.44.3:8081", ask: "http://127.0.44.3:8082/ask" },
};

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

const EDGE = {
  listen: [":443"],
  routes: [
    {
      handle: [
        {
          handler: "reverse_proxy",
          upstreams: [{ dial: "127.0.44.3:8081" }],
        },
      ],
    },
  ],
  tls_connection_policies: [{}],
  automatic_https: { disable_redirects: true },
};

const golden = (issuer: unknown) => ({
  admin: { listen: "unix//var/lib/capsule/caddy/admin.sock", config: { persist: false } },
  storage: { module: "file_system", root: "/var/lib/capsule/caddy/storage" },
  apps: {
    http: {
      http_port: 80,
      https_port: 443,
      servers: { edge: EDGE, "edge-http": REDIRECT },
    },
    pki: { certificate_authorities: { local: { install_trust: false } } },
    tls: {
      automation: {
        policies: [{ issuers: [issuer], on_demand: true }],
        on_demand: { ask: "http://127.0.44.3:8082/ask" },
      },
    },
  },
});

type Servers = Record<string, { listen: string[]; routes: unknown[] }>;
const servers = (c: Record<string, unknown>): Servers =>
  (c["apps"] as { http: { servers: Servers } }).http.servers;

t.test("internal CA: one proxy route to the router, on-demand TLS asking the router", async (t) => {
  t.strictSame(planCaddyConfig(BASE), golden({ module: "internal" }));
});

t.test("ACME directory URL, with and without email", async (t) => {
  const ca = "https://acme-staging-v02.api.letsencrypt.org/directory";
  t.strictSame(
    planCaddyConfig({ ...BASE, acmeCa: ca, email: "ops@example.com" }),
    golden({ module: "acme", ca, email: "ops@example.com" }),
  );
  t.strictSame(planCaddyConfig({ ...BASE, acmeCa: ca }), golden({ module: "acme", ca }));
});

t.test("the edge server has exactly one route, no host matcher, no catch-all 404", async (t) => {
  const c = planCaddyConfig({
    ...BASE,
    router: { proxy: "10.1.2.3:9001", ask: "http://10.1.2.3:9002/may-issue?x=1" },
  });
  const edge = servers(c)["edge"]!;
  t.equal(edge.routes.length, 1);
  const route = edge.routes[0] as Record<string, unknown>;
  t.notOk("match" in route, "every host goes to the router");
  t.notOk("@id" in route);
  t.strictSame(route["handle"], [
    {
      handler: "reverse_proxy",
      upstreams: [{ dial: "10.1.2.3:9001" }],
    },
  ]);
  t.notMatch(JSON.stringify(c), /static_response","status_code":404/, "no 404 route: the router answers it");
  t.notMatch(
    JSON.stringify(c),
    /health_checks/,
    "no health checks on the router: one workload's failures must not take every route out",
  );
  t.notMatch(JSON.stringify(c), /"subjects"/, "no fixed subjects: certificates are on demand");
  t.strictSame((c["apps"] as { tls: unknown }).tls, {
    automation: {
      policies: [{ issuers: [{ module: "internal" }], on_demand: true }],
      on_demand: { ask: "http://10.1.2.3:9002/may-issue?x=1" },
    },
  });
  t.strictSame(servers(c)["edge-http"], REDIRECT, "redirect server unchanged");
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
    });
    const http = (c["apps"] as Record<string, { http_port: number; https_port: number }>)["http"]!;
    t.equal(http.http_port, 80);
    t.equal(http.https_port, 8443);
    t.strictSame(servers(c)["edge"]!.listen, ["127.0.44.3:8443"]);
    t.strictSame(servers(c)["edge-http"]!.listen, [":80"], "redirects on all addresses");
    t.strictSame(servers(c)["edge-http"]!.routes, [
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
            issuers: [
              {
                module: "acme",
                ca,
                email: "ops@example.com",
                trusted_roots_pem_files: ["/etc/capsule/acme-root.pem"],
              },
            ],
            on_demand: true,
          },
        ],
        on_demand: { ask: "http://127.0.44.3:8082/ask" },
      },
    });
    // The internal CA ignores the ACME root and the email.
    const internal = planCaddyConfig({
      ...BASE,
      acmeCaRoot: "/etc/capsule/acme-root.pem",
      email: "ops@example.com",
    });
    t.match(JSON.stringify(internal), /"issuers":\[\{"module":"internal"\}\]/);
    t.notMatch(JSON.stringify(internal), /acme-root|ops@example/);
    t.notOk("logging" in planCaddyConfig(BASE), "no log file: Caddy's default logging");
  },
);

t.test("deterministic and static: the same options give byte-identical JSON", async (t) => {
  const a = JSON.stringify(planCaddyConfig(BASE));
  const b = JSON.stringify(planCaddyConfig({ ...BASE, router: { ...BASE.router } }));
  t.equal(a, b);
  t.equal(canonicalJson(planCaddyConfig(BASE)), canonicalJson(planCaddyConfig({ ...BASE })));
  // Route-like extra properties (what the old plan took) are ignored: the config cannot depend
  // on the routes.
  const withRoutes = {
    ...BASE,
    routes: [{ host: "www.example.com", upstream: "100.64.0.7:8080", workload: "web", capsule: "a" }],
  } as PlanOptions;
  t.equal(JSON.stringify(planCaddyConfig(withRoutes)), a);
  t.notMatch(a, /example\.com|100\.64/);
  // ...while every real option shows.
  t.not(canonicalJson(planCaddyConfig({ ...BASE, httpsPort: 8443 })), canonicalJson(planCaddyConfig(BASE)));
  t.not(
    canonicalJson(planCaddyConfig({ ...BASE, router: { ...BASE.router, proxy: "127.0.44.3:9081" } })),
    canonicalJson(planCaddyConfig(BASE)),
  );
});

t.test("canonicalJson ignores key order only", async (t) => {
  t.equal(canonicalJson({ b: 1, a: [{ d: 2, c: 3 }] }), canonicalJson({ a: [{ c: 3, d: 2 }], b: 1 }));
  t.not(canonicalJson({ a: [1, 2] }), canonicalJson({ a: [2, 1] }));
});

t.test("normalizeHost and checkUpstream (used by the data plane's route validation)", async (t) => {
  t.equal(normalizeHost("API.Example.COM"), "api.example.com");
  for (const bad of ["localhost", "10.0.0.1", "*.example.com", "-a.example.com", `${"a".repeat(64)}.com`])
    t.throws(() => normalizeHost(bad, "routes.host"), /^routes\.host: /, bad);
  t.doesNotThrow(() => checkUpstream("100.64.0.7:8080"));
  for (const bad of ["100.64.0.7", "100.64.0.256:80", "100.64.0.7:0", "web:80", "100.64.0.7:65536"])
    t.throws(() => checkUpstream(bad, "routes.upstream"), /^routes\.upstream: /, bad);
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
    ["proxy without port", { router: { ...BASE.router, proxy: "127.0.44.3" } }, "router.proxy"],
    ["proxy bad ip", { router: { ...BASE.router, proxy: "127.0.44.256:8081" } }, "router.proxy"],
    ["proxy port 0", { router: { ...BASE.router, proxy: "127.0.44.3:0" } }, "router.proxy"],
    ["proxy hostname", { router: { ...BASE.router, proxy: "localhost:8081" } }, "router.proxy"],
    ["proxy URL", { router: { ...BASE.router, proxy: "http://127.0.44.3:8081" } }, "router.proxy"],
    ["ask https", { router: { ...BASE.router, ask: "https://127.0.44.3:8082/ask" } }, "router.ask"],
    ["ask hostname", { router: { ...BASE.router, ask: "http://localhost:8082/ask" } }, "router.ask"],
    ["ask without port", { router: { ...BASE.router, ask: "http://127.0.44.3/ask" } }, "router.ask"],
    ["ask without path", { router: { ...BASE.router, ask: "http://127.0.44.3:8082" } }, "router.ask"],
    ["ask with space", { router: { ...BASE.router, ask: "http://127.0.44.3:8082/a b" } }, "router.ask"],
    ["ask empty", { router: { ...BASE.router, ask: "" } }, "router.ask"],
  ];
  for (const [name, patch, field] of cases) {
    try {
      planCaddyConfig({ ...BASE, ...patch });
      t.fail(`${name}: accepted`);
    } catch (e) {
      t.ok(isCapsuleError(e, "CAPSULE_INVALID_ARGUMENT"), `${name}: invalid argument`);
      t.match((e as Error).message, new RegExp(`^${field.replace(".", "\\.")}: `), `${name}: names ${field}`);
    }
  }
});
