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
  {
    version: 2,
    sql: `
      CREATE TABLE fabric_peers (
        capsule_id      TEXT PRIMARY KEY,
        name            TEXT NOT NULL UNIQUE,
        wg_public_key   TEXT NOT NULL UNIQUE,
        endpoint        TEXT,
        capsule_address TEXT NOT NULL UNIQUE,
        pool            INTEGER NOT NULL,
        api_port        INTEGER NOT NULL,
        api_cert_pem    TEXT NOT NULL,
        api_fingerprint TEXT NOT NULL,
        peer_key_jwk    TEXT NOT NULL,
        peer_key_id     TEXT NOT NULL UNIQUE,
        relay_via       TEXT,
        peers_json      TEXT NOT NULL DEFAULT '[]',
        inventory_json  TEXT NOT NULL DEFAULT '[]',
        inventory_gen   TEXT NOT NULL DEFAULT '0',
        enrolled_at     TEXT NOT NULL,
        updated_at      TEXT NOT NULL
      ) STRICT;
      CREATE TABLE fabric_addresses (
        name        TEXT PRIMARY KEY,
        address     TEXT NOT NULL UNIQUE,
        labels_json TEXT NOT NULL DEFAULT '{}',
        created_at  TEXT NOT NULL
      ) STRICT;
    `,
  },
  {
    version: 3,
    sql: `
      CREATE TABLE workloads (
        name        TEXT PRIMARY KEY,
        spec_json   TEXT NOT NULL,
        spec_hash   TEXT NOT NULL,
        generation  INTEGER NOT NULL,
        desired     TEXT NOT NULL CHECK (desired IN ('running', 'stopped')),
        address     TEXT NOT NULL UNIQUE,
        restarts    INTEGER NOT NULL DEFAULT 0,
        last_exit   INTEGER,
        events_json TEXT NOT NULL DEFAULT '[]',
        created_at  TEXT NOT NULL,
        updated_at  TEXT NOT NULL
      ) STRICT;
      CREATE TABLE host_ports (
        protocol  TEXT NOT NULL,
        host_port INTEGER NOT NULL,
        workload  TEXT NOT NULL REFERENCES workloads(name) ON DELETE CASCADE,
        port      INTEGER NOT NULL,
        PRIMARY KEY (protocol, host_port)
      ) STRICT;
      CREATE TABLE volumes (
        name       TEXT PRIMARY KEY,
        size_bytes INTEGER NOT NULL,
        backend    TEXT NOT NULL,
        path       TEXT NOT NULL,
        used_by    TEXT,
        created_at TEXT NOT NULL
      ) STRICT;
    `,
  },
  {
    // Policies (one row per \`kind: Policy\` document, as validated JSON), and whether each peer
    // is an edge (learned from its inventory) so \`{edge: NAME}\` selectors resolve at boot.
    version: 4,
    sql: `
      CREATE TABLE policies (
        name       TEXT PRIMARY KEY,
        doc        TEXT NOT NULL,
        updated_at TEXT NOT NULL
      ) STRICT;
      ALTER TABLE fabric_peers ADD COLUMN edge INTEGER NOT NULL DEFAULT 0;
    `,
  },
  {
    // Edge: what this capsule exposes at edges (its workloads; the implicit allow rules come
    // from here), and, on an edge, the routes it serves (host or public TCP port -> a peer's
    // workload on the fabric). Caddy, HAProxy and the edge nft table are rebuilt from
    // edge_routes on every start.
    version: 5,
    sql: `
      CREATE TABLE exposures (
        workload    TEXT NOT NULL,
        edge        TEXT NOT NULL,
        kind        TEXT NOT NULL CHECK (kind IN ('https', 'passthrough', 'tcp')),
        host        TEXT NOT NULL DEFAULT '',
        public_port INTEGER NOT NULL DEFAULT 0,
        port        INTEGER NOT NULL,
        upstream    TEXT NOT NULL,
        created_at  TEXT NOT NULL,
        PRIMARY KEY (edge, host, public_port)
      ) STRICT;
      CREATE TABLE edge_routes (
        kind        TEXT NOT NULL CHECK (kind IN ('https', 'passthrough', 'tcp')),
        host        TEXT NOT NULL DEFAULT '',
        public_port INTEGER NOT NULL DEFAULT 0,
        upstream    TEXT NOT NULL,
        workload    TEXT NOT NULL,
        capsule     TEXT NOT NULL,
        capsule_id  TEXT NOT NULL,
        created_at  TEXT NOT NULL,
        PRIMARY KEY (host, public_port)
      ) STRICT;
    `,
  },
];
