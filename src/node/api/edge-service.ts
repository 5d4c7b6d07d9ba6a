import type { EdgeHandlers } from "../../gen/capsule/v1/Edge.js";
import type { EdgeRoutes, RouteView } from "../../edge/manager.js";
import type { RouteKind } from "../../edge/repo.js";
import { CapsuleError, ErrorCode, invalidArgument } from "../../errors.js";
import { poolOf } from "../../fabric/ipam.js";
import type { FabricRepo } from "../../fabric/repo.js";
import type { Exposures, ExposureView } from "../expose/manager.js";
import { callerPeer } from "./fabric-service.js";
import type { RpcDeps } from "./rpc.js";
import { unary } from "./rpc.js";

/** EdgeServiceDeps: `routes` is set on an edge; `exposures` once the fabric is up. */
export interface EdgeServiceDeps extends RpcDeps {
  selfName: string;
  repo: FabricRepo;
  routes: () => EdgeRoutes | undefined;
  exposures: () => Exposures | undefined;
}

const SVC = "/capsule.v1.Edge";

interface RouteMsg {
  kind: string;
  host: string;
  tcpPublicPort: number;
  upstream: string;
  workload: string;
}

function needExposures(d: EdgeServiceDeps): Exposures {
  const e = d.exposures();
  if (!e)
    throw new CapsuleError(ErrorCode.FailedPrecondition, "the fabric is not running on this capsule", {
      hint: "exposing needs the fabric (see capsuled's log)",
    });
  return e;
}

function needRoutes(d: EdgeServiceDeps): EdgeRoutes {
  const r = d.routes();
  if (!r)
    throw new CapsuleError(
      ErrorCode.FailedPrecondition,
      `${d.selfName} is not an edge (or its edge is not up yet)`,
      {
        hint: "start capsuled with --edge; see its log",
      },
    );
  return r;
}

const kindOf = (k: string): RouteKind => {
  if (k !== "https" && k !== "passthrough" && k !== "tcp")
    throw invalidArgument("kind", `"${k}" is not https, passthrough or tcp`);
  return k;
};

function routeView(v: RouteView, edge: string, publicAddress: string) {
  return {
    kind: v.kind,
    host: v.host,
    tcpPublicPort: v.publicPort,
    workload: v.workload,
    capsule: v.capsule,
    edge,
    upstream: v.upstream,
    cert: v.cert,
    certDetail: v.certDetail,
    health: v.health,
    publicAddress,
  };
}

function exposureView(v: ExposureView, capsule: string) {
  return {
    kind: v.kind,
    host: v.host,
    tcpPublicPort: v.publicPort,
    workload: v.workload,
    capsule,
    edge: v.edge,
    upstream: v.upstream,
    cert: v.cert,
    certDetail: v.certDetail,
    health: v.health,
    publicAddress: v.publicAddress,
  };
}

/** urlOf is where visitors reach an exposure. Pure. */
export function urlOf(kind: string, host: string, publicPort: number, publicAddress: string): string {
  if (kind === "tcp") return `${publicAddress || "EDGE"}:${publicPort}`;
  return `https://${host}/`;
}

/** edgeService builds the handlers of capsule.v1.Edge (thin: the logic is in src/node/expose and src/edge). */
export function edgeService(d: EdgeServiceDeps): EdgeHandlers {
  return {
    Expose: unary(
      d,
      `${SVC}/Expose`,
      async (req: {
        workload: string;
        edge: string;
        host: string;
        port: number;
        passthrough: boolean;
        tcpPublicPort: number;
      }) => {
        const r = await needExposures(d).expose({
          workload: req.workload ?? "",
          edge: req.edge ?? "",
          host: req.host ?? "",
          port: req.port ?? 0,
          passthrough: req.passthrough === true,
          publicPort: req.tcpPublicPort ?? 0,
        });
        return {
          workload: r.row.workload,
          edge: r.row.edge,
          kind: r.row.kind,
          host: r.row.host,
          tcpPublicPort: r.row.publicPort,
          port: r.row.port,
          upstream: r.row.upstream,
          action: r.action,
          url: urlOf(r.row.kind, r.row.host, r.row.publicPort, r.publicAddress),
        };
      },
    ),
    Unexpose: unary(
      d,
      `${SVC}/Unexpose`,
      async (req: { workload: string; edge: string; host: string; tcpPublicPort: number }) => ({
        removed: await needExposures(d).unexpose(
          req.workload ?? "",
          req.edge ?? "",
          req.host ?? "",
          req.tcpPublicPort ?? 0,
        ),
      }),
    ),
    List: unary(d, `${SVC}/List`, async () => {
      const routes = d.routes();
      const out = routes
        ? (await routes.views()).map((v) => routeView(v, d.selfName, routes.publicAddress))
        : [];
      const exp = d.exposures();
      if (exp) {
        const elsewhere = exp.list().some((r) => r.edge !== d.selfName);
        if (elsewhere)
          for (const v of await exp.views()) if (v.edge !== d.selfName) out.push(exposureView(v, d.selfName));
      }
      return { routes: out, edge: routes !== undefined };
    }),
    AddRoute: unary(
      d,
      `${SVC}/AddRoute`,
      async (req: RouteMsg, ctx) => {
        const peer = callerPeer(d, ctx);
        const routes = needRoutes(d);
        const ip = (req.upstream ?? "").split(":")[0] ?? "";
        let pool = -1;
        try {
          pool = poolOf(ip);
        } catch {
          pool = -1;
        }
        if (pool !== peer.pool)
          throw new CapsuleError(
            ErrorCode.PermissionDenied,
            `upstream ${req.upstream} is not an address of ${peer.name}`,
            { hint: "a capsule may only expose its own workloads" },
          );
        const { row } = await routes.add({
          kind: kindOf(req.kind ?? ""),
          host: req.host ?? "",
          publicPort: req.tcpPublicPort ?? 0,
          upstream: req.upstream ?? "",
          workload: req.workload ?? "",
          capsule: peer.name,
          capsuleId: peer.capsuleId,
        });
        return {
          kind: row.kind,
          host: row.host,
          tcpPublicPort: row.publicPort,
          upstream: row.upstream,
          workload: row.workload,
          publicAddress: routes.publicAddress,
        };
      },
      { peer: true },
    ),
    RemoveRoute: unary(
      d,
      `${SVC}/RemoveRoute`,
      async (req: { host: string; tcpPublicPort: number }, ctx) => {
        const peer = callerPeer(d, ctx);
        return {
          removed: await needRoutes(d).remove(peer.capsuleId, req.host ?? "", req.tcpPublicPort ?? 0),
        };
      },
      { peer: true },
    ),
    RouteStatus: unary(
      d,
      `${SVC}/RouteStatus`,
      async (_req: unknown, ctx) => {
        const peer = callerPeer(d, ctx);
        const routes = needRoutes(d);
        return {
          routes: (await routes.views(peer.capsuleId)).map((v) =>
            routeView(v, d.selfName, routes.publicAddress),
          ),
          edge: true,
        };
      },
      { peer: true },
    ),
  };
}
