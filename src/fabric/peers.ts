import { CapsuleError, ErrorCode } from "../errors.js";

/** KEEPALIVE_SECONDS keeps a NAT mapping open from a capsule without an endpoint. */
export const KEEPALIVE_SECONDS = 25;

/** PeerState is an enrolled peer as this capsule knows it. */
export interface PeerState {
  capsuleId: string;
  name: string;
  wgPublicKey: string;
  /** endpoint "host:port" where it can be dialled; undefined when it is behind NAT. */
  endpoint: string | undefined;
  capsuleAddress: string;
  /** addresses are the workload addresses it currently hosts (its inventory). */
  addresses: readonly string[];
  /** relayVia is the capsule id of the hub that relays to it; undefined = direct. */
  relayVia: string | undefined;
}

/** WgPeer is one [Peer] of the WireGuard configuration. */
export interface WgPeer {
  publicKey: string;
  endpoint: string | undefined;
  allowedIps: string[];
  persistentKeepalive: number | undefined;
}

/** PeerPlan is the desired WireGuard peer set plus what could not be placed. */
export interface PeerPlan {
  peers: WgPeer[];
  /** conflicts: an address claimed by two peers; the first (by name) keeps it. */
  conflicts: { address: string; keptBy: string; droppedFrom: string }[];
  /** unroutable: relayed peers whose hub is not (or no longer) a direct peer. */
  unroutable: string[];
}

const byIp = (a: string, b: string) => {
  const n = (s: string) => s.split(/[./]/).map(Number);
  const x = n(a);
  const y = n(b);
  for (let i = 0; i < 5; i++) if ((x[i] ?? 0) !== (y[i] ?? 0)) return (x[i] ?? 0) - (y[i] ?? 0);
  return 0;
};

/**
 * planPeers computes the whole WireGuard peer set from the enrolled peers (pure; the applier
 * syncs the interface to it). A direct peer's AllowedIPs are exactly its capsule address plus
 * the addresses it hosts, as /32s. A relayed peer has no [Peer] of its own: its addresses are
 * added to its hub's AllowedIPs, so packets go through the hub and cryptokey routing still
 * accepts its source only from that path. Keepalive is set towards peers with an endpoint
 * when this capsule itself has none (it must keep its NAT mapping open).
 *
 * `visitorGateway` (a direct peer's capsule id) also gets 0.0.0.0/0: internet visitors that an
 * edge DNATs to a workload here (`expose --tcp`) keep their own source address, and cryptokey
 * routing must accept those sources from that edge, and only from it. Longer prefixes (every
 * other peer's /32s) still win for fabric destinations; nothing is routed by it unless a route
 * points at the interface (see the visitor return path).
 */
export function planPeers(
  selfBehindNat: boolean,
  peers: readonly PeerState[],
  visitorGateway?: string,
): PeerPlan {
  const sorted = [...peers].sort(
    (a, b) => a.name.localeCompare(b.name) || a.capsuleId.localeCompare(b.capsuleId),
  );
  const owner = new Map<string, string>();
  const conflicts: PeerPlan["conflicts"] = [];
  const direct = new Map<string, WgPeer>();
  const unroutable: string[] = [];
  for (const p of sorted) {
    if (p.relayVia) continue;
    direct.set(p.capsuleId, {
      publicKey: p.wgPublicKey,
      endpoint: p.endpoint,
      allowedIps: [],
      persistentKeepalive: selfBehindNat && p.endpoint ? KEEPALIVE_SECONDS : undefined,
    });
  }
  for (const p of sorted) {
    const target = direct.get(p.relayVia ?? p.capsuleId);
    if (!target) {
      unroutable.push(p.name);
      continue;
    }
    for (const addr of [p.capsuleAddress, ...p.addresses]) {
      const kept = owner.get(addr);
      if (kept !== undefined) {
        if (kept !== p.name) conflicts.push({ address: addr, keptBy: kept, droppedFrom: p.name });
        continue;
      }
      owner.set(addr, p.name);
      target.allowedIps.push(`${addr}/32`);
    }
  }
  const gw = visitorGateway === undefined ? undefined : direct.get(visitorGateway);
  if (gw) gw.allowedIps.push("0.0.0.0/0");
  const out = [...direct.values()].map((w) => ({ ...w, allowedIps: [...new Set(w.allowedIps)].sort(byIp) }));
  out.sort((a, b) => a.publicKey.localeCompare(b.publicKey));
  return { peers: out, conflicts, unroutable };
}

/** HubCandidate is a peer of one side of an enrollment, as seen for relay selection. */
export interface HubCandidate {
  capsuleId: string;
  name: string;
  endpoint: string | undefined;
}

/**
 * chooseHub picks the relay for two capsules that are both behind NAT: a capsule enrolled with
 * both that has an endpoint, the first by name (deterministic, so both sides agree). Returns
 * undefined when a direct link is possible (either side has an endpoint); throws when neither
 * has one and they share no hub.
 */
export function chooseHub(
  a: { name: string; endpoint: string | undefined; peers: readonly HubCandidate[] },
  b: { name: string; endpoint: string | undefined; peers: readonly HubCandidate[] },
): HubCandidate | undefined {
  if (a.endpoint || b.endpoint) return undefined;
  const inB = new Set(b.peers.map((p) => p.capsuleId));
  const common = a.peers
    .filter((p) => p.endpoint && inB.has(p.capsuleId))
    .sort((x, y) => x.name.localeCompare(y.name));
  const hub = common[0];
  if (!hub) {
    throw new CapsuleError(
      ErrorCode.FailedPrecondition,
      `${a.name} and ${b.name} are both behind NAT and share no hub`,
      {
        hint: `enroll both with a capsule that has --endpoint first (capsulectl fabric enroll ${a.name} EDGE; capsulectl fabric enroll ${b.name} EDGE)`,
      },
    );
  }
  return hub;
}
