/**
 * The visitor return path of `expose --tcp`. An edge DNATs a visitor's TCP connection to a
 * workload here and keeps the visitor's own source address, so the workload sees who is
 * connecting. Its replies must then go back through the fabric to that edge (where conntrack
 * undoes the DNAT), not out of this capsule's own internet uplink. So:
 *
 * - connections that arrive on the fabric interface from a non-fabric source are marked in
 *   conntrack (a bit of the ct mark, {@link VISITOR_MARK});
 * - packets of those connections arriving from anywhere else (the workload's replies on its
 *   veth) get the same bit as their packet mark;
 * - an ip rule sends marked packets to a routing table ({@link VISITOR_TABLE}) whose only route
 *   is the default through the fabric interface: WireGuard hands them to the one peer whose
 *   AllowedIPs hold 0.0.0.0/0, the edge (see planPeers' visitorGateway);
 * - reverse-path filtering on the fabric interface is loose, so the visitor's source is not
 *   dropped for "arriving on the wrong interface".
 *
 * Installed whenever the fabric is up (it does nothing until a peer may send non-fabric
 * sources). {@link planReturnPath} is pure; {@link ReturnPath} applies it idempotently.
 */
import type { CommandRunner } from "../host/runner.js";

/** VISITOR_MARK is the ct/packet mark bit of visitor connections. */
export const VISITOR_MARK = 0x00100000;
/** VISITOR_TABLE is the routing table (and ip rule priority) of the return path. */
export const VISITOR_TABLE = 5163;
/** RETURN_TABLE is the nft table. */
export const RETURN_TABLE = "capsule_visitors";

const hex = (n: number) => `0x${n.toString(16).padStart(8, "0")}`;

/** planReturnPath returns the `nft -f` script of the return path (whole table, one transaction). Pure. */
export function planReturnPath(fabricIface: string, fabricCidr = "100.64.0.0/10"): string {
  const m = hex(VISITOR_MARK);
  return [
    `table inet ${RETURN_TABLE} {`,
    "}",
    `delete table inet ${RETURN_TABLE}`,
    `table inet ${RETURN_TABLE} {`,
    "\tchain prerouting {",
    "\t\ttype filter hook prerouting priority mangle; policy accept;",
    `\t\tiifname "${fabricIface}" ip saddr != ${fabricCidr} ip daddr ${fabricCidr} ct state new ct mark set ct mark or ${m}`,
    `\t\tiifname != "${fabricIface}" ct mark and ${m} == ${m} meta mark set meta mark or ${m}`,
    "\t}",
    "}",
    "",
  ].join("\n");
}

/** ReturnPath installs the return path on this capsule. */
export class ReturnPath {
  constructor(private readonly o: { runner: CommandRunner; fabricIface: string }) {}

  /** ensure applies the nft table, the ip rule, the route and the sysctl; idempotent. */
  async ensure(): Promise<void> {
    const r = this.o.runner;
    const m = hex(VISITOR_MARK);
    await r.run(["nft", "-f", "-"], { input: planReturnPath(this.o.fabricIface) });
    const rules = (await r.run(["ip", "-4", "rule", "show", "priority", String(VISITOR_TABLE)])).stdout;
    if (!rules.includes(`lookup ${VISITOR_TABLE}`))
      await r.run([
        "ip",
        "-4",
        "rule",
        "add",
        "priority",
        String(VISITOR_TABLE),
        "fwmark",
        `${m}/${m}`,
        "lookup",
        String(VISITOR_TABLE),
      ]);
    await r.run([
      "ip",
      "-4",
      "route",
      "replace",
      "default",
      "dev",
      this.o.fabricIface,
      "table",
      String(VISITOR_TABLE),
    ]);
    await r.run(["sysctl", "-q", "-w", `net.ipv4.conf.${this.o.fabricIface}.rp_filter=2`]);
  }
}
