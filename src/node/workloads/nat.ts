/**
 * Host-side NAT for workloads: one nftables table, `ip capsule_nat`, that this module owns
 * and replaces whole on every change.
 *
 * - egress: packets from a workload address to anywhere outside the fabric (100.64.0.0/10),
 *   leaving by an interface other than the fabric one, are masqueraded. Never a blanket
 *   masquerade: fabric traffic keeps its workload source address so policy can see it.
 * - host ports: packets to one of the capsule's own addresses (`fib daddr type local`) on a
 *   forwarded protocol/port are DNATed to the workload, both arriving (prerouting) and
 *   originating on the capsule itself (output). The forwards are one verdict-free map keyed by
 *   `meta l4proto . th dport`, so the cost per packet stays flat as forwards grow.
 *
 * {@link compileNat} is pure; {@link NftPortForwarder} applies its output with `nft --check`
 * then `nft -f`, both over stdin, and nothing else ever touches the table.
 */
import { invalidArgument } from "../../errors.js";
import type { CommandRunner } from "../host/runner.js";
import type { HostPortForward, PortForwarder } from "./ports.js";

/** NAT_TABLE is the nftables table this module owns (family ip). Nothing else may write to it. */
export const NAT_TABLE = "capsule_nat";

/** FABRIC_CIDR is the fabric's address range; traffic to it is never masqueraded. */
export const FABRIC_CIDR = "100.64.0.0/10";

/**
 * NatConfig is the desired NAT state. All fields are required; empty lists are valid and mean
 * "no masquerade" / "no forwards" (the table and its chains still exist, so a later change is
 * the same replace).
 */
export interface NatConfig {
  /** workloadAddresses are the workload IPv4 addresses whose egress is masqueraded (duplicates ignored). */
  workloadAddresses: readonly string[];
  /** forwards are the host-port DNAT rules; (protocol, hostPort) must be unique. */
  forwards: readonly HostPortForward[];
  /** fabricIface is the WireGuard interface ("capsule0"); nothing leaving through it is masqueraded. */
  fabricIface: string;
  /** fabricCidr is the fabric range, normally {@link FABRIC_CIDR}. */
  fabricCidr: string;
}

const IPV4 = /^(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(\.(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)){3}$/;
const IFACE = /^[A-Za-z0-9_.-]{1,15}$/;

const ipKey = (ip: string) => ip.split(".").reduce((n, o) => n * 256 + Number(o), 0);

function checkPort(field: string, p: number): void {
  if (!Number.isInteger(p) || p < 1 || p > 65535)
    throw invalidArgument(field, `${p} is not a port (1-65535)`);
}

/**
 * renderNatTable returns the `table ip capsule_nat { ... }` block alone, in the layout
 * `nft list table ip capsule_nat` prints it (up to line wrapping of set elements), so a listing
 * can be compared with it. Pure and deterministic: addresses sorted numerically, forwards by
 * protocol then host port. Throws CAPSULE_INVALID_ARGUMENT on a malformed address, port,
 * interface name or a duplicate (protocol, hostPort).
 */
export function renderNatTable(cfg: NatConfig): string {
  if (!IFACE.test(cfg.fabricIface))
    throw invalidArgument("fabricIface", `"${cfg.fabricIface}" is not an interface name`);
  const [net = "", len = ""] = cfg.fabricCidr.split("/");
  if (!IPV4.test(net) || !/^\d{1,2}$/.test(len) || Number(len) > 32)
    throw invalidArgument("fabricCidr", `"${cfg.fabricCidr}" is not an IPv4 CIDR`);
  for (const a of cfg.workloadAddresses)
    if (!IPV4.test(a)) throw invalidArgument("workloadAddresses", `"${a}" is not an IPv4 address`);
  const addrs = [...new Set(cfg.workloadAddresses)].sort((a, b) => ipKey(a) - ipKey(b));

  const seen = new Set<string>();
  for (const f of cfg.forwards) {
    if (f.protocol !== "tcp" && f.protocol !== "udp")
      throw invalidArgument("forwards.protocol", `"${String(f.protocol)}" is not tcp or udp`);
    checkPort("forwards.hostPort", f.hostPort);
    checkPort("forwards.port", f.port);
    if (!IPV4.test(f.address))
      throw invalidArgument("forwards.address", `"${f.address}" is not an IPv4 address`);
    const k = `${f.protocol}/${f.hostPort}`;
    if (seen.has(k))
      throw invalidArgument(
        "forwards",
        `host port ${k} is forwarded twice`,
        "each host port may go to one workload",
      );
    seen.add(k);
  }
  const fwds = [...cfg.forwards].sort((a, b) =>
    a.protocol === b.protocol ? a.hostPort - b.hostPort : a.protocol < b.protocol ? -1 : 1,
  );

  const lines = [`table ip ${NAT_TABLE} {`, "\tset workloads {", "\t\ttype ipv4_addr"];
  if (addrs.length) lines.push(`\t\telements = { ${addrs.join(", ")} }`);
  lines.push("\t}", "", "\tmap forwards {", "\t\ttype inet_proto . inet_service : ipv4_addr . inet_service");
  if (fwds.length)
    lines.push(
      `\t\telements = { ${fwds.map((f) => `${f.protocol} . ${f.hostPort} : ${f.address} . ${f.port}`).join(", ")} }`,
    );
  const dnat = "\t\tfib daddr type local dnat ip to meta l4proto . th dport map @forwards";
  lines.push(
    "\t}",
    "",
    "\tchain prerouting {",
    "\t\ttype nat hook prerouting priority dstnat; policy accept;",
    dnat,
    "\t}",
    "",
    "\tchain output {",
    "\t\ttype nat hook output priority -100; policy accept;",
    dnat,
    "\t}",
    "",
    "\tchain postrouting {",
    "\t\ttype nat hook postrouting priority srcnat; policy accept;",
    `\t\tip saddr @workloads ip daddr != ${cfg.fabricCidr} oifname != "${cfg.fabricIface}" masquerade`,
    "\t}",
    "}",
  );
  return `${lines.join("\n")}\n`;
}

/**
 * compileNat returns the complete `nft -f` input that makes table `ip capsule_nat` exactly
 * `cfg`: declare the table (a no-op when it exists), delete it, define it whole. nft runs a file
 * as one transaction, so the replace is atomic and works whether or not the table existed.
 * Pure and deterministic (see {@link renderNatTable}); empty inputs give empty set and map.
 */
export function compileNat(cfg: NatConfig): string {
  return `table ip ${NAT_TABLE} {\n}\ndelete table ip ${NAT_TABLE}\n${renderNatTable(cfg)}`;
}

/**
 * normalizeRuleset reduces a table's text to what matters for "is it the same ruleset": it
 * collapses whitespace (nft wraps long element lists) and sorts the elements of every
 * `elements = { ... }` (nft lists a map in hash order, not in the order it was given). Pure.
 */
export function normalizeRuleset(text: string): string {
  return text
    .replace(/\s+/g, " ")
    .trim()
    .replace(
      /elements = \{ ([^}]*) \}/g,
      (_, els: string) => `elements = { ${els.split(", ").sort().join(", ")} }`,
    );
}

/** NftPortForwarderOptions: `runner` and `fabricIface` are required; `fabricCidr` defaults to {@link FABRIC_CIDR}. */
export interface NftPortForwarderOptions {
  /** runner runs nft and ss in the capsule's network namespace. */
  runner: CommandRunner;
  /** fabricIface is the fabric (WireGuard) interface name. */
  fabricIface: string;
  /** fabricCidr is the fabric range; unset = {@link FABRIC_CIDR}. */
  fabricCidr?: string;
}

/**
 * NftPortForwarder is the {@link PortForwarder} on nftables. `set` is declarative and
 * idempotent: it renders the table, skips when that equals what was last applied (on the first
 * call, what `nft list table` shows, so a restarted capsuled changes nothing), else checks it
 * with `nft --check -f -` and applies it with `nft -f -`. Calls are serialized.
 */
export class NftPortForwarder implements PortForwarder {
  private readonly runner: CommandRunner;
  private readonly fabricIface: string;
  private readonly fabricCidr: string;
  /** applied is the normalized table last applied or found; undefined until the first set. */
  private applied: string | undefined;
  private queue: Promise<unknown> = Promise.resolve();

  constructor(opts: NftPortForwarderOptions) {
    this.runner = opts.runner;
    this.fabricIface = opts.fabricIface;
    this.fabricCidr = opts.fabricCidr ?? FABRIC_CIDR;
  }

  /** set replaces table ip capsule_nat with masquerade for `workloadAddresses` and DNAT for `forwards`; a no-op when unchanged. */
  set(workloadAddresses: string[], forwards: HostPortForward[]): Promise<void> {
    const run = this.queue.then(() => this.apply(workloadAddresses, forwards));
    this.queue = run.catch(() => undefined);
    return run;
  }

  private async apply(workloadAddresses: string[], forwards: HostPortForward[]): Promise<void> {
    const cfg: NatConfig = {
      workloadAddresses,
      forwards,
      fabricIface: this.fabricIface,
      fabricCidr: this.fabricCidr,
    };
    const table = normalizeRuleset(renderNatTable(cfg));
    if (this.applied === undefined) {
      const cur = await this.runner.run(["nft", "list", "table", "ip", NAT_TABLE], { allowFailure: true });
      if (cur.exitCode === 0) this.applied = normalizeRuleset(cur.stdout);
    }
    if (this.applied === table) return;
    const text = compileNat(cfg);
    await this.runner.run(["nft", "--check", "-f", "-"], { input: text });
    this.applied = undefined; // unknown until the apply succeeds
    await this.runner.run(["nft", "-f", "-"], { input: text });
    this.applied = table;
  }

  /** portInUse reports whether a socket on the capsule listens on (tcp) or is bound to (udp) `port`, on any address. Read-only. */
  async portInUse(protocol: "tcp" | "udp", port: number): Promise<boolean> {
    checkPort("port", port);
    const r = await this.runner.run(["ss", protocol === "tcp" ? "-Hltn" : "-Hlun"]);
    return listeningPorts(r.stdout).has(port);
  }
}

/**
 * listeningPorts parses `ss -Hltn` / `ss -Hlun` output into the set of local ports. Lines are
 * "STATE RECV-Q SEND-Q LOCAL PEER [PROCESS]" and LOCAL is "addr:port", "[v6]:port",
 * "addr%iface:port" or "*:port". DNAT rules bind nothing, so our own forwards never show here.
 */
export function listeningPorts(ssOutput: string): Set<number> {
  const out = new Set<number>();
  for (const line of ssOutput.split("\n")) {
    const local = line.trim().split(/\s+/)[3];
    if (!local) continue;
    const m = /:(\d+)$/.exec(local);
    if (m) out.add(Number(m[1]));
  }
  return out;
}
