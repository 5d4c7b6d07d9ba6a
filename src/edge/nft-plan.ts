/**
 * The edge's nftables table, `ip capsule_edge`, planned from its TCP routes. Pure: no I/O.
 *
 * - prerouting (nat, dstnat): a packet to the public address whose TCP destination port is a
 *   route's public port is DNATed to the route's upstream on the fabric. One verdict-free map
 *   keyed by port keeps the cost per packet flat as routes grow. No SNAT/masquerade: the
 *   workload sees the visitor's address and its capsule routes the replies back through the
 *   fabric to this edge (src/node/expose/return-path.ts), where conntrack undoes the DNAT.
 * - forward (filter): established/related traffic passes first (replies in both directions);
 *   then a new connection from outside the fabric into the fabric interface passes only when it
 *   was DNATed here (`ct status dnat`), and is dropped otherwise, so a visitor that routes
 *   100.64.0.0/10 via the edge cannot reach fabric addresses directly. Fabric-to-fabric relaying
 *   (in and out of the fabric interface), the edge's own workloads (their veths, `cw*`, see
 *   src/node/runtime/netns.ts) and the edge's own traffic (output, not forward) are untouched.
 *
 * {@link renderEdgeTable} prints the table the way `nft list table ip capsule_edge` does (up to
 * whitespace, see {@link normalizeNft}), so the applier compares it with the live table and
 * skips unchanged applies; {@link planEdgeNft} wraps it in one atomic replace.
 */
import { invalidArgument } from "../errors.js";
import { IPV4 } from "./plan.js";

/** EDGE_TABLE is the nftables table (family ip) the edge owns. Nothing else may write to it. */
export const EDGE_TABLE = "capsule_edge";

/** EdgeTcpForward is one DNAT: the public port and the upstream `ip:port`. Both required. */
export interface EdgeTcpForward {
  publicPort: number;
  upstream: string;
}

/** EdgeNftOptions: every field is required; `tcp` may be empty (the chains still exist). */
export interface EdgeNftOptions {
  /** publicAddress is the IPv4 address visitors reach (the DNAT matches it as `ip daddr`). */
  publicAddress: string;
  /** fabricIface is the fabric interface name ("capsule0"). */
  fabricIface: string;
  /** tcp are the forwards; public ports must be unique. */
  tcp: readonly EdgeTcpForward[];
}

const IFACE = /^[A-Za-z0-9_.-]{1,15}$/;

function port(field: string, p: number): number {
  if (!Number.isInteger(p) || p < 1 || p > 65535)
    throw invalidArgument(field, `${String(p)} is not a port (1-65535)`);
  return p;
}

/**
 * renderEdgeTable returns the `table ip capsule_edge { ... }` block alone, in `nft list`'s
 * layout. Pure and deterministic (forwards sorted by public port). Throws
 * CAPSULE_INVALID_ARGUMENT naming the field on a malformed address, interface, port or
 * upstream, or a public port routed twice.
 */
export function renderEdgeTable(o: EdgeNftOptions): string {
  if (!IPV4.test(o.publicAddress))
    throw invalidArgument("publicAddress", `"${o.publicAddress}" is not an IPv4 address`);
  if (!IFACE.test(o.fabricIface))
    throw invalidArgument("fabricIface", `"${o.fabricIface}" is not an interface name`);
  const seen = new Set<number>();
  const fwds = o.tcp.map((f) => {
    const p = port("tcp.publicPort", f.publicPort);
    const m = /^([0-9.]+):(\d{1,5})$/.exec(f.upstream);
    if (!m || !IPV4.test(m[1] ?? ""))
      throw invalidArgument("tcp.upstream", `"${f.upstream}" is not an IPv4 ip:port`);
    const up = port("tcp.upstream", Number(m[2]));
    if (seen.has(p)) throw invalidArgument("tcp.publicPort", `${p} is routed more than once`);
    seen.add(p);
    return { p, ip: m[1] ?? "", up };
  });
  fwds.sort((a, b) => a.p - b.p);
  const iface = `"${o.fabricIface}"`;
  const lines = [
    `table ip ${EDGE_TABLE} {`,
    "\tmap tcp_routes {",
    "\t\ttype inet_service : ipv4_addr . inet_service",
  ];
  if (fwds.length)
    lines.push(`\t\telements = { ${fwds.map((f) => `${f.p} : ${f.ip} . ${f.up}`).join(", ")} }`);
  lines.push(
    "\t}",
    "",
    "\tchain prerouting {",
    "\t\ttype nat hook prerouting priority dstnat; policy accept;",
    `\t\tip daddr ${o.publicAddress} dnat ip to tcp dport map @tcp_routes`,
    "\t}",
    "",
    "\tchain forward {",
    "\t\ttype filter hook forward priority filter; policy accept;",
    "\t\tct state established,related accept",
    `\t\tiifname != ${iface} oifname ${iface} ct status dnat accept`,
    // The edge's own workloads (veths cw*) reach the fabric as on any capsule.
    `\t\tiifname != ${iface} iifname != "cw*" oifname ${iface} drop`,
    "\t}",
    "}",
  );
  return `${lines.join("\n")}\n`;
}

/**
 * planEdgeNft returns the complete `nft -f` input that makes `ip capsule_edge` exactly `o`:
 * declare the table (a no-op when it exists), delete it, define it whole. nft runs a file as
 * one transaction, so the replace is atomic whether or not the table existed. Pure.
 */
export function planEdgeNft(o: EdgeNftOptions): string {
  return `table ip ${EDGE_TABLE} {\n}\ndelete table ip ${EDGE_TABLE}\n${renderEdgeTable(o)}`;
}

/** deleteEdgeNft is the `nft -f` input that removes the table whether or not it exists. Pure. */
export function deleteEdgeNft(): string {
  return `table ip ${EDGE_TABLE} {\n}\ndelete table ip ${EDGE_TABLE}\n`;
}

/**
 * normalizeNft reduces a table's text to what matters for "is it the same ruleset": whitespace
 * collapsed (nft wraps long element lists) and the elements of every `elements = { ... }`
 * sorted (nft lists a map in hash order). Pure.
 */
export function normalizeNft(text: string): string {
  return text
    .replace(/\s+/g, " ")
    .trim()
    .replace(/elements = \{ ([^}]*) \}/g, (_, els: string) => {
      const items = els
        .split(",")
        .map((e) => e.trim())
        .filter(Boolean)
        .sort();
      return `elements = { ${items.join(", ")} }`;
    });
}
