import type { EdgeRoutes } from "../../edge/manager.js";
import type { RouteKind } from "../../edge/repo.js";
import { CapsuleError, ErrorCode } from "../../errors.js";
import type { PeerCaller } from "../../fabric/fabric.js";
import type { FabricRepo, PeerRow } from "../../fabric/repo.js";
import type { EdgeLink, EdgeRouteStatus, EdgeRouteWire } from "./manager.js";

/** EdgeRouteMsg is capsule.v1.EdgeRoute / EdgeRouteView on the wire (the fields this side uses). */
interface RouteMsg {
  kind: string;
  host: string;
  tcpPublicPort: number;
  upstream: string;
  workload: string;
  capsule?: string;
  edge?: string;
  cert?: string;
  certDetail?: string;
  health?: string;
  publicAddress?: string;
}

/** toWire is a route as capsule.v1.EdgeRoute. */
export function toRouteMsg(r: EdgeRouteWire): RouteMsg {
  return {
    kind: r.kind,
    host: r.host,
    tcpPublicPort: r.publicPort,
    upstream: r.upstream,
    workload: r.workload,
  };
}

function fromStatusMsg(m: RouteMsg, edge: string): EdgeRouteStatus {
  return {
    kind: m.kind as RouteKind,
    host: m.host,
    publicPort: m.tcpPublicPort,
    upstream: m.upstream,
    workload: m.workload,
    capsule: m.capsule ?? "",
    edge: m.edge || edge,
    cert: m.cert ?? "unknown",
    certDetail: m.certDetail ?? "",
    health: m.health ?? "unknown",
    publicAddress: m.publicAddress ?? "",
  };
}

/** FabricEdgeLinkOptions: `local` is this capsule's own edge routes when it is an edge. */
export interface FabricEdgeLinkOptions {
  selfName: string;
  selfId: string;
  local: () => EdgeRoutes | undefined;
  repo: FabricRepo;
  caller: PeerCaller;
}

/**
 * FabricEdgeLink reaches an edge: this capsule's own {@link EdgeRoutes} when the edge is itself,
 * otherwise the enrolled edge peer's Edge service over the fabric (signed with this capsule's
 * peer key; the edge lets a capsule touch only its own routes).
 */
export class FabricEdgeLink implements EdgeLink {
  constructor(private readonly o: FabricEdgeLinkOptions) {}

  check(edge: string): void {
    if (edge === this.o.selfName) {
      if (!this.o.local())
        throw new CapsuleError(ErrorCode.FailedPrecondition, `${edge} (this capsule) is not an edge`, {
          hint: "start capsuled with --edge, or pick an edge capsule",
        });
      return;
    }
    this.peer(edge);
  }

  private peer(edge: string): PeerRow {
    const p = this.o.repo.getPeer(edge);
    if (!p)
      throw new CapsuleError(ErrorCode.NotFound, `no enrolled capsule is called ${edge}`, {
        hint: `enroll it first: capsulectl fabric enroll ${this.o.selfName} ${edge}`,
      });
    if (!p.edge)
      throw new CapsuleError(ErrorCode.FailedPrecondition, `${edge} is not an edge`, {
        hint: `start capsuled on ${edge} with --edge (it announces itself to its peers)`,
      });
    return p;
  }

  async addRoute(edge: string, route: EdgeRouteWire): Promise<{ publicAddress: string }> {
    const local = edge === this.o.selfName ? this.o.local() : undefined;
    if (local) {
      await local.add({ ...route, capsule: this.o.selfName, capsuleId: this.o.selfId });
      return { publicAddress: local.publicAddress };
    }
    const res = await this.o.caller.call<RouteMsg>(
      this.peer(edge),
      "Edge/AddRoute",
      toRouteMsg(route),
      15_000,
    );
    return { publicAddress: res.publicAddress ?? "" };
  }

  async removeRoute(edge: string, route: EdgeRouteWire): Promise<boolean> {
    const local = edge === this.o.selfName ? this.o.local() : undefined;
    if (local) return local.remove(this.o.selfId, route.host, route.publicPort);
    const res = await this.o.caller.call<{ removed: boolean }>(
      this.peer(edge),
      "Edge/RemoveRoute",
      toRouteMsg(route),
      15_000,
    );
    return res.removed;
  }

  async status(edge: string): Promise<EdgeRouteStatus[]> {
    const local = edge === this.o.selfName ? this.o.local() : undefined;
    if (local) {
      return (await local.views(this.o.selfId)).map((v) =>
        fromStatusMsg({ ...v, tcpPublicPort: v.publicPort, publicAddress: local.publicAddress }, edge),
      );
    }
    const res = await this.o.caller.call<{ routes: RouteMsg[] }>(
      this.peer(edge),
      "Edge/RouteStatus",
      {},
      10_000,
    );
    return res.routes.map((m) => fromStatusMsg(m, edge));
  }
}
