/**
 * Edge data plane: an edge capsule's packet path behind one facade. TypeScript is only the
 * control plane: it plans configs and hands them to the components that move packets.
 *
 *   visitor ──:80──▶ Caddy (ACME HTTP-01, 308 to https://host/uri)
 *   visitor ──:443─▶ HAProxy (tcp, SNI) ─┬─ passthrough host ─▶ upstream on the fabric (raw TLS)
 *                                        └─ anything else ─▶ Caddy on 127.0.44.3:443, connected
 *                                           from the visitor's own address (IP_TRANSPARENT,
 *                                           ./handoff.ts); Caddy terminates TLS (certificates on
 *                                           demand, only for names the router knows) ─▶ HAProxy's
 *                                           router (HTTP, 127.0.44.3:8081): Host -> upstream from
 *                                           a map ─▶ upstream on the fabric
 *   visitor ──:P───▶ nft DNAT (table ip capsule_edge) ─▶ upstream on the fabric, source kept
 *
 * Each component's config is planned by a pure function (./plan.ts, ./haproxy-plan.ts,
 * ./nft-plan.ts) and applied idempotently. Caddy's config does not depend on the routes: it is
 * loaded once (and after a Caddy restart), so a route change never reloads Caddy and never
 * closes a visitor's connection. HTTPS routes live in HAProxy's map, changed through its runtime
 * API in one atomic commit, without a reload. Only passthrough changes reload HAProxy (seamless:
 * the new worker takes the listeners, the old one finishes its connections; after `haproxy
 * -c`). `nft -f` runs only when the live table differs (after `nft --check`). Every one of them replaces atomically, so a
 * rejected config leaves the old one serving. Caddy and HAProxy run detached and outlive
 * capsuled; a new {@link HostEdgeDataPlane} adopts them (same pids), and {@link
 * EdgeDataPlane.stop} leaves them serving.
 */
import { type FileHandle, open, readFile } from "node:fs/promises";
import { createConnection } from "node:net";
import { join } from "node:path";
import type { Logger } from "pino";
import { CapsuleError, ErrorCode, invalidArgument } from "../errors.js";
import type { Clock } from "../node/host/clock.js";
import type { CommandRunner } from "../node/host/runner.js";
import type { ProcessSpawner } from "../node/host/spawner.js";
import type { CaddyAdmin } from "./admin.js";
import { CaddyEdge, CaddySupervisor, type CaddyState, caddyPaths } from "./caddy.js";
import { connect as tlsConnect } from "node:tls";
import { CADDY_INTERNAL_HOST, Handoff } from "./handoff.js";
import { HaproxySupervisor } from "./haproxy.js";
import { planHaproxyConfig, planRoutesMap } from "./haproxy-plan.js";
import { EDGE_TABLE, deleteEdgeNft, normalizeNft, planEdgeNft, renderEdgeTable } from "./nft-plan.js";
import { IPV4, type PlanOptions, checkUpstream, normalizeHost, planCaddyConfig } from "./plan.js";
import { certStatus, issuerKey, lastCertEvents, passthroughHealth } from "./status.js";

/** ROUTER_BIND is HAProxy's HTTP router, where Caddy proxies what it terminated. */
export const ROUTER_BIND = `${CADDY_INTERNAL_HOST}:8081`;
/** ASK_BIND is where Caddy's on-demand TLS asks whether a name is routed. */
export const ASK_BIND = `${CADDY_INTERNAL_HOST}:8082`;
/** WARM_MS bounds the handshake that makes Caddy obtain a new host's certificate right away. */
const WARM_MS = 30_000;

/** HttpRoute is a hostname the edge terminates TLS for (Caddy) and proxies as HTTP to `upstream`. All fields required. */
export interface HttpRoute {
  /** host is the DNS name visitors use (case-insensitive). */
  host: string;
  /** upstream is the workload's `ip:port` on the fabric (IPv4). */
  upstream: string;
  workload: string;
  capsule: string;
}

/** PassthroughRoute is a hostname whose TLS is not terminated: HAProxy routes it by SNI to `upstream`. All fields required. */
export interface PassthroughRoute {
  host: string;
  upstream: string;
  workload: string;
  capsule: string;
}

/** TcpRoute is a public TCP port DNATed to `upstream` (the visitor's address is kept). All fields required. */
export interface TcpRoute {
  publicPort: number;
  upstream: string;
  workload: string;
  capsule: string;
}

/** EdgeDesired is the whole desired state (declarative: empty lists = serve nothing of that kind). */
export interface EdgeDesired {
  http: HttpRoute[];
  passthrough: PassthroughRoute[];
  tcp: TcpRoute[];
}

/** CertState is where a terminated host's certificate is. */
export type CertState = "valid" | "pending" | "failed" | "none";

/** RouteStatus is one route as the data plane sees it. */
export interface RouteStatus {
  kind: "http" | "passthrough" | "tcp";
  /** key is the host, or String(publicPort) for tcp. */
  key: string;
  /** cert is "none" for passthrough/tcp. */
  cert: CertState;
  /** certDetail is e.g. "expires 2027-02-21T.. (issuer ...)", the ACME error Caddy logged, or "". */
  certDetail: string;
  health: "healthy" | "unhealthy" | "unknown";
}

/** EdgeDataPlaneOptions: optional fields say what unset means. */
export interface EdgeDataPlaneOptions {
  /** stateDir is capsuled's state dir; Caddy and HAProxy keep theirs under it. */
  stateDir: string;
  runner: CommandRunner;
  spawner: ProcessSpawner;
  clock: Clock;
  log: Logger;
  /** publicAddress is the IPv4 visitors reach: HAProxy binds publicAddress:httpsPort, DNAT matches ip daddr publicAddress. */
  publicAddress: string;
  /** fabricIface is the fabric interface (e.g. "capsule0"). */
  fabricIface: string;
  /** acmeCa is an ACME directory URL or "internal". */
  acmeCa: string;
  /** acmeCaRoot is a PEM file of extra roots to trust for the ACME directory's TLS; unset = system roots. */
  acmeCaRoot?: string;
  /** acmeEmail is the ACME account contact; unset = none. */
  acmeEmail?: string;
  /** httpPort; unset = 80. */
  httpPort?: number;
  /** httpsPort; unset = 443. */
  httpsPort?: number;
  /** tcpProbe tells whether `ip:port` accepts a TCP connection within `timeoutMs`; unset = a node:net connect from this process. */
  tcpProbe?: (ip: string, port: number, timeoutMs: number) => Promise<boolean>;
  /** caddy / haproxy are the binaries; unset = from PATH. */
  caddy?: string;
  haproxy?: string;
  /** timeoutMs bounds each wait for a component (start, reload, exit); unset = 15000. */
  timeoutMs?: number;
  /** watchIntervalMs is how often the supervisors check Caddy and HAProxy are alive; unset = 3000. */
  watchIntervalMs?: number;
  /** caddyAdmin makes Caddy's admin client for a socket path; unset = UnixCaddyAdmin (tests pass FakeCaddyAdmin). */
  caddyAdmin?: (socketPath: string) => CaddyAdmin;
  /** haproxyCommand sends one line to a HAProxy unix socket; unset = a node:net client (tests pass a fake). */
  haproxyCommand?: (path: string, command: string, timeoutMs: number) => Promise<string>;
}

/** EdgeDataPlane is the edge's packet path behind one facade. */
export interface EdgeDataPlane {
  /**
   * start makes Caddy and HAProxy run (adopting running ones untouched: a healthy one is never
   * restarted), installs the static host plumbing (the hand-off rule and route) and starts
   * supervising both (restart with backoff when one dies). Idempotent.
   */
  start(): Promise<void>;
  /**
   * apply makes the edge serve exactly `d` (declarative: the whole set). Everything is validated
   * first (CAPSULE_INVALID_ARGUMENT naming the field; nothing changed), then Caddy, HAProxy and
   * the nft table are each brought to the plan, each only when it differs. Idempotent. Calls run
   * one at a time.
   */
  apply(d: EdgeDesired): Promise<void>;
  /** status reports every route of the last applied state (see ./status.ts for the rules). Never throws. */
  status(): Promise<RouteStatus[]>;
  /** stop ends watchers/timers only: Caddy, HAProxy and nft rules keep serving. Idempotent. */
  stop(): Promise<void>;
  /** shutdown really stops Caddy and HAProxy and deletes the table and hand-off (tests/cleanup). Idempotent. */
  shutdown?(): Promise<void>;
}

/** FABRIC_CIDR is the range every upstream must be in: the edge never forwards visitors elsewhere. */
export const FABRIC_CIDR = "100.64.0.0/10";

const NAME = /^[A-Za-z0-9]([A-Za-z0-9_.-]{0,62})$/;
const IFACE = /^[A-Za-z0-9_.-]{1,15}$/;
const PROBE_MS = 1_000;

const inFabric = (ip: string) => {
  const [a, b] = ip.split(".").map(Number);
  return a === 100 && (b ?? 0) >= 64 && (b ?? 0) <= 127;
};

/**
 * validateDesired checks a whole desired state and returns it normalized (hosts lowercased).
 * Pure. Throws CAPSULE_INVALID_ARGUMENT naming the field (`http.host`, `passthrough.upstream`,
 * `tcp.publicPort`, ...): a host that is not a DNS name or is routed twice (also across http
 * and passthrough), an upstream that is not `ip:port` in 100.64.0.0/10, a bad workload or
 * capsule name, a public port out of range, routed twice, or equal to the HTTP/HTTPS port.
 */
export function validateDesired(d: EdgeDesired, httpPort: number, httpsPort: number): EdgeDesired {
  for (const k of ["http", "passthrough", "tcp"] as const)
    if (!Array.isArray(d?.[k])) throw invalidArgument(k, "must be a list (empty = none)");
  const hosts = new Set<string>();
  const common = (kind: string, r: { upstream: string; workload: string; capsule: string }) => {
    checkUpstream(r.upstream, `${kind}.upstream`);
    const ip = r.upstream.split(":")[0] ?? "";
    if (!inFabric(ip))
      throw invalidArgument(
        `${kind}.upstream`,
        `"${r.upstream}" is not on the fabric (${FABRIC_CIDR})`,
        "the edge only forwards to workloads on the fabric",
      );
    if (!NAME.test(r.workload))
      throw invalidArgument(`${kind}.workload`, `"${r.workload}" is not a workload name`);
    if (!NAME.test(r.capsule))
      throw invalidArgument(`${kind}.capsule`, `"${r.capsule}" is not a capsule name`);
  };
  const hostRoutes = <T extends { host: string; upstream: string; workload: string; capsule: string }>(
    kind: string,
    rs: readonly T[],
  ): T[] =>
    rs.map((r) => {
      const host = normalizeHost(r.host, `${kind}.host`);
      if (hosts.has(host))
        throw invalidArgument(
          `${kind}.host`,
          `"${host}" is routed more than once`,
          "a host is either terminated or passed through",
        );
      hosts.add(host);
      common(kind, r);
      return { ...r, host };
    });
  const http = hostRoutes("http", d.http);
  const passthrough = hostRoutes("passthrough", d.passthrough);
  const ports = new Set<number>();
  const tcp = d.tcp.map((r) => {
    const p = r.publicPort;
    if (!Number.isInteger(p) || p < 1 || p > 65535)
      throw invalidArgument("tcp.publicPort", `${String(p)} is not a port (1-65535)`);
    if (p === httpPort || p === httpsPort)
      throw invalidArgument("tcp.publicPort", `${p} is the edge's ${p === httpPort ? "HTTP" : "HTTPS"} port`);
    if (ports.has(p)) throw invalidArgument("tcp.publicPort", `${p} is routed more than once`);
    ports.add(p);
    common("tcp", r);
    return { ...r };
  });
  return { http, passthrough, tcp };
}

/** defaultProbe connects with node:net from this process (capsuled runs in the edge's network namespace). */
function defaultProbe(ip: string, port: number, timeoutMs: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = createConnection({ host: ip, port });
    const done = (ok: boolean) => {
      clearTimeout(timer);
      s.destroy();
      resolve(ok);
    };
    const timer = setTimeout(() => done(false), timeoutMs);
    s.once("connect", () => done(true));
    s.once("error", () => done(false));
  });
}

/** Plans is one desired state planned for every component. */
interface Plans {
  desired: EdgeDesired;
  haproxy: string;
  routesMap: string;
  nft: string;
  nftTable: string;
}

/** DataPlaneCounters counts what this object changed (for tests and metrics). */
export interface DataPlaneCounters {
  caddyLoads: number;
  haproxyReloads: number;
  /** routerCommits counts runtime updates of the HTTPS routes map (no reload). */
  routerCommits: number;
  nftApplies: number;
}

/** LOG_TAIL_BYTES bounds how much of Caddy's log status() reads. */
const LOG_TAIL_BYTES = 2 * 1024 * 1024;

/**
 * HostEdgeDataPlane is the real {@link EdgeDataPlane}: Caddy and HAProxy under
 * `<stateDir>/caddy` and `<stateDir>/haproxy`, the nft table `ip capsule_edge`, and the hand-off
 * rule and route (see the module comment).
 */
export class HostEdgeDataPlane implements EdgeDataPlane {
  /** counters says what this object changed; an unchanged apply adds nothing. */
  readonly counters: DataPlaneCounters = {
    caddyLoads: 0,
    haproxyReloads: 0,
    routerCommits: 0,
    nftApplies: 0,
  };
  private readonly o: EdgeDataPlaneOptions;
  private readonly httpPort: number;
  private readonly httpsPort: number;
  private readonly caddySup: CaddySupervisor;
  private readonly haproxy: HaproxySupervisor;
  private readonly handoff: Handoff;
  private readonly caddyBase: PlanOptions;
  private readonly routesMapFile: string;
  private readonly probe: (ip: string, port: number, timeoutMs: number) => Promise<boolean>;
  private caddyState: CaddyState | undefined;
  private caddyEdge: CaddyEdge | undefined;
  private desired: EdgeDesired | undefined;
  private nftApplied: string | undefined;
  private watching: AbortController | undefined;
  private queue: Promise<unknown> = Promise.resolve();

  constructor(o: EdgeDataPlaneOptions) {
    this.o = o;
    this.httpPort = o.httpPort ?? 80;
    this.httpsPort = o.httpsPort ?? 443;
    const timeoutMs = o.timeoutMs ?? 15_000;
    this.caddySup = new CaddySupervisor({
      runner: o.runner,
      spawner: o.spawner,
      clock: o.clock,
      timeoutMs,
      ...(o.caddy ? { caddy: o.caddy } : {}),
      ...(o.caddyAdmin ? { admin: o.caddyAdmin } : {}),
    });
    this.haproxy = new HaproxySupervisor({
      stateDir: o.stateDir,
      runner: o.runner,
      spawner: o.spawner,
      clock: o.clock,
      timeoutMs,
      ...(o.haproxy ? { haproxy: o.haproxy } : {}),
      ...(o.haproxyCommand ? { command: o.haproxyCommand } : {}),
    });
    this.handoff = new Handoff(o.runner);
    const p = caddyPaths(o.stateDir);
    this.caddyBase = {
      adminSocket: p.adminSocket,
      storageDir: p.storage,
      acmeCa: o.acmeCa,
      email: o.acmeEmail,
      acmeCaRoot: o.acmeCaRoot,
      httpPort: this.httpPort,
      httpsPort: this.httpsPort,
      httpsHost: CADDY_INTERNAL_HOST,
      logFile: join(p.dir, "events.log"),
      router: { proxy: ROUTER_BIND, ask: `http://${ASK_BIND}/ask` },
    };
    this.routesMapFile = this.haproxy.paths.routesMap;
    this.probe = o.tcpProbe ?? defaultProbe;
  }

  /** paths of the components, for tests and diagnostics. */
  get paths(): { caddy: ReturnType<typeof caddyPaths>; haproxy: HaproxySupervisor["paths"] } {
    return { caddy: caddyPaths(this.o.stateDir), haproxy: this.haproxy.paths };
  }

  /** pids of the running Caddy and HAProxy master (undefined when not running or not ours). */
  async pids(): Promise<{ caddy: number | undefined; haproxy: number | undefined }> {
    return {
      caddy: await this.caddySup.pid({ stateDir: this.o.stateDir }),
      haproxy: await this.haproxy.pid(),
    };
  }

  private serial<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.queue.then(fn, fn);
    this.queue = run.catch(() => undefined);
    return run;
  }

  /** plan validates `d` and the fixed options and plans every component. Pure (no I/O). */
  private plan(d: EdgeDesired): Plans {
    if (!IPV4.test(this.o.publicAddress))
      throw invalidArgument("publicAddress", `"${this.o.publicAddress}" is not an IPv4 address`);
    if (!IFACE.test(this.o.fabricIface))
      throw invalidArgument("fabricIface", `"${this.o.fabricIface}" is not an interface name`);
    const desired = validateDesired(d, this.httpPort, this.httpsPort);
    // Caddy's plan validates the ACME options and ports too; it is planned again at apply.
    planCaddyConfig(this.caddyBase);
    const haproxy = planHaproxyConfig({
      statsSocket: this.haproxy.paths.statsSocket,
      publicAddress: this.o.publicAddress,
      httpsPort: this.httpsPort,
      caddy: `${CADDY_INTERNAL_HOST}:${this.httpsPort}`,
      passthrough: desired.passthrough,
      router: { bind: ROUTER_BIND, askBind: ASK_BIND, map: this.routesMapFile },
    });
    const nftOpts = {
      publicAddress: this.o.publicAddress,
      fabricIface: this.o.fabricIface,
      tcp: desired.tcp,
    };
    return {
      desired,
      haproxy,
      routesMap: planRoutesMap(desired.http),
      nft: planEdgeNft(nftOpts),
      nftTable: normalizeNft(renderEdgeTable(nftOpts)),
    };
  }

  start(): Promise<void> {
    return this.serial(async () => {
      const empty = this.plan(this.desired ?? { http: [], passthrough: [], tcp: [] });
      await this.handoff.ensure();
      const caddy = await this.caddySup.ensure({ stateDir: this.o.stateDir });
      this.caddyState = caddy;
      this.caddyEdge ??= new CaddyEdge({ admin: caddy.admin, plan: this.caddyBase });
      const hap = await this.haproxy.ensure(() => empty.haproxy);
      this.o.log.info(
        {
          caddyPid: caddy.pid,
          caddyAdopted: caddy.adopted,
          haproxyPid: hap.pid,
          haproxyAdopted: hap.adopted,
        },
        "edge data plane started",
      );
      if ((await this.caddyEdge.apply()).changed) this.counters.caddyLoads++;
      this.watch();
    });
  }

  /** watch starts both supervisors' watch loops once. */
  private watch(): void {
    if (this.watching) return;
    const ac = new AbortController();
    this.watching = ac;
    const intervalMs = this.o.watchIntervalMs ?? 3_000;
    void this.caddySup.watch({
      stateDir: this.o.stateDir,
      signal: ac.signal,
      intervalMs,
      onRestart: async (s) => {
        this.o.log.warn({ pid: s.pid }, "edge: caddy restarted");
        const r = await this.caddyEdge?.apply();
        if (r?.changed) this.counters.caddyLoads++;
      },
    });
    void this.haproxy.watch({
      signal: ac.signal,
      intervalMs,
      initialConfig: () => this.plan(this.desired ?? { http: [], passthrough: [], tcp: [] }).haproxy,
      onRestart: () => this.o.log.warn("edge: haproxy restarted"),
    });
  }

  apply(d: EdgeDesired): Promise<void> {
    // Validation happens before the queue, so a bad state is refused at once and changes nothing.
    let plans: Plans;
    try {
      plans = this.plan(d);
    } catch (e) {
      return Promise.reject(e);
    }
    return this.serial(async () => {
      if (!this.caddyEdge)
        throw new CapsuleError(ErrorCode.FailedPrecondition, "edge data plane is not started", {
          hint: "call start() first",
        });
      const caddy = await this.caddyEdge.apply();
      if (caddy.changed) this.counters.caddyLoads++;
      // The map first: a name HAProxy routes is one Caddy may get a certificate for.
      const map = await this.haproxy.applyMap(this.routesMapFile, plans.routesMap);
      if (map.changed) this.counters.routerCommits++;
      const hap = await this.haproxy.apply(plans.haproxy);
      if (hap.changed) this.counters.haproxyReloads++;
      if (await this.applyNft(plans)) this.counters.nftApplies++;
      const before = new Set((this.desired?.http ?? []).map((r) => r.host));
      this.desired = plans.desired;
      for (const r of plans.desired.http) if (!before.has(r.host)) this.warm(r.host);
      if (caddy.changed || hap.changed || map.changed)
        this.o.log.info(
          {
            http: plans.desired.http.length,
            passthrough: plans.desired.passthrough.length,
            tcp: plans.desired.tcp.length,
            caddy: caddy.changed,
            router: map.changed,
            haproxy: hap.changed,
          },
          "edge routes applied",
        );
    });
  }

  /**
   * warm makes Caddy obtain `host`'s certificate now rather than at the first visitor: a TLS
   * handshake with that name to Caddy's internal listener (on-demand TLS asks the router, which
   * knows the host by now). Best effort, bounded, never awaited; the outcome shows in status().
   */
  private warm(host: string): void {
    const s = tlsConnect({
      host: CADDY_INTERNAL_HOST,
      port: this.httpsPort,
      servername: host,
      rejectUnauthorized: false,
      timeout: WARM_MS,
    });
    const done = () => s.destroy();
    s.once("secureConnect", done);
    s.once("timeout", done);
    s.once("error", done);
  }

  /** applyNft replaces the table when the live one differs; true when it did. */
  private async applyNft(p: Plans): Promise<boolean> {
    if (this.nftApplied === undefined) {
      const cur = await this.o.runner.run(["nft", "list", "table", "ip", EDGE_TABLE], { allowFailure: true });
      this.nftApplied = cur.exitCode === 0 ? normalizeNft(cur.stdout) : "";
    }
    if (this.nftApplied === p.nftTable) return false;
    await this.o.runner.run(["nft", "--check", "-f", "-"], { input: p.nft });
    await this.o.runner.run(["nft", "-f", "-"], { input: p.nft });
    this.nftApplied = p.nftTable;
    return true;
  }

  async status(): Promise<RouteStatus[]> {
    const d = this.desired;
    if (!d) return [];
    const p = caddyPaths(this.o.stateDir);
    const now = this.o.clock.now();
    const events = lastCertEvents(await readTail(this.caddyBase.logFile ?? "", LOG_TAIL_BYTES));
    const key = issuerKey(this.o.acmeCa);
    const rows = d.passthrough.length ? await this.haproxy.stats() : [];
    const probe = (upstream: string) => {
      const [ip = "", port = "0"] = upstream.split(":");
      return this.probe(ip, Number(port), PROBE_MS).catch(() => false);
    };
    const out: RouteStatus[] = [];
    await Promise.all([
      ...d.http.map(async (r) => {
        const pem = await readFile(
          join(p.storage, "certificates", key, r.host, `${r.host}.crt`),
          "utf8",
        ).catch(() => undefined);
        out.push({
          kind: "http",
          key: r.host,
          ...certStatus(pem, events.get(r.host), now),
          health: (await probe(r.upstream)) ? "healthy" : "unhealthy",
        });
      }),
      ...d.passthrough.map(async (r) => {
        out.push({
          kind: "passthrough",
          key: r.host,
          cert: "none",
          certDetail: "",
          health: passthroughHealth(r.host, rows),
        });
      }),
      ...d.tcp.map(async (r) => {
        out.push({
          kind: "tcp",
          key: String(r.publicPort),
          cert: "none",
          certDetail: "",
          health: (await probe(r.upstream)) ? "healthy" : "unhealthy",
        });
      }),
    ]);
    const order = { http: 0, passthrough: 1, tcp: 2 };
    return out.sort((a, b) =>
      a.kind !== b.kind
        ? order[a.kind] - order[b.kind]
        : a.kind === "tcp"
          ? Number(a.key) - Number(b.key)
          : a.key < b.key
            ? -1
            : a.key > b.key
              ? 1
              : 0,
    );
  }

  async stop(): Promise<void> {
    this.watching?.abort();
    this.watching = undefined;
    await this.serial(async () => {
      await this.caddyState?.admin.close();
    });
  }

  async shutdown(): Promise<void> {
    await this.stop();
    await this.serial(async () => {
      await this.caddySup.stop({ stateDir: this.o.stateDir });
      await this.haproxy.stop();
      await this.o.runner.run(["nft", "-f", "-"], { input: deleteEdgeNft() });
      this.nftApplied = undefined;
      await this.handoff.remove();
      this.caddyEdge = undefined;
      this.caddyState = undefined;
    });
  }
}

/** readTail returns the last `max` bytes of `file` ("" when missing). Never throws. */
async function readTail(file: string, max: number): Promise<string> {
  let fh: FileHandle | undefined;
  try {
    fh = await open(file, "r");
    const { size } = await fh.stat();
    const len = Math.min(size, max);
    const buf = Buffer.alloc(len);
    await fh.read(buf, 0, len, size - len);
    // The first line may be cut: the JSON parse skips it.
    return buf.toString("utf8");
  } catch {
    return "";
  } finally {
    await fh?.close().catch(() => undefined);
  }
}
