import type { Store } from "../node/store/store.js";

/** PeerRow is an enrolled peer as persisted. */
export interface PeerRow {
  capsuleId: string;
  name: string;
  wgPublicKey: string;
  endpoint: string | undefined;
  capsuleAddress: string;
  pool: number;
  apiPort: number;
  apiCertPem: string;
  apiFingerprint: string;
  peerKeyJwk: string;
  peerKeyId: string;
  relayVia: string | undefined;
  /** peers: the peer's own peers at enrollment/last push (for hub choice and pool checks). */
  peers: PeerRef[];
  inventory: InventoryEntry[];
  inventoryGen: bigint;
  /** edge: the peer announced itself as an edge; unset = false. */
  edge?: boolean;
  enrolledAt: string;
  updatedAt: string;
}

/** PeerRef is a capsule as another capsule reported it. */
export interface PeerRef {
  capsuleId: string;
  name: string;
  endpoint: string | undefined;
  pool: number;
  relayVia: string | undefined;
}

/** InventoryEntry is one addressable thing a capsule hosts (a workload). */
export interface InventoryEntry {
  name: string;
  address: string;
  labels: Record<string, string>;
}

interface RawPeer {
  capsule_id: string;
  name: string;
  wg_public_key: string;
  endpoint: string | null;
  capsule_address: string;
  pool: number;
  api_port: number;
  api_cert_pem: string;
  api_fingerprint: string;
  peer_key_jwk: string;
  peer_key_id: string;
  relay_via: string | null;
  peers_json: string;
  inventory_json: string;
  inventory_gen: string;
  edge: number;
  enrolled_at: string;
  updated_at: string;
}

function fromRaw(r: RawPeer): PeerRow {
  return {
    capsuleId: r.capsule_id,
    name: r.name,
    wgPublicKey: r.wg_public_key,
    endpoint: r.endpoint ?? undefined,
    capsuleAddress: r.capsule_address,
    pool: r.pool,
    apiPort: r.api_port,
    apiCertPem: r.api_cert_pem,
    apiFingerprint: r.api_fingerprint,
    peerKeyJwk: r.peer_key_jwk,
    peerKeyId: r.peer_key_id,
    relayVia: r.relay_via ?? undefined,
    peers: JSON.parse(r.peers_json) as PeerRef[],
    inventory: JSON.parse(r.inventory_json) as InventoryEntry[],
    inventoryGen: BigInt(r.inventory_gen),
    edge: r.edge === 1,
    enrolledAt: r.enrolled_at,
    updatedAt: r.updated_at,
  };
}

/**
 * FabricRepo keeps the fabric's state in the capsule's SQLite store: this capsule's pool and
 * inventory generation (meta), enrolled peers, and local address reservations.
 */
export class FabricRepo {
  constructor(readonly store: Store) {}

  /** pool returns this capsule's pool index, or undefined before the first start chose one. */
  pool(): number | undefined {
    const v = this.store.getMeta("fabric_pool");
    return v === undefined ? undefined : Number(v);
  }

  /** setPool records this capsule's pool. */
  setPool(pool: number): void {
    this.store.setMeta("fabric_pool", String(pool));
  }

  /** generation is this capsule's inventory generation. */
  generation(): bigint {
    return BigInt(this.store.getMeta("fabric_inventory_gen") ?? "0");
  }

  /** bumpGeneration increments and returns the inventory generation (call inside the change's transaction). */
  bumpGeneration(): bigint {
    const next = this.generation() + 1n;
    this.store.setMeta("fabric_inventory_gen", next.toString());
    return next;
  }

  /** listPeers returns every enrolled peer, by name. */
  listPeers(): PeerRow[] {
    return (this.store.db.prepare("SELECT * FROM fabric_peers ORDER BY name").all() as RawPeer[]).map(
      fromRaw,
    );
  }

  /** getPeer finds a peer by capsule id or name. */
  getPeer(idOrName: string): PeerRow | undefined {
    const r = this.store.db
      .prepare("SELECT * FROM fabric_peers WHERE capsule_id = ? OR name = ?")
      .get(idOrName, idOrName) as RawPeer | undefined;
    return r ? fromRaw(r) : undefined;
  }

  /** peerByKeyId finds a peer by the key id of its peer-call signing key. */
  peerByKeyId(kid: string): PeerRow | undefined {
    const r = this.store.db.prepare("SELECT * FROM fabric_peers WHERE peer_key_id = ?").get(kid) as
      RawPeer | undefined;
    return r ? fromRaw(r) : undefined;
  }

  /** upsertPeer inserts or replaces a peer (by capsule id). Callers run it in a transaction. */
  upsertPeer(p: PeerRow): void {
    this.store.db
      .prepare(
        `INSERT INTO fabric_peers (capsule_id, name, wg_public_key, endpoint, capsule_address, pool, api_port, api_cert_pem,
           api_fingerprint, peer_key_jwk, peer_key_id, relay_via, peers_json, inventory_json, inventory_gen, edge, enrolled_at, updated_at)
         VALUES (@capsuleId, @name, @wgPublicKey, @endpoint, @capsuleAddress, @pool, @apiPort, @apiCertPem,
           @apiFingerprint, @peerKeyJwk, @peerKeyId, @relayVia, @peersJson, @inventoryJson, @inventoryGen, @edge, @enrolledAt, @updatedAt)
         ON CONFLICT(capsule_id) DO UPDATE SET name = excluded.name, wg_public_key = excluded.wg_public_key,
           endpoint = excluded.endpoint, capsule_address = excluded.capsule_address, pool = excluded.pool,
           api_port = excluded.api_port, api_cert_pem = excluded.api_cert_pem, api_fingerprint = excluded.api_fingerprint,
           peer_key_jwk = excluded.peer_key_jwk, peer_key_id = excluded.peer_key_id, relay_via = excluded.relay_via,
           peers_json = excluded.peers_json, inventory_json = excluded.inventory_json, inventory_gen = excluded.inventory_gen,
           edge = excluded.edge, updated_at = excluded.updated_at`,
      )
      .run({
        ...p,
        endpoint: p.endpoint ?? null,
        relayVia: p.relayVia ?? null,
        peersJson: JSON.stringify(p.peers),
        inventoryJson: JSON.stringify(p.inventory),
        inventoryGen: p.inventoryGen.toString(),
        edge: p.edge ? 1 : 0,
      });
  }

  /** deletePeer removes a peer; returns whether it existed. */
  deletePeer(capsuleId: string): boolean {
    return this.store.db.prepare("DELETE FROM fabric_peers WHERE capsule_id = ?").run(capsuleId).changes > 0;
  }

  /** addresses lists this capsule's reserved addresses (its inventory). */
  addresses(): InventoryEntry[] {
    return (
      this.store.db
        .prepare("SELECT name, address, labels_json FROM fabric_addresses ORDER BY name")
        .all() as {
        name: string;
        address: string;
        labels_json: string;
      }[]
    ).map((r) => ({
      name: r.name,
      address: r.address,
      labels: JSON.parse(r.labels_json) as Record<string, string>,
    }));
  }

  /** putAddress records a reservation. */
  putAddress(e: InventoryEntry, createdAt: string): void {
    this.store.db
      .prepare("INSERT INTO fabric_addresses(name, address, labels_json, created_at) VALUES (?, ?, ?, ?)")
      .run(e.name, e.address, JSON.stringify(e.labels), createdAt);
  }

  /** updateLabels replaces the labels of a reservation. */
  updateLabels(name: string, labels: Record<string, string>): void {
    this.store.db
      .prepare("UPDATE fabric_addresses SET labels_json = ? WHERE name = ?")
      .run(JSON.stringify(labels), name);
  }

  /** deleteAddress frees a reservation; returns whether it existed. */
  deleteAddress(name: string): boolean {
    return this.store.db.prepare("DELETE FROM fabric_addresses WHERE name = ?").run(name).changes > 0;
  }
}
