/**
 * `capsulectl edge list`: on an edge, every route it serves; on any other capsule, its own
 * exposures (with the certificate state and health its edges report). Fans out like every list.
 */
import type { EdgeRouteView__Output } from "../../gen/capsule/v1/EdgeRouteView.js";
import type { ListEdgeResponse__Output } from "../../gen/capsule/v1/ListEdgeResponse.js";
import type { View } from "../output.js";
import type { Session } from "../session.js";

/** routeText is the HOST/PORT column: the host name, or ":PORT" for raw TCP. Pure. */
export function routeText(v: EdgeRouteView__Output): string {
  return v.kind === "tcp" ? `:${v.tcpPublicPort}` : v.host;
}

/** EDGE_LIST_VIEW is `edge list`; wide adds the edge, its public address and the certificate detail. */
export const EDGE_LIST_VIEW: View<ListEdgeResponse__Output, EdgeRouteView__Output> = {
  rows: (r) => r.routes,
  columns: [
    { header: "HOST/PORT", get: routeText },
    { header: "KIND", get: (v) => v.kind },
    { header: "WORKLOAD", get: (v) => v.workload },
    { header: "RUNS-ON", get: (v) => v.capsule },
    { header: "UPSTREAM", get: (v) => v.upstream },
    { header: "CERT", get: (v) => v.cert },
    { header: "HEALTH", get: (v) => v.health },
    { header: "EDGE", get: (v) => v.edge, wide: true },
    { header: "PUBLIC", get: (v) => v.publicAddress, wide: true },
    { header: "DETAIL", get: (v) => v.certDetail, wide: true },
  ],
};

/** edgeList lists routes or exposures on every selected capsule. Read-only. */
export async function edgeList(s: Session): Promise<void> {
  await s.rpcAndShow<ListEdgeResponse__Output, EdgeRouteView__Output>(
    "Edge/List",
    () => ({}),
    EDGE_LIST_VIEW,
  );
}
