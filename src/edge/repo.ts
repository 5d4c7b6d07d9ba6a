import type { Store } from "../node/store/store.js";

/** RouteKind is how the edge serves a route: HTTPS terminated by Caddy, TLS passed through by SNI, or raw TCP. */
export type RouteKind = "https" | "passthrough" | "tcp";

/** RouteRow is one route an edge serves (table `edge_routes`, migration 5). */
export interface RouteRow {
  kind: RouteKind;
  /** host is the DNS name (https, passthrough); "" for tcp. */
  host: string;
  /** publicPort is the edge's public TCP port (tcp); 0 otherwise. */
  publicPort: number;
  /** upstream is the workload's fabric `ip:port`. */
  upstream: string;
  workload: string;
  /** capsule and capsuleId name the capsule that runs the workload (and asked for the route). */
  capsule: string;
  capsuleId: string;
  /** createdAt is RFC 3339. */
  createdAt: string;
}

const COLUMNS =
  "kind, host, public_port AS publicPort, upstream, workload, capsule, capsule_id AS capsuleId, created_at AS createdAt";

/**
 * RouteRepo keeps an edge's routes in SQLite. A route is keyed by its host (https and
 * passthrough share the host space) or its public port (tcp): the primary key is
 * (host, public_port), one of them always empty/zero.
 */
export class RouteRepo {
  constructor(readonly store: Store) {}

  /** list returns every route, hosts first (by name), then ports. Read-only. */
  list(): RouteRow[] {
    return this.store.db
      .prepare(`SELECT ${COLUMNS} FROM edge_routes ORDER BY public_port, host`)
      .all() as RouteRow[];
  }

  /** get returns the route for `host` (or `publicPort` when host is ""), or undefined. */
  get(host: string, publicPort: number): RouteRow | undefined {
    return this.store.db
      .prepare(`SELECT ${COLUMNS} FROM edge_routes WHERE host = ? AND public_port = ?`)
      .get(host, publicPort) as RouteRow | undefined;
  }

  /** put inserts or replaces the route with the same key. */
  put(r: RouteRow): void {
    this.store.db
      .prepare(
        `INSERT INTO edge_routes(kind, host, public_port, upstream, workload, capsule, capsule_id, created_at)
         VALUES (@kind, @host, @publicPort, @upstream, @workload, @capsule, @capsuleId, @createdAt)
         ON CONFLICT(host, public_port) DO UPDATE SET kind = excluded.kind, upstream = excluded.upstream,
           workload = excluded.workload, capsule = excluded.capsule, capsule_id = excluded.capsule_id`,
      )
      .run(r);
  }

  /** delete removes the route with that key; returns whether it existed. */
  delete(host: string, publicPort: number): boolean {
    return (
      this.store.db
        .prepare("DELETE FROM edge_routes WHERE host = ? AND public_port = ?")
        .run(host, publicPort).changes > 0
    );
  }
}
