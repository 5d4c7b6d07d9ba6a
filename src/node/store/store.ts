import { chmodSync, existsSync, mkdirSync } from "node:fs";
import { dirname } from "node:path";
import Database from "better-sqlite3";
import { CapsuleError, ErrorCode } from "../../errors.js";
import { MIGRATIONS } from "./migrations.js";

/** OperatorRow is one enrolled operator public key. */
export interface OperatorRow {
  id: string;
  name: string;
  publicKeyJwk: string;
  addedAt: string;
  addedBy: string;
}

/**
 * Store is capsuled's state in SQLite: WAL with synchronous=FULL (an acknowledged change
 * survives power loss), versioned migrations, every write in a transaction, and an
 * integrity check on open. Pass ":memory:" for tests: the same code on a throwaway database.
 */
export class Store {
  readonly db: Database.Database;

  private constructor(db: Database.Database) {
    this.db = db;
  }

  /** open opens (creating if needed) the database at `path`, checks it and migrates it. */
  static open(path: string): Store {
    if (path !== ":memory:") {
      const dir = dirname(path);
      if (!existsSync(dir)) mkdirSync(dir, { recursive: true, mode: 0o700 });
    }
    let db: Database.Database;
    try {
      db = new Database(path);
    } catch (e) {
      throw new CapsuleError(
        ErrorCode.StateCorrupt,
        `cannot open state database ${path}: ${(e as Error).message}`,
        {
          hint: "check the state dir's permissions and free space",
          cause: e,
        },
      );
    }
    if (path !== ":memory:") chmodSync(path, 0o600);
    let check: unknown;
    try {
      db.pragma("journal_mode = WAL");
      db.pragma("synchronous = FULL");
      db.pragma("foreign_keys = ON");
      db.pragma("busy_timeout = 5000");
      check = db.pragma("integrity_check", { simple: true });
    } catch (e) {
      check = (e as Error).message;
    }
    if (check !== "ok") {
      db.close();
      throw new CapsuleError(
        ErrorCode.StateCorrupt,
        `state database ${path} failed integrity_check: ${String(check)}`,
        {
          hint: "restore state.db from a backup; capsuled will not run on a corrupt database",
        },
      );
    }
    const store = new Store(db);
    store.migrate();
    return store;
  }

  /** schemaVersion is the applied migration version. */
  get schemaVersion(): number {
    return this.db.pragma("user_version", { simple: true }) as number;
  }

  private migrate(): void {
    const current = this.schemaVersion;
    const latest = MIGRATIONS[MIGRATIONS.length - 1]?.version ?? 0;
    if (current > latest) {
      throw new CapsuleError(
        ErrorCode.StateCorrupt,
        `state database schema ${current} is newer than this capsuled (${latest})`,
        { hint: "run the newer capsuled that wrote it" },
      );
    }
    for (const m of MIGRATIONS) {
      if (m.version <= current) continue;
      this.db.transaction(() => {
        this.db.exec(m.sql);
        this.db.pragma(`user_version = ${m.version}`);
      })();
    }
  }

  /** tx runs fn in one transaction (IMMEDIATE, so concurrent writers serialize up front). */
  tx<T>(fn: () => T): T {
    return this.db.transaction(fn).immediate();
  }

  /** getMeta returns a meta value, or undefined when unset. */
  getMeta(key: string): string | undefined {
    const row = this.db.prepare("SELECT value FROM meta WHERE key = ?").get(key) as
      { value: string } | undefined;
    return row?.value;
  }

  /** setMeta sets a meta value (idempotent). */
  setMeta(key: string, value: string): void {
    this.db
      .prepare(
        "INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
      )
      .run(key, value);
  }

  /** listOperators returns every operator, oldest first. */
  listOperators(): OperatorRow[] {
    return this.db
      .prepare(
        "SELECT id, name, public_key_jwk AS publicKeyJwk, added_at AS addedAt, added_by AS addedBy FROM operators ORDER BY added_at, id",
      )
      .all() as OperatorRow[];
  }

  /** getOperator returns one operator by key id. */
  getOperator(id: string): OperatorRow | undefined {
    return this.db
      .prepare(
        "SELECT id, name, public_key_jwk AS publicKeyJwk, added_at AS addedAt, added_by AS addedBy FROM operators WHERE id = ?",
      )
      .get(id) as OperatorRow | undefined;
  }

  /** operatorCount counts enrolled operators. */
  operatorCount(): number {
    return (this.db.prepare("SELECT count(*) AS n FROM operators").get() as { n: number }).n;
  }

  /** putOperator inserts an operator; an existing id is left as it is (idempotent). Returns the stored row. */
  putOperator(op: OperatorRow): OperatorRow {
    this.db
      .prepare(
        "INSERT INTO operators(id, name, public_key_jwk, added_at, added_by) VALUES (@id, @name, @publicKeyJwk, @addedAt, @addedBy) ON CONFLICT(id) DO NOTHING",
      )
      .run(op);
    return this.getOperator(op.id)!;
  }

  /** deleteOperator removes an operator; returns whether one was removed. */
  deleteOperator(id: string): boolean {
    return this.db.prepare("DELETE FROM operators WHERE id = ?").run(id).changes > 0;
  }

  /**
   * useToken records a token id until `expiresAtMs`; returns false if it was already used.
   * Persisted, so a replay is refused across a capsuled restart too.
   */
  useToken(jti: string, expiresAtMs: number): boolean {
    return (
      this.db
        .prepare("INSERT INTO used_tokens(jti, expires_at) VALUES (?, ?) ON CONFLICT(jti) DO NOTHING")
        .run(jti, expiresAtMs).changes === 1
    );
  }

  /** pruneTokens forgets token ids that expired before `nowMs` (they can no longer verify anyway). */
  pruneTokens(nowMs: number): number {
    return this.db.prepare("DELETE FROM used_tokens WHERE expires_at < ?").run(nowMs).changes;
  }

  /** close closes the database (a WAL checkpoint happens on close). */
  close(): void {
    if (this.db.open) this.db.close();
  }
}
