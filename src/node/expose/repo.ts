import type { RouteKind } from "../../edge/repo.js";
import type { Store } from "../store/store.js";

/** ExposureRow is one of this capsule's workloads published at an edge (table `exposures`, migration 5). */
export interface ExposureRow {
  workload: string;
  /** edge is the edge capsule's name. */
  edge: string;
  kind: RouteKind;
  /** host is the DNS name (https, passthrough); "" for tcp. */
  host: string;
  /** publicPort is the edge's public TCP port (tcp); 0 otherwise. */
  publicPort: number;
  /** port is the workload port. */
  port: number;
  /** upstream is the workload's fabric `ip:port` when exposed. */
  upstream: string;
  createdAt: string;
}

const COLUMNS =
  "workload, edge, kind, host, public_port AS publicPort, port, upstream, created_at AS createdAt";

/** ExposureRepo keeps this capsule's exposures, keyed by (edge, host, public port). */
export class ExposureRepo {
  constructor(readonly store: Store) {}

  /** list returns every exposure by edge, then host/port. Read-only. */
  list(): ExposureRow[] {
    return this.store.db
      .prepare(`SELECT ${COLUMNS} FROM exposures ORDER BY edge, public_port, host`)
      .all() as ExposureRow[];
  }

  /** get returns the exposure with that key, or undefined. */
  get(edge: string, host: string, publicPort: number): ExposureRow | undefined {
    return this.store.db
      .prepare(`SELECT ${COLUMNS} FROM exposures WHERE edge = ? AND host = ? AND public_port = ?`)
      .get(edge, host, publicPort) as ExposureRow | undefined;
  }

  /** put inserts or replaces the exposure with the same key. */
  put(r: ExposureRow): void {
    this.store.db
      .prepare(
        `INSERT INTO exposures(workload, edge, kind, host, public_port, port, upstream, created_at)
         VALUES (@workload, @edge, @kind, @host, @publicPort, @port, @upstream, @createdAt)
         ON CONFLICT(edge, host, public_port) DO UPDATE SET workload = excluded.workload,
           kind = excluded.kind, port = excluded.port, upstream = excluded.upstream`,
      )
      .run(r);
  }

  /** delete removes the exposure with that key; returns whether it existed. */
  delete(edge: string, host: string, publicPort: number): boolean {
    return (
      this.store.db
        .prepare("DELETE FROM exposures WHERE edge = ? AND host = ? AND public_port = ?")
        .run(edge, host, publicPort).changes > 0
    );
  }
}
