import type { Store } from "../store/store.js";

/** PolicyRow is one stored `kind: Policy` document. */
export interface PolicyRow {
  name: string;
  /** doc is the validated manifest as JSON (what Apply received, re-serialized). */
  doc: string;
  /** updatedAt is RFC 3339. */
  updatedAt: string;
}

/**
 * PolicyRepo keeps the policies in the capsule's SQLite store (table `policies`, migration 4).
 * Writes are meant to run inside the caller's transaction (see {@link Store.tx}) so that a
 * policy change and its rollback are one unit.
 */
export class PolicyRepo {
  constructor(readonly store: Store) {}

  /** list returns every stored policy, by name. Read-only. */
  list(): PolicyRow[] {
    return this.store.db
      .prepare("SELECT name, doc, updated_at AS updatedAt FROM policies ORDER BY name")
      .all() as PolicyRow[];
  }

  /** get returns one policy by name, or undefined. Read-only. */
  get(name: string): PolicyRow | undefined {
    return this.store.db
      .prepare("SELECT name, doc, updated_at AS updatedAt FROM policies WHERE name = ?")
      .get(name) as PolicyRow | undefined;
  }

  /** put inserts or replaces a policy by name (idempotent for the same row). */
  put(row: PolicyRow): void {
    this.store.db
      .prepare(
        "INSERT INTO policies(name, doc, updated_at) VALUES (@name, @doc, @updatedAt) ON CONFLICT(name) DO UPDATE SET doc = excluded.doc, updated_at = excluded.updated_at",
      )
      .run(row);
  }

  /** delete removes a policy; returns whether it existed (idempotent). */
  delete(name: string): boolean {
    return this.store.db.prepare("DELETE FROM policies WHERE name = ?").run(name).changes > 0;
  }
}
