/**
 * MIGRATIONS are the schema versions, applied in order inside one transaction each and
 * recorded in `PRAGMA user_version`. Append only: never edit a released migration.
 */
export const MIGRATIONS: readonly { version: number; sql: string }[] = [
  {
    version: 1,
    sql: `
      CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
      ) STRICT;
      CREATE TABLE operators (
        id             TEXT PRIMARY KEY,
        name           TEXT NOT NULL,
        public_key_jwk TEXT NOT NULL,
        added_at       TEXT NOT NULL,
        added_by       TEXT NOT NULL
      ) STRICT;
      CREATE TABLE used_tokens (
        jti        TEXT PRIMARY KEY,
        expires_at INTEGER NOT NULL
      ) STRICT;
      CREATE INDEX used_tokens_expiry ON used_tokens(expires_at);
    `,
  },
];
