/**
 * Exposures: this capsule's workloads published at edges. The capsule that runs a workload owns
 * its exposures: it checks the request, records it, adds exactly the implicit allow rule
 * edge -> workload:port (and, for raw TCP, lets the edge's visitors in with their own address),
 * enforces that, and only then asks the edge to route to it. When the edge refuses, everything
 * is put back as it was. Unexpose runs the other way round: the edge stops routing first, then
 * the rule goes. Changes are serialized.
 */
import type { Logger } from "pino";
import { normalizeHost } from "../../edge/plan.js";
import type { RouteKind } from "../../edge/repo.js";
import { CapsuleError, ErrorCode, invalidArgument } from "../../errors.js";
import type { ImplicitRule } from "../../fabric/policy/model.js";
import { WORKLOAD_NAME } from "../../fabric/policy/model.js";
import type { Clock } from "../host/clock.js";
import type { ExposureRepo, ExposureRow } from "./repo.js";

/** EdgeRouteWire is a route as sent to an edge. */
export interface EdgeRouteWire {
  kind: RouteKind;
  host: string;
  publicPort: number;
  upstream: string;
  workload: string;
}

/** EdgeRouteStatus is a route as an edge reports it. */
export interface EdgeRouteStatus extends EdgeRouteWire {
  capsule: string;
  edge: string;
  cert: string;
  certDetail: string;
  health: string;
  publicAddress: string;
}

/** EdgeLink reaches an edge (this capsule itself, or a peer over the fabric). */
export interface EdgeLink {
  /** check throws a clear error unless `edge` is this capsule or an enrolled edge peer. */
  check(edge: string): void;
  addRoute(edge: string, route: EdgeRouteWire): Promise<{ publicAddress: string }>;
  removeRoute(edge: string, route: EdgeRouteWire): Promise<boolean>;
  /** status lists this capsule's routes on `edge`. */
  status(edge: string): Promise<EdgeRouteStatus[]>;
}

/** ExposeRequest is `expose WORKLOAD --edge EDGE (--host NAME --port PORT [--passthrough] | --tcp PUBLIC:PORT)`. */
export interface ExposeRequest {
  workload: string;
  edge: string;
  host: string;
  port: number;
  passthrough: boolean;
  publicPort: number;
}

/** ExposureView is an exposure with what the edge says of it. */
export interface ExposureView extends ExposureRow {
  cert: string;
  certDetail: string;
  health: string;
  publicAddress: string;
}

/** ExposuresOptions wires the manager. */
export interface ExposuresOptions {
  repo: ExposureRepo;
  /** address returns a local workload's fabric address, or undefined when there is no such workload. */
  address: (workload: string) => string | undefined;
  edges: EdgeLink;
  /** enforce recompiles and applies this capsule's policy now (the implicit rules changed). */
  enforce: () => Promise<void>;
  /** visitorsChanged re-plans WireGuard after a TCP exposure came or went (AllowedIPs 0.0.0.0/0). */
  visitorsChanged: () => Promise<void>;
  clock: Clock;
  log: Logger;
}

const checkPort = (field: string, p: number, hint?: string) => {
  if (!Number.isInteger(p) || p < 1 || p > 65535)
    throw invalidArgument(field, `${p} is not a port`, hint ?? "use 1-65535");
};

/** originOf is how `policy show` names an exposure's implicit rule. Pure. */
export function originOf(r: ExposureRow): string {
  return r.kind === "tcp"
    ? `expose ${r.workload} tcp ${r.publicPort}->${r.port} at ${r.edge} (visitors' addresses kept)`
    : `expose ${r.workload} ${r.kind} ${r.host} at ${r.edge}`;
}

/** implicitRulesOf returns the allow rule of each exposure: edge -> workload:port/tcp. Pure. */
export function implicitRulesOf(rows: readonly ExposureRow[]): ImplicitRule[] {
  return rows.map((r) => ({
    origin: originOf(r),
    rule: {
      from: { edge: r.edge },
      to: { workload: r.workload },
      ports: [{ proto: "tcp" as const, from: r.port, to: r.port }],
    },
    ...(r.kind === "tcp" ? { visitors: true } : {}),
  }));
}

export class Exposures {
  private chain: Promise<unknown> = Promise.resolve();

  constructor(private readonly o: ExposuresOptions) {}

  /** list returns the stored exposures. */
  list(): ExposureRow[] {
    return this.o.repo.list();
  }

  /** implicit returns the implicit allow rules of every exposure (for the policy manager). */
  implicit(): ImplicitRule[] {
    return implicitRulesOf(this.o.repo.list());
  }

  /** visitorGateway is the edge that TCP exposures go through (at most one), or undefined. */
  visitorGateway(): string | undefined {
    return this.o.repo.list().find((r) => r.kind === "tcp")?.edge;
  }

  /** expose publishes a workload at an edge (see the module comment). */
  expose(req: ExposeRequest): Promise<{ row: ExposureRow; action: string; publicAddress: string }> {
    return this.serial(async () => {
      const row = this.check(req);
      const old = this.o.repo.get(row.edge, row.host, row.publicPort);
      if (old && old.workload !== row.workload) {
        throw new CapsuleError(
          ErrorCode.AlreadyExists,
          `${row.kind === "tcp" ? `public port ${row.publicPort}` : row.host} at ${row.edge} is already exposed for workload ${old.workload}`,
          {
            hint: `unexpose ${old.workload} first, or pick another ${row.kind === "tcp" ? "--tcp port" : "--host"}`,
          },
        );
      }
      if (row.kind === "tcp") {
        const gw = this.visitorGateway();
        if (gw !== undefined && gw !== row.edge)
          throw new CapsuleError(
            ErrorCode.FailedPrecondition,
            `this capsule's TCP exposures already go through edge ${gw}`,
            {
              hint: `visitors' replies are routed back through one edge per capsule: use --edge ${gw}, or unexpose the TCP ports at ${gw} first`,
            },
          );
      }
      const same = old && old.kind === row.kind && old.port === row.port && old.upstream === row.upstream;
      const stored = old ? { ...row, createdAt: old.createdAt } : row;
      this.o.repo.store.tx(() => this.o.repo.put(stored));
      try {
        await this.o.enforce();
        if (row.kind === "tcp") await this.o.visitorsChanged();
        const r = await this.o.edges.addRoute(row.edge, wireOf(stored));
        this.o.log.info(
          { workload: row.workload, edge: row.edge, kind: row.kind, route: keyOf(row) },
          "exposed",
        );
        return {
          row: stored,
          action: same ? "unchanged" : old ? "configured" : "created",
          publicAddress: r.publicAddress,
        };
      } catch (e) {
        this.o.repo.store.tx(() => {
          if (old) this.o.repo.put(old);
          else this.o.repo.delete(row.edge, row.host, row.publicPort);
        });
        await this.o.enforce().catch(() => undefined);
        if (row.kind === "tcp") await this.o.visitorsChanged().catch(() => undefined);
        throw e;
      }
    });
  }

  /**
   * unexpose removes the exposure of `workload` at `edge` for `host` (or `publicPort`): the edge
   * stops routing, then the allow rule goes. Returns false when there was none (idempotent).
   */
  unexpose(workload: string, edge: string, host: string, publicPort: number): Promise<boolean> {
    return this.serial(async () => {
      if (!edge) throw invalidArgument("edge", "missing", "give --edge EDGE");
      if ((host === "") === (publicPort === 0))
        throw invalidArgument("host", "give exactly one of --host or --tcp", "e.g. --host app.example.com");
      const key = host !== "" ? normalizeHost(host, "host") : "";
      const row = this.o.repo.get(edge, key, key !== "" ? 0 : publicPort);
      if (!row) return false;
      if (row.workload !== workload)
        throw new CapsuleError(
          ErrorCode.NotFound,
          `${keyOf(row)} at ${edge} is exposed for workload ${row.workload}, not ${workload}`,
          { hint: `capsulectl unexpose ${row.workload} --edge ${edge} ...` },
        );
      await this.o.edges.removeRoute(edge, wireOf(row));
      this.o.repo.store.tx(() => this.o.repo.delete(row.edge, row.host, row.publicPort));
      await this.o.enforce();
      if (row.kind === "tcp") await this.o.visitorsChanged();
      this.o.log.info({ workload, edge, route: keyOf(row) }, "unexposed");
      return true;
    });
  }

  /**
   * resync re-sends exposures to their edges: every one when `all` (on start: an edge that lost
   * its state gets it back; unchanged routes cost the edge nothing), otherwise only those whose
   * workload's address changed (deleted and applied again). An exposure whose workload is gone
   * stays (the edge reports it unhealthy) until it is unexposed or the workload is back. Best
   * effort: failures are logged and retried at the next resync.
   */
  resync(all = false): Promise<void> {
    return this.serial(async () => {
      for (const row of this.o.repo.list()) {
        const address = this.o.address(row.workload);
        if (address === undefined) continue;
        const upstream = `${address}:${row.port}`;
        if (!all && upstream === row.upstream) continue;
        const next = { ...row, upstream };
        try {
          await this.o.edges.addRoute(row.edge, wireOf(next));
          if (upstream !== row.upstream) {
            this.o.repo.store.tx(() => this.o.repo.put(next));
            this.o.log.info(
              { workload: row.workload, edge: row.edge, upstream },
              "exposure follows the new address",
            );
          }
        } catch (e) {
          this.o.log.warn(
            { workload: row.workload, edge: row.edge, route: keyOf(row), err: (e as Error).message },
            "exposure not re-sent to its edge; retried later",
          );
        }
      }
    });
  }

  /** views lists the exposures with the status their edges report ("unknown" when an edge cannot be asked). */
  async views(): Promise<ExposureView[]> {
    const rows = this.o.repo.list();
    const edges = [...new Set(rows.map((r) => r.edge))];
    const byEdge = new Map<string, EdgeRouteStatus[] | string>();
    await Promise.all(
      edges.map(async (e) => {
        try {
          byEdge.set(e, await this.o.edges.status(e));
        } catch (err) {
          byEdge.set(e, `edge unreachable: ${(err as Error).message}`);
        }
      }),
    );
    return rows.map((r) => {
      const st = byEdge.get(r.edge);
      const s = Array.isArray(st)
        ? st.find((x) => x.host === r.host && x.publicPort === r.publicPort)
        : undefined;
      return {
        ...r,
        cert: s?.cert ?? "unknown",
        certDetail: s?.certDetail ?? (typeof st === "string" ? st : "not routed at the edge"),
        health: s?.health ?? "unknown",
        publicAddress: s?.publicAddress ?? "",
      };
    });
  }

  private check(req: ExposeRequest): ExposureRow {
    if (!WORKLOAD_NAME.test(req.workload ?? ""))
      throw invalidArgument("workload", `"${req.workload}" is not a workload name`);
    if (!req.edge) throw invalidArgument("edge", "missing", "give --edge EDGE (the edge capsule's name)");
    this.o.edges.check(req.edge);
    const address = this.o.address(req.workload);
    if (address === undefined)
      throw new CapsuleError(ErrorCode.NotFound, `workload ${req.workload} does not exist on this capsule`, {
        hint: "expose runs on the capsule that runs the workload (--capsule)",
      });
    checkPort("port", req.port, "give --port, the workload's port");
    let kind: RouteKind;
    let host = "";
    let publicPort = 0;
    if (req.publicPort) {
      if (req.host) throw invalidArgument("host", "--host and --tcp are exclusive", "give one of them");
      if (req.passthrough) throw invalidArgument("passthrough", "--passthrough needs --host, not --tcp");
      checkPort("tcp", req.publicPort, "give --tcp PUBLICPORT:PORT");
      kind = "tcp";
      publicPort = req.publicPort;
    } else {
      if (!req.host) throw invalidArgument("host", "missing", "give --host NAME (or --tcp PUBLICPORT:PORT)");
      host = normalizeHost(req.host, "host");
      kind = req.passthrough ? "passthrough" : "https";
    }
    return {
      workload: req.workload,
      edge: req.edge,
      kind,
      host,
      publicPort,
      port: req.port,
      upstream: `${address}:${req.port}`,
      createdAt: new Date(this.o.clock.now()).toISOString(),
    };
  }

  private serial<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.chain.then(fn, fn);
    this.chain = run.catch(() => undefined);
    return run;
  }
}

function keyOf(r: { host: string; publicPort: number }): string {
  return r.host !== "" ? r.host : `port ${r.publicPort}`;
}

function wireOf(r: ExposureRow): EdgeRouteWire {
  return { kind: r.kind, host: r.host, publicPort: r.publicPort, upstream: r.upstream, workload: r.workload };
}
