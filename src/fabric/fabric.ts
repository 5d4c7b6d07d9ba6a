import { channel } from "node:diagnostics_channel";
import { existsSync, readFileSync, renameSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import type { Logger } from "pino";
import { spkiFingerprint } from "../api/fingerprint.js";
import { jwkThumbprint, publicKeyFromJwk } from "../api/token.js";
import { CapsuleError, ErrorCode, invalidArgument } from "../errors.js";
import type { Clock } from "../node/host/clock.js";
import {
  allocateAddress,
  capsuleAddress,
  FABRIC_CIDR,
  inFabric,
  type PoolClaim,
  pickPool,
  poolCidr,
  poolConflicts,
  poolOf,
} from "./ipam.js";
import { generateWgKey, isWgKey, wgPublicKey } from "./keys.js";
import { chooseHub, type PeerState, planPeers } from "./peers.js";
import type { FabricRepo, InventoryEntry, PeerRef, PeerRow } from "./repo.js";
import type { WgDump, WgInterfaceConfig } from "./wgconf.js";

/** configuredChannel publishes `{iface, peers, warnings}` after every applied sync (lifecycle event, not a log). */
export const configuredChannel = channel("capsule:fabric:configured");

/** WG_KEY_FILE holds this capsule's WireGuard private key (mode 0600, never sent anywhere). */
export const WG_KEY_FILE = "wg.key";
/** KEY_SWITCH_GRACE_MS is how long a peer keeps the old key after acknowledging a key change. */
export const KEY_SWITCH_GRACE_MS = 250;
/** RESYNC_MS is the period of the full repair pass (re-apply WireGuard, re-push inventory). */
export const RESYNC_MS = 30_000;
/** START_STEP_TIMEOUT_MS bounds each step of {@link Fabric.start} (the interface, the address, the first sync...). */
export const START_STEP_TIMEOUT_MS = 20_000;
/** HANDSHAKE_UP_SECONDS: a peer with a handshake this recent counts as up. */
export const HANDSHAKE_UP_SECONDS = 180;

/** Dataplane is what the fabric needs of WireGuard (implemented by WgClient). */
export interface Dataplane {
  ensureInterface(o: {
    iface: string;
    listenPort: number;
    privateKeyFile: string;
    logFile: string;
  }): Promise<{ mode: "kernel" | "userspace"; adopted: boolean }>;
  sync(c: WgInterfaceConfig): Promise<unknown>;
  dump(): Promise<WgDump>;
}

/** HostNet is what the fabric needs of the host's network stack (implemented by the Netlink seam). */
export interface HostNet {
  ensureAddress(iface: string, cidr: string): Promise<unknown>;
  removeAddress(iface: string, cidr: string): Promise<unknown>;
  listAddresses(iface: string): Promise<string[]>;
  setLinkUp(iface: string): Promise<unknown>;
  setSysctl(key: string, value: string): Promise<unknown>;
}

/** PeerCaller calls an enrolled peer's API over the fabric, signed with this capsule's peer key. */
export interface PeerCaller {
  call<Res>(peer: PeerRow, method: string, request: object, deadlineMs?: number): Promise<Res>;
}

/** Inventory is a capsule's addressable things, versioned by a generation counter. */
export interface Inventory {
  capsuleId: string;
  name: string;
  capsuleAddress: string;
  generation: string;
  entries: InventoryEntry[];
  /** edge says the capsule runs as an edge (policy `{edge: NAME}` selectors); unset = not an edge. */
  edge?: boolean;
}

/** SelfInfo is this capsule's fabric side as sent to the other side of an enrollment. */
export interface SelfInfo {
  capsuleId: string;
  name: string;
  wgPublicKey: string;
  endpoint: string;
  capsuleAddress: string;
  pool: number;
  apiPort: number;
  apiCertPem: string;
  apiFingerprint: string;
  peerKeyJwk: string;
  peers: { capsuleId: string; name: string; endpoint: string; pool: number; relayVia: string }[];
  inventory: Inventory | null;
  wireguardMode: string;
}

/** FabricIdentity is who this capsule is on the fabric (all required; endpoint empty = behind NAT). */
export interface FabricIdentity {
  capsuleId: string;
  name: string;
  iface: string;
  listenPort: number;
  endpoint: string;
  apiPort: number;
  apiCertPem: string;
  apiFingerprint: string;
  peerKeyJwk: string;
  /** edge: this capsule runs as an edge (announced in its inventory); unset = false. */
  edge?: boolean;
}

/** FabricOptions wires the fabric's collaborators (all required except those marked optional with `?`). */
export interface FabricOptions {
  repo: FabricRepo;
  dataplane: Dataplane;
  net: HostNet;
  caller: PeerCaller;
  clock: Clock;
  log: Logger;
  stateDir: string;
  self: FabricIdentity;
  resyncMs?: number;
  /** startStepTimeoutMs: see {@link START_STEP_TIMEOUT_MS}. */
  startStepTimeoutMs?: number;
  /** keySwitchGraceMs: see {@link KEY_SWITCH_GRACE_MS} (tests set 0). */
  keySwitchGraceMs?: number;
  /** onChange is told after every applied change of peers or inventories (policy and edge recompile). */
  onChange?: () => void;
  /**
   * visitorGateway names the peer (an edge) whose AllowedIPs also take 0.0.0.0/0, so that
   * visitors it forwards with their own address (`expose --tcp`) are accepted; unset = none.
   */
  visitorGateway?: () => string | undefined;
  /** onAddressChange is told when this capsule's fabric address is (re)assigned, e.g. to listen on it. */
  onAddressChange?: (address: string) => void;
}

/** PeerStatusView is one row of `fabric status`. */
export interface PeerStatusView {
  capsuleId: string;
  name: string;
  publicKey: string;
  endpoint: string;
  handshakeAgeSeconds: number;
  rxBytes: string;
  txBytes: string;
  relayVia: string;
  allowedIps: string[];
  capsuleAddress: string;
  up: boolean;
}

/**
 * Fabric owns this capsule's side of the WireGuard mesh: its pool and address, its key, the
 * interface, the enrolled peers and the inventories they exchange. Every change is persisted
 * first and then applied as one full sync of the interface (serialized), so a crash at any
 * point is repaired by the next apply; the periodic resync re-applies and re-pushes.
 */
export class Fabric {
  private readonly o: FabricOptions;
  private mode: "kernel" | "userspace" | "" = "";
  private started = false;
  private applying: Promise<void> = Promise.resolve();
  private timer: NodeJS.Timeout | undefined;
  private lastWarnings: string[] = [];

  constructor(o: FabricOptions) {
    this.o = o;
  }

  /** address is this capsule's fabric address (pool.1); stable once the pool is chosen. */
  get address(): string {
    return capsuleAddress(this.ensurePool());
  }

  /** wireguardMode is "kernel" or "userspace" once started, else "". */
  get wireguardMode(): string {
    return this.mode;
  }

  private get keyFile(): string {
    return join(this.o.stateDir, WG_KEY_FILE);
  }

  private ensurePool(): number {
    let pool = this.o.repo.pool();
    if (pool === undefined) {
      pool = pickPool(new Set());
      this.o.repo.setPool(pool);
    }
    return pool;
  }

  private privateKey(): string {
    if (!existsSync(this.keyFile)) {
      const tmp = `${this.keyFile}.tmp`;
      writeFileSync(tmp, `${generateWgKey().privateKey}\n`, { mode: 0o600 });
      renameSync(tmp, this.keyFile);
    }
    return readFileSync(this.keyFile, "utf8").trim();
  }

  /** publicKey is this capsule's WireGuard public key. */
  publicKey(): string {
    return wgPublicKey(this.privateKey());
  }

  /**
   * start brings the fabric up, adopting an interface that is already running (a restart
   * after SIGKILL): address, forwarding, then one full sync. Idempotent. Every step is bounded
   * ({@link FabricOptions.startStepTimeoutMs}): a step that does not finish fails the start with
   * CAPSULE_TIMEOUT naming it (the caller retries), and a slow one is logged while it runs, so a
   * hang shows in the log as the step it is in. "fabric up" carries each step's duration.
   */
  async start(): Promise<void> {
    const s = this.o.self;
    const t0 = performance.now();
    const steps: Record<string, number> = {};
    const limit = this.o.startStepTimeoutMs ?? START_STEP_TIMEOUT_MS;
    const step = async <T>(name: string, fn: () => Promise<T>): Promise<T> => {
      const t = performance.now();
      this.o.log.debug({ step: name }, "fabric start: step");
      const slow = setTimeout(
        () =>
          this.o.log.warn(
            { step: name, ms: Math.round(performance.now() - t) },
            "fabric start: step is slow",
          ),
        Math.min(5_000, limit / 2),
      );
      let bound: NodeJS.Timeout | undefined;
      try {
        return await Promise.race([
          fn(),
          new Promise<never>((_, reject) => {
            bound = setTimeout(
              () =>
                reject(
                  new CapsuleError(
                    ErrorCode.Timeout,
                    `fabric start: ${name} did not finish within ${limit} ms`,
                    {
                      hint: "see the capsuled log (and wireguard-go's log in the state dir); the start is retried",
                      details: { step: name },
                    },
                  ),
                ),
              limit,
            );
          }),
        ]);
      } finally {
        clearTimeout(slow);
        clearTimeout(bound);
        steps[name] = Math.round(performance.now() - t);
        this.o.log.debug({ step: name, ms: steps[name] }, "fabric start: step done");
      }
    };
    await step("key", async () => {
      this.ensurePool();
      this.privateKey();
    });
    const r = await step("interface", () =>
      this.o.dataplane.ensureInterface({
        iface: s.iface,
        listenPort: s.listenPort,
        privateKeyFile: this.keyFile,
        logFile: join(this.o.stateDir, `wireguard-go-${s.iface}.log`),
      }),
    );
    this.mode = r.mode;
    // The /10 on the interface gives the connected route for the whole fabric; WireGuard's
    // AllowedIPs then pick the peer per /32.
    await step("address", () => this.ensureOnlyAddress());
    await step("link up", () => this.o.net.setLinkUp(s.iface));
    // Forwarding lets this capsule serve as a hub for peers that are both behind NAT.
    await step("forwarding", () => this.o.net.setSysctl("net.ipv4.ip_forward", "1"));
    await step("peers", () => this.apply());
    this.started = true;
    this.o.onAddressChange?.(this.address);
    this.o.log.info(
      {
        iface: s.iface,
        address: this.address,
        mode: r.mode,
        adopted: r.adopted,
        pool: poolCidr(this.ensurePool()),
        ms: Math.round(performance.now() - t0),
        steps,
      },
      "fabric up",
    );
    this.timer = setInterval(() => void this.resync(), this.o.resyncMs ?? RESYNC_MS);
    this.timer.unref();
  }

  /**
   * ensureOnlyAddress makes the interface carry exactly this capsule's address: a stale one
   * (an interrupted repool, a restored state dir) would otherwise be picked as the source of
   * outgoing packets and dropped by every peer's cryptokey routing.
   */
  private async ensureOnlyAddress(): Promise<void> {
    const want = `${this.address}/10`;
    for (const a of await this.o.net.listAddresses(this.o.self.iface)) {
      if (a !== want) await this.o.net.removeAddress(this.o.self.iface, a);
    }
    await this.o.net.ensureAddress(this.o.self.iface, want);
  }

  /** stop ends the periodic resync; the interface and tunnels stay up (restart safety). */
  stop(): void {
    if (this.timer) clearInterval(this.timer);
    this.timer = undefined;
  }

  /** isStarted reports whether start() completed. */
  isStarted(): boolean {
    return this.started;
  }

  /** inventory is this capsule's current inventory. */
  inventory(): Inventory {
    return {
      capsuleId: this.o.self.capsuleId,
      name: this.o.self.name,
      capsuleAddress: this.address,
      generation: this.o.repo.generation().toString(),
      entries: this.o.repo.addresses(),
      edge: this.o.self.edge === true,
    };
  }

  /** peerInventories are the inventories last received from each peer. */
  peerInventories(): Inventory[] {
    return this.o.repo.listPeers().map((p) => ({
      capsuleId: p.capsuleId,
      name: p.name,
      capsuleAddress: p.capsuleAddress,
      generation: p.inventoryGen.toString(),
      entries: p.inventory,
      edge: p.edge === true,
    }));
  }

  /** selfInfo describes this capsule for the other side of an enrollment. */
  selfInfo(): SelfInfo {
    const s = this.o.self;
    return {
      capsuleId: s.capsuleId,
      name: s.name,
      wgPublicKey: this.publicKey(),
      endpoint: s.endpoint,
      capsuleAddress: this.address,
      pool: this.ensurePool(),
      apiPort: s.apiPort,
      apiCertPem: s.apiCertPem,
      apiFingerprint: s.apiFingerprint,
      peerKeyJwk: s.peerKeyJwk,
      peers: this.o.repo.listPeers().map((p) => ({
        capsuleId: p.capsuleId,
        name: p.name,
        endpoint: p.endpoint ?? "",
        pool: p.pool,
        relayVia: p.relayVia ?? "",
      })),
      inventory: this.inventory(),
      wireguardMode: this.mode,
    };
  }

  /**
   * enroll adds (or refreshes) a peer from its SelfInfo: validates it, refuses pool conflicts
   * with a way out, chooses direct or relayed (via a common hub with an endpoint when both are
   * behind NAT), persists, and applies. Idempotent: the same peer again changes nothing.
   */
  async enroll(peer: SelfInfo): Promise<{ relayVia: string; changed: boolean }> {
    const s = this.o.self;
    await this.validatePeer(peer);
    if (peer.capsuleId === s.capsuleId) throw invalidArgument("peer", "a capsule cannot enroll with itself");
    const existing = this.o.repo.getPeer(peer.capsuleId);
    const byName = this.o.repo.getPeer(peer.name);
    if (byName && byName.capsuleId !== peer.capsuleId) {
      throw new CapsuleError(
        ErrorCode.AlreadyExists,
        `another capsule named ${peer.name} is already enrolled here`,
        {
          hint: `unenroll the old one first: capsulectl fabric unenroll ${s.name} ${peer.name}`,
        },
      );
    }
    const mine: PoolClaim[] = [
      { capsuleId: s.capsuleId, name: s.name, pool: this.ensurePool() },
      ...this.o.repo
        .listPeers()
        .filter((p) => p.capsuleId !== peer.capsuleId)
        .flatMap((p) => [
          { capsuleId: p.capsuleId, name: p.name, pool: p.pool },
          ...p.peers.map((q) => ({ capsuleId: q.capsuleId, name: q.name, pool: q.pool })),
        ]),
    ];
    const theirs: PoolClaim[] = [
      { capsuleId: peer.capsuleId, name: peer.name, pool: peer.pool },
      ...peer.peers.map((q) => ({ capsuleId: q.capsuleId, name: q.name, pool: q.pool })),
    ];
    const conflict = poolConflicts(mine, theirs)[0];
    if (conflict) {
      const [a, b] = conflict;
      throw new CapsuleError(
        ErrorCode.FailedPrecondition,
        `address pool ${poolCidr(a.pool)} is claimed by both ${a.name} and ${b.name}`,
        {
          hint: `move the newer, empty capsule to a free pool (capsulectl --capsule ${b.name} fabric repool), then enroll again`,
          details: { pool: poolCidr(a.pool), capsules: [a.name, b.name] },
        },
      );
    }
    const hub = chooseHub(
      {
        name: s.name,
        endpoint: s.endpoint || undefined,
        peers: this.o.repo
          .listPeers()
          .filter((p) => !p.relayVia && p.capsuleId !== peer.capsuleId)
          .map((p) => ({ capsuleId: p.capsuleId, name: p.name, endpoint: p.endpoint })),
      },
      {
        name: peer.name,
        endpoint: peer.endpoint || undefined,
        peers: peer.peers
          .filter((q) => !q.relayVia)
          .map((q) => ({ capsuleId: q.capsuleId, name: q.name, endpoint: q.endpoint || undefined })),
      },
    );
    const now = new Date(this.o.clock.now()).toISOString();
    const inv = peer.inventory;
    const row: PeerRow = {
      capsuleId: peer.capsuleId,
      name: peer.name,
      wgPublicKey: peer.wgPublicKey,
      endpoint: peer.endpoint || undefined,
      capsuleAddress: peer.capsuleAddress,
      pool: peer.pool,
      apiPort: peer.apiPort,
      apiCertPem: peer.apiCertPem,
      apiFingerprint: peer.apiFingerprint,
      peerKeyJwk: peer.peerKeyJwk,
      peerKeyId: await jwkThumbprint(JSON.parse(peer.peerKeyJwk)),
      relayVia: hub?.capsuleId,
      peers: peer.peers.map((q): PeerRef => ({
        capsuleId: q.capsuleId,
        name: q.name,
        endpoint: q.endpoint || undefined,
        pool: q.pool,
        relayVia: q.relayVia || undefined,
      })),
      inventory: inv?.entries ?? existing?.inventory ?? [],
      inventoryGen: inv ? BigInt(inv.generation || "0") : (existing?.inventoryGen ?? 0n),
      edge: inv ? inv.edge === true : existing?.edge === true,
      enrolledAt: existing?.enrolledAt ?? now,
      updatedAt: now,
    };
    if (existing && existing.inventoryGen > row.inventoryGen) {
      row.inventory = existing.inventory;
      row.inventoryGen = existing.inventoryGen;
    }
    const changed = !existing || !samePeer(existing, row);
    // The peer's own peer list is refreshed silently: it informs hub and pool checks only.
    if (changed || JSON.stringify(existing?.peers) !== JSON.stringify(row.peers)) {
      this.o.repo.store.tx(() =>
        this.o.repo.upsertPeer(changed ? row : { ...existing!, peers: row.peers, updatedAt: now }),
      );
    }
    if (changed) await this.apply();
    this.o.log.info({ peer: peer.name, relayVia: hub?.name, changed }, "peer enrolled");
    return { relayVia: hub?.name ?? "", changed };
  }

  private async validatePeer(p: SelfInfo): Promise<void> {
    if (!/^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$/i.test(p.name))
      throw invalidArgument("peer.name", `"${p.name}" is not a capsule name`);
    if (!isWgKey(p.wgPublicKey)) throw invalidArgument("peer.wgPublicKey", "is not a WireGuard public key");
    if (p.endpoint && !/^[^\s:]+:\d{1,5}$/.test(p.endpoint))
      throw invalidArgument("peer.endpoint", `"${p.endpoint}" is not HOST:PORT`);
    if (!Number.isInteger(p.pool) || p.pool < 1 || p.pool >= 1 << 14)
      throw invalidArgument("peer.pool", `${p.pool} is out of range`);
    if (p.capsuleAddress !== capsuleAddress(p.pool))
      throw invalidArgument("peer.capsuleAddress", "does not match its pool");
    if (!Number.isInteger(p.apiPort) || p.apiPort < 1 || p.apiPort > 65535)
      throw invalidArgument("peer.apiPort", "is not a port");
    try {
      if (spkiFingerprint(p.apiCertPem) !== p.apiFingerprint)
        throw new Error("fingerprint does not match the certificate");
      publicKeyFromJwk(p.peerKeyJwk);
    } catch (e) {
      throw invalidArgument("peer", `bad credentials: ${(e as Error).message}`);
    }
    for (const e of p.inventory?.entries ?? []) {
      if (!inFabric(e.address))
        throw invalidArgument("peer.inventory", `${e.address} is outside ${FABRIC_CIDR}`);
    }
  }

  /** unenroll removes a peer (by id or name) and applies; idempotent (false when unknown). */
  async unenroll(idOrName: string): Promise<boolean> {
    const p = this.o.repo.getPeer(idOrName);
    if (!p) return false;
    this.o.repo.store.tx(() => this.o.repo.deletePeer(p.capsuleId));
    await this.apply();
    this.o.log.info({ peer: p.name }, "peer unenrolled");
    return true;
  }

  /**
   * reserve allocates a fabric address for a named local endpoint (a workload), or returns the
   * one it already has; `address` keeps a given address (a workload moving in). Persisted, then
   * pushed to every peer.
   */
  async reserve(name: string, labels: Record<string, string>, address?: string): Promise<InventoryEntry> {
    if (!/^[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?$/.test(name)) {
      throw invalidArgument(
        "name",
        `"${name}" is not a valid name`,
        "use lowercase letters, digits, dots and dashes",
      );
    }
    // changed: a new reservation or new labels; an unchanged one tells nobody.
    let changed = false;
    const entry = this.o.repo.store.tx(() => {
      const have = this.o.repo.addresses();
      const found = have.find((e) => e.name === name);
      if (found) {
        if (address && address !== found.address) {
          throw new CapsuleError(ErrorCode.AlreadyExists, `${name} already has address ${found.address}`);
        }
        if (JSON.stringify(found.labels) !== JSON.stringify(labels)) {
          this.o.repo.updateLabels(name, labels);
          this.o.repo.bumpGeneration();
          changed = true;
        }
        return { ...found, labels };
      }
      const used = new Set([
        this.address,
        ...have.map((e) => e.address),
        ...this.o.repo.listPeers().flatMap((p) => [p.capsuleAddress, ...p.inventory.map((e) => e.address)]),
      ]);
      if (address) {
        if (!inFabric(address)) throw invalidArgument("address", `${address} is outside ${FABRIC_CIDR}`);
        if (used.has(address))
          throw new CapsuleError(ErrorCode.AlreadyExists, `address ${address} is in use on the fabric`);
        poolOf(address);
      }
      const e = { name, address: address ?? allocateAddress(this.ensurePool(), used), labels };
      this.o.repo.putAddress(e, new Date(this.o.clock.now()).toISOString());
      this.o.repo.bumpGeneration();
      changed = true;
      this.o.log.info({ name, address: e.address }, "address reserved");
      return e;
    });
    if (changed) {
      this.o.onChange?.();
      void this.pushAll();
    }
    return entry;
  }

  /** release frees a reservation and tells the peers; idempotent. */
  async release(name: string): Promise<boolean> {
    const removed = this.o.repo.store.tx(() => {
      const r = this.o.repo.deleteAddress(name);
      if (r) this.o.repo.bumpGeneration();
      return r;
    });
    if (removed) {
      this.o.onChange?.();
      void this.pushAll();
    }
    return removed;
  }

  /** receiveInventory stores a peer's pushed inventory if it is newer, and applies. */
  async receiveInventory(from: PeerRow, inv: Inventory): Promise<boolean> {
    if (inv.capsuleId !== from.capsuleId)
      throw new CapsuleError(ErrorCode.PermissionDenied, "a peer may only push its own inventory");
    const gen = BigInt(inv.generation || "0");
    for (const e of inv.entries)
      if (!inFabric(e.address)) throw invalidArgument("entries", `${e.address} is outside ${FABRIC_CIDR}`);
    const edge = inv.edge === true;
    const applied = this.o.repo.store.tx(() => {
      const cur = this.o.repo.getPeer(from.capsuleId);
      // The edge flag is not versioned by the generation (a restart with --edge does not bump
      // it): a change of it alone is taken too.
      if (!cur || (gen <= cur.inventoryGen && edge === (cur.edge === true))) return false;
      const newer = gen > cur.inventoryGen;
      this.o.repo.upsertPeer({
        ...cur,
        inventory: newer ? inv.entries : cur.inventory,
        inventoryGen: newer ? gen : cur.inventoryGen,
        edge,
        updatedAt: new Date(this.o.clock.now()).toISOString(),
      });
      return true;
    });
    if (applied) await this.apply();
    return applied;
  }

  /** peerKeyChanged records a peer's new WireGuard key and applies (its old key stops working). */
  async peerKeyChanged(from: PeerRow, key: string): Promise<void> {
    if (!isWgKey(key)) throw invalidArgument("wgPublicKey", "is not a WireGuard public key");
    this.o.repo.store.tx(() => {
      const cur = this.o.repo.getPeer(from.capsuleId);
      if (cur)
        this.o.repo.upsertPeer({
          ...cur,
          wgPublicKey: key,
          updatedAt: new Date(this.o.clock.now()).toISOString(),
        });
    });
    // Answer first, switch a moment later: the acknowledgement must still leave on the old
    // session, or the rotating capsule never hears it (the peer's reply would be encrypted for
    // a key it does not hold yet).
    const t = setTimeout(
      () => void this.apply().catch(() => {}),
      this.o.keySwitchGraceMs ?? KEY_SWITCH_GRACE_MS,
    );
    t.unref();
  }

  /**
   * rotateKey makes a new WireGuard key, tells every peer (relayed ones first, while the hub
   * path still works), then switches. A peer that could not be told is listed in `failed`.
   */
  async rotateKey(): Promise<{ publicKey: string; notified: string[]; failed: string[] }> {
    const next = generateWgKey();
    const peers = this.o.repo.listPeers().sort((a, b) => Number(!a.relayVia) - Number(!b.relayVia));
    const notified: string[] = [];
    const failed: string[] = [];
    for (const p of peers) {
      try {
        await this.o.caller.call(p, "Fabric/PeerKeyChanged", { wgPublicKey: next.publicKey }, 5000);
        notified.push(p.name);
      } catch (e) {
        failed.push(`${p.name}: ${(e as Error).message}`);
      }
    }
    // Switch after the peers did (they wait KEY_SWITCH_GRACE_MS after answering), so the first
    // handshake with the new key meets peers that already expect it.
    if (notified.length > 0)
      await new Promise((r) => setTimeout(r, 2 * (this.o.keySwitchGraceMs ?? KEY_SWITCH_GRACE_MS)));
    const tmp = `${this.keyFile}.tmp`;
    writeFileSync(tmp, `${next.privateKey}\n`, { mode: 0o600 });
    renameSync(tmp, this.keyFile);
    await this.apply();
    this.o.log.info({ notified, failed }, "wireguard key rotated");
    return { publicKey: next.publicKey, notified, failed };
  }

  /**
   * repool moves a capsule that has no peers and no reservations to a random pool outside
   * `avoid` (the pools the operator's CLI knows to be taken) and renumbers its own address.
   * The way out of a pool conflict at enroll; refused once anything depends on the address.
   */
  async repool(avoid: number[]): Promise<SelfInfo> {
    if (this.o.repo.listPeers().length > 0 || this.o.repo.addresses().length > 0) {
      throw new CapsuleError(
        ErrorCode.FailedPrecondition,
        "only a capsule with no peers and no workloads can change its pool",
        {
          hint: "repool the other capsule of the conflict, or remove this capsule's workloads and peers first",
        },
      );
    }
    const old = this.address;
    const next = pickPool(new Set([...avoid, this.ensurePool()]));
    this.o.repo.store.tx(() => {
      this.o.repo.setPool(next);
      this.o.repo.bumpGeneration();
    });
    if (this.started) await this.ensureOnlyAddress();
    this.o.log.info({ from: old, to: this.address }, "moved to a new address pool");
    this.o.onAddressChange?.(this.address);
    return this.selfInfo();
  }

  /** status reports every peer with WireGuard counters (relayed peers show their hub's). */
  async status(): Promise<{
    publicKey: string;
    listenPort: number;
    peers: PeerStatusView[];
    warnings: string[];
  }> {
    const dump = await this.o.dataplane.dump();
    const byKey = new Map(dump.peers.map((p) => [p.publicKey, p]));
    const peers = this.o.repo.listPeers();
    const byId = new Map(peers.map((p) => [p.capsuleId, p]));
    const nowS = this.o.clock.now() / 1000;
    const views = peers.map((p): PeerStatusView => {
      const hub = p.relayVia ? byId.get(p.relayVia) : undefined;
      const wg = byKey.get((hub ?? p).wgPublicKey);
      const age = wg && wg.latestHandshake > 0 ? Math.max(0, nowS - wg.latestHandshake) : -1;
      return {
        capsuleId: p.capsuleId,
        name: p.name,
        publicKey: p.wgPublicKey,
        endpoint: wg?.endpoint ?? p.endpoint ?? "",
        handshakeAgeSeconds: age,
        rxBytes: String(wg?.rxBytes ?? 0),
        txBytes: String(wg?.txBytes ?? 0),
        relayVia: hub?.name ?? (p.relayVia ? `${p.relayVia} (not enrolled)` : ""),
        allowedIps: p.relayVia
          ? [p.capsuleAddress, ...p.inventory.map((e) => e.address)].map((a) => `${a}/32`)
          : (wg?.allowedIps ?? []),
        capsuleAddress: p.capsuleAddress,
        up: age >= 0 && age <= HANDSHAKE_UP_SECONDS,
      };
    });
    return {
      publicKey: dump.publicKey,
      listenPort: dump.listenPort,
      peers: views,
      warnings: this.lastWarnings,
    };
  }

  /** apply syncs the interface to the persisted state (serialized; the whole peer set at once). */
  apply(): Promise<void> {
    const run = this.applying.then(async () => {
      const peers = this.o.repo.listPeers();
      const states: PeerState[] = peers.map((p) => ({
        capsuleId: p.capsuleId,
        name: p.name,
        wgPublicKey: p.wgPublicKey,
        endpoint: p.endpoint,
        capsuleAddress: p.capsuleAddress,
        addresses: p.inventory.map((e) => e.address),
        relayVia: p.relayVia,
      }));
      const gwName = this.o.visitorGateway?.();
      const gw = gwName === undefined ? undefined : peers.find((p) => p.name === gwName && !p.relayVia);
      if (gwName !== undefined && !gw)
        this.o.log.warn({ edge: gwName }, "visitor gateway is not a direct peer");
      const plan = planPeers(!this.o.self.endpoint, states, gw?.capsuleId);
      this.lastWarnings = [
        ...plan.conflicts.map(
          (c) => `address ${c.address} claimed by ${c.keptBy} and ${c.droppedFrom}; kept by ${c.keptBy}`,
        ),
        ...plan.unroutable.map(
          (n) => `${n} is relayed via a hub that is no longer enrolled; re-run fabric enroll`,
        ),
      ];
      for (const w of this.lastWarnings) this.o.log.warn(w);
      await this.o.dataplane.sync({
        privateKey: this.privateKey(),
        listenPort: this.o.self.listenPort,
        peers: plan.peers,
      });
      if (configuredChannel.hasSubscribers) {
        configuredChannel.publish({
          iface: this.o.self.iface,
          peers: plan.peers.length,
          warnings: this.lastWarnings,
        });
      }
      this.o.onChange?.();
    });
    this.applying = run.catch(() => {});
    return run;
  }

  /** pushAll sends this capsule's inventory to every peer (best effort; the resync repeats it). */
  async pushAll(): Promise<void> {
    const inv = this.inventory();
    await Promise.all(
      this.o.repo.listPeers().map((p) =>
        this.o.caller.call(p, "Fabric/PushInventory", inv, 5000).catch((e: unknown) => {
          this.o.log.debug(
            { peer: p.name, err: (e as Error).message },
            "inventory push failed; resync will retry",
          );
        }),
      ),
    );
  }

  private async resync(): Promise<void> {
    try {
      await this.apply();
      await this.pushAll();
    } catch (e) {
      this.o.log.warn({ err: (e as Error).message }, "fabric resync failed");
    }
  }
}

/** samePeer compares what enrollment changes about a peer (not timestamps or its peer list). */
function samePeer(a: PeerRow, b: PeerRow): boolean {
  const strip = (p: PeerRow) => ({
    ...p,
    peers: [],
    enrolledAt: "",
    updatedAt: "",
    inventoryGen: p.inventoryGen.toString(),
  });
  return JSON.stringify(strip(a)) === JSON.stringify(strip(b));
}
