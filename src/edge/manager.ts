/**
 * EdgeRoutes is the edge capsule's route table: the routes peers asked for, kept in SQLite and
 * applied whole to the data plane (Caddy for HTTPS, HAProxy for SNI passthrough, nftables for
 * TCP). Every change is checked first (names, ports, conflicts), stored, then applied; when the
 * data plane refuses, the row is put back as it was and the old state re-applied, so a failed
 * change leaves the old routes serving. Changes are serialized. On start the stored routes are
 * applied again (a restart adopts the running Caddy and HAProxy and changes nothing they serve).
 */
import type { Logger } from "pino";
import { CapsuleError, ErrorCode, invalidArgument } from "../errors.js";
import type { Clock } from "../node/host/clock.js";
import type { EdgeDataPlane, EdgeDesired, RouteStatus } from "./dataplane.js";
import { checkUpstream, normalizeHost } from "./plan.js";
import type { RouteKind, RouteRepo, RouteRow } from "./repo.js";

/** RouteRequest is what a capsule asks of the edge for one of its workloads. */
export interface RouteRequest {
  kind: RouteKind;
  host: string;
  publicPort: number;
  upstream: string;
  workload: string;
  capsule: string;
  capsuleId: string;
}

/** EdgeRoutesOptions wires the manager. */
export interface EdgeRoutesOptions {
  repo: RouteRepo;
  dataplane: EdgeDataPlane;
  /** publicAddress is the address visitors reach. */
  publicAddress: string;
  /** reservedPorts are TCP ports of this capsule a route may not take (80, 443, the API, host ports). */
  reservedPorts: () => readonly { port: number; what: string }[];
  clock: Clock;
  log: Logger;
}

/** RouteView is a route with its status. */
export interface RouteView extends RouteRow {
  cert: string;
  certDetail: string;
  health: string;
}

/** routeKey is the display key of a route: its host, or its public port. */
export function routeKey(r: { host: string; publicPort: number }): string {
  return r.host !== "" ? r.host : String(r.publicPort);
}

/** desiredOf maps stored routes to the data plane's desired state. Pure. */
export function desiredOf(rows: readonly RouteRow[]): EdgeDesired {
  const d: EdgeDesired = { http: [], passthrough: [], tcp: [] };
  for (const r of rows) {
    const base = { upstream: r.upstream, workload: r.workload, capsule: r.capsule };
    if (r.kind === "https") d.http.push({ host: r.host, ...base });
    else if (r.kind === "passthrough") d.passthrough.push({ host: r.host, ...base });
    else d.tcp.push({ publicPort: r.publicPort, ...base });
  }
  return d;
}

/** HEALTH_INTERVAL_MS is how often the edge checks its routes' upstreams and certificates. */
export const HEALTH_INTERVAL_MS = 10_000;

export class EdgeRoutes {
  private chain: Promise<unknown> = Promise.resolve();
  private timer: NodeJS.Timeout | undefined;
  private lastHealth = new Map<string, string>();

  constructor(private readonly o: EdgeRoutesOptions) {}

  get publicAddress(): string {
    return this.o.publicAddress;
  }

  /** start starts (or adopts) the data plane and applies the stored routes. */
  async start(): Promise<void> {
    await this.o.dataplane.start();
    await this.serial(() => this.o.dataplane.apply(desiredOf(this.o.repo.list())));
    this.o.log.info({ routes: this.o.repo.list().length }, "edge routes applied");
    this.timer = setInterval(() => void this.checkHealth(), HEALTH_INTERVAL_MS);
    this.timer.unref();
  }

  /**
   * checkHealth looks at every route's upstream and certificate and logs what changed (a route
   * going unhealthy, a certificate failing): the periodic health check `edge list` and the
   * metrics also show. Never throws.
   */
  async checkHealth(): Promise<void> {
    const views = await this.views().catch(() => []);
    const seen = new Map<string, string>();
    for (const v of views) {
      const key = routeKey(v);
      const state = `${v.health}/${v.cert}`;
      seen.set(key, state);
      if (this.lastHealth.get(key) === state) continue;
      const fields = {
        route: key,
        upstream: v.upstream,
        health: v.health,
        cert: v.cert,
        detail: v.certDetail,
      };
      if (v.health === "unhealthy" || v.cert === "failed") this.o.log.warn(fields, "edge route degraded");
      else this.o.log.info(fields, "edge route state");
    }
    this.lastHealth = seen;
  }

  /** stop stops watching; Caddy, HAProxy and the nft table keep serving. */
  async stop(): Promise<void> {
    if (this.timer) clearInterval(this.timer);
    this.timer = undefined;
    await this.o.dataplane.stop();
  }

  /** list returns the stored routes. */
  list(): RouteRow[] {
    return this.o.repo.list();
  }

  /** views returns the stored routes (only `capsuleId`'s when given) with their status. */
  async views(capsuleId?: string): Promise<RouteView[]> {
    const rows = this.o.repo.list().filter((r) => capsuleId === undefined || r.capsuleId === capsuleId);
    let statuses: RouteStatus[] = [];
    try {
      statuses = await this.o.dataplane.status();
    } catch (e) {
      this.o.log.warn({ err: (e as Error).message }, "edge status unavailable");
    }
    const byKey = new Map(statuses.map((s) => [s.key, s]));
    return rows.map((r) => {
      const s = byKey.get(routeKey(r));
      return {
        ...r,
        cert: s ? s.cert : "unknown",
        certDetail: s?.certDetail ?? "",
        health: s?.health ?? "unknown",
      };
    });
  }

  /**
   * add validates `req`, refuses a host or port another workload holds, stores the route and
   * applies. Returns the stored row and whether it was created, changed or already so.
   */
  add(req: RouteRequest): Promise<{ row: RouteRow; action: "created" | "configured" | "unchanged" }> {
    return this.serial(async () => {
      const row = this.check(req);
      const old = this.o.repo.get(row.host, row.publicPort);
      if (old && (old.capsuleId !== row.capsuleId || old.workload !== row.workload)) {
        const what = row.kind === "tcp" ? `public port ${row.publicPort}` : `host ${row.host}`;
        throw new CapsuleError(
          ErrorCode.AlreadyExists,
          `${what} is already exposed at this edge for workload ${old.workload} on ${old.capsule}`,
          {
            hint:
              row.kind === "tcp"
                ? "pick another public port"
                : "pick another --host, or unexpose the other first",
          },
        );
      }
      if (old && old.kind === row.kind && old.upstream === row.upstream) {
        // Re-apply anyway: cheap when nothing differs, and repairs a data plane that drifted.
        await this.o.dataplane.apply(desiredOf(this.o.repo.list()));
        return { row: old, action: "unchanged" as const };
      }
      const stored = old ? { ...row, createdAt: old.createdAt } : row;
      this.o.repo.store.tx(() => this.o.repo.put(stored));
      try {
        await this.o.dataplane.apply(desiredOf(this.o.repo.list()));
      } catch (e) {
        this.o.repo.store.tx(() => {
          if (old) this.o.repo.put(old);
          else this.o.repo.delete(row.host, row.publicPort);
        });
        await this.o.dataplane.apply(desiredOf(this.o.repo.list())).catch((e2: Error) => {
          this.o.log.error({ err: e2.message }, "edge: re-applying the previous routes failed");
        });
        throw e;
      }
      this.o.log.info(
        { route: routeKey(stored), kind: stored.kind, upstream: stored.upstream, capsule: stored.capsule },
        old ? "edge route changed" : "edge route added",
      );
      return { row: stored, action: old ? ("configured" as const) : ("created" as const) };
    });
  }

  /** remove deletes the route with that key if `capsuleId` owns it; idempotent (false when absent). */
  remove(capsuleId: string, host: string, publicPort: number): Promise<boolean> {
    return this.serial(async () => {
      const key = host !== "" ? normalizeHost(host) : "";
      const old = this.o.repo.get(key, host !== "" ? 0 : publicPort);
      if (!old) return false;
      if (old.capsuleId !== capsuleId) {
        throw new CapsuleError(
          ErrorCode.PermissionDenied,
          `${routeKey(old)} is exposed by ${old.capsule}, not by the calling capsule`,
          { hint: `unexpose it through ${old.capsule}` },
        );
      }
      this.o.repo.store.tx(() => this.o.repo.delete(old.host, old.publicPort));
      try {
        await this.o.dataplane.apply(desiredOf(this.o.repo.list()));
      } catch (e) {
        this.o.repo.store.tx(() => this.o.repo.put(old));
        throw e;
      }
      this.o.log.info({ route: routeKey(old), capsule: old.capsule }, "edge route removed");
      return true;
    });
  }

  /** check validates and normalizes a request into a row. Throws CAPSULE_INVALID_ARGUMENT naming the field. */
  private check(req: RouteRequest): RouteRow {
    if (!["https", "passthrough", "tcp"].includes(req.kind))
      throw invalidArgument("kind", `"${req.kind}" is not https, passthrough or tcp`);
    checkUpstream(req.upstream, "upstream");
    let host = "";
    let publicPort = 0;
    if (req.kind === "tcp") {
      publicPort = req.publicPort;
      if (!Number.isInteger(publicPort) || publicPort < 1 || publicPort > 65535)
        throw invalidArgument("tcp", `public port ${publicPort} is not a port`, "use 1-65535");
      const taken = this.o.reservedPorts().find((r) => r.port === publicPort);
      if (taken)
        throw new CapsuleError(
          ErrorCode.AlreadyExists,
          `public port ${publicPort} is in use at the edge (${taken.what})`,
          { hint: "pick another public port" },
        );
    } else {
      host = normalizeHost(req.host, "host");
    }
    return {
      kind: req.kind,
      host,
      publicPort,
      upstream: req.upstream,
      workload: req.workload,
      capsule: req.capsule,
      capsuleId: req.capsuleId,
      createdAt: new Date(this.o.clock.now()).toISOString(),
    };
  }

  private serial<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.chain.then(fn, fn);
    this.chain = run.catch(() => undefined);
    return run;
  }
}
