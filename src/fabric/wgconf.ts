import type { WgPeer } from "./peers.js";

/** WgInterfaceConfig is the whole desired configuration of the fabric interface. */
export interface WgInterfaceConfig {
  privateKey: string;
  listenPort: number;
  peers: readonly WgPeer[];
}

/**
 * renderWgConfig renders the `wg syncconf` file for a desired configuration (pure,
 * deterministic). syncconf replaces the peer set as a whole: peers not listed are removed,
 * listed peers are updated in place without resetting their sessions, so re-applying an
 * unchanged configuration does not flap the tunnel.
 */
export function renderWgConfig(c: WgInterfaceConfig): string {
  const lines = ["[Interface]", `PrivateKey = ${c.privateKey}`, `ListenPort = ${c.listenPort}`];
  for (const p of c.peers) {
    lines.push("", "[Peer]", `PublicKey = ${p.publicKey}`);
    if (p.endpoint) lines.push(`Endpoint = ${p.endpoint}`);
    lines.push(`AllowedIPs = ${p.allowedIps.join(", ")}`);
    if (p.persistentKeepalive) lines.push(`PersistentKeepalive = ${p.persistentKeepalive}`);
  }
  return `${lines.join("\n")}\n`;
}

/** WgPeerStatus is one peer of `wg show IFACE dump`. */
export interface WgPeerStatus {
  publicKey: string;
  endpoint: string | undefined;
  allowedIps: string[];
  latestHandshake: number; // seconds since epoch, 0 = never
  rxBytes: number;
  txBytes: number;
  persistentKeepalive: number | undefined;
}

/** WgDump is the parsed output of `wg show IFACE dump`. */
export interface WgDump {
  publicKey: string;
  listenPort: number;
  peers: WgPeerStatus[];
}

/** parseWgDump parses `wg show IFACE dump` (tab-separated; first line is the interface). */
export function parseWgDump(text: string): WgDump {
  const rows = text
    .trim()
    .split("\n")
    .filter((l) => l.length > 0)
    .map((l) => l.split("\t"));
  const head = rows[0] ?? [];
  return {
    publicKey: head[1] ?? "",
    listenPort: Number(head[2] ?? 0),
    peers: rows.slice(1).map((r) => ({
      publicKey: r[0] ?? "",
      endpoint: r[2] && r[2] !== "(none)" ? r[2] : undefined,
      allowedIps: r[3] && r[3] !== "(none)" ? r[3].split(",") : [],
      latestHandshake: Number(r[4] ?? 0),
      rxBytes: Number(r[5] ?? 0),
      txBytes: Number(r[6] ?? 0),
      persistentKeepalive: r[7] && r[7] !== "off" ? Number(r[7]) : undefined,
    })),
  };
}
