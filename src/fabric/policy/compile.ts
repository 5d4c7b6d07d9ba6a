/**
 * The policy compiler: policies + the mesh inventory into one nftables table, `inet
 * capsule_policy`, that the node replaces whole on every change (one `nft -f` transaction).
 *
 * The table judges what model.ts says is judged and nothing else, in the forward path:
 *
 *   meta nfproto != ipv4 accept                     IPv4 only; the fabric has no IPv6
 *   ip daddr != FABRIC_CIDR accept                  not a fabric destination: not ours
 *   oifname FABRIC_IFACE accept                     leaving (or relayed) through the fabric: judged where it arrives
 *   ct direction reply accept                       only the original direction is judged
 *   ct state related meta l4proto icmp accept       ICMP errors of a tracked flow (path MTU discovery)
 *   ct status dnat accept                           hostPort publish (DNAT by capsule_nat)
 *   ip saddr . ip daddr . tcp dport @allow_tcp accept
 *   ip saddr . ip daddr . udp dport @allow_udp accept
 *   meta l4proto icmp ip saddr . ip daddr @allow_icmp accept
 *   counter name ip daddr map @drop_counters drop   one named counter per local workload
 *   counter name "unknown_dst" drop                 a fabric address no local workload has (yet)
 *
 * Every allowed (source, local destination, port range) is one element of a concatenated
 * interval set, so a packet costs the same few lookups however many rules there are. The
 * rules are judged on every packet, not only a flow's first: a narrowed policy stops an
 * established flow at its next packet.
 *
 * {@link compilePolicy} is pure and deterministic; {@link decideCompiled} answers from the IR
 * what the table does, so tests can compare it with the direct evaluator (evaluate.ts).
 */
import { invalidArgument } from "../../errors.js";
import { ipToInt } from "../ipam.js";
import {
  compareIPv4,
  inCidr,
  isIPv4,
  type PacketTuple,
  rankedRules,
  MeshIndex,
  warnings,
} from "./evaluate.js";
import {
  type ImplicitRule,
  type Mesh,
  type Policy,
  type PortRange,
  type Warning,
  WORKLOAD_NAME,
} from "./model.js";

/** POLICY_TABLE is the nftables table this module describes (family inet). Nothing else may write to it. */
export const POLICY_TABLE = "capsule_policy";

/** UNKNOWN_COUNTER counts drops to fabric addresses that are no local workload's (a workload not in the inventory yet). */
export const UNKNOWN_COUNTER = "unknown_dst";

/** CounterValue is a named counter's starting value. */
export interface CounterValue {
  packets: number;
  bytes: number;
}

/**
 * PolicyCompileInput is the desired policy state of one capsule (`mesh.self`). Every field is
 * required except `counters`; empty lists are valid (no policy: every forwarded packet to a
 * local workload is dropped).
 */
export interface PolicyCompileInput {
  policies: readonly Policy[];
  implicit: readonly ImplicitRule[];
  mesh: Mesh;
  /** fabricIface is the WireGuard interface ("capsule0"). */
  fabricIface: string;
  /** fabricCidr is the fabric range, normally 100.64.0.0/10. */
  fabricCidr: string;
  /**
   * counters are starting values of the named counters by name (see {@link counterName} and
   * {@link UNKNOWN_COUNTER}), so what was counted survives the replace; unset or missing = 0.
   * Not part of the IR. Names that are not counters of this table are ignored.
   */
  counters?: Readonly<Record<string, CounterValue>>;
}

/** PortEntry is one element of allow_tcp / allow_udp: source . destination . port range (inclusive). */
export interface PortEntry {
  src: string;
  dst: string;
  from: number;
  to: number;
}

/** AddressPair is one element of allow_icmp. */
export interface AddressPair {
  src: string;
  dst: string;
}

/** LocalWorkload is a workload on this capsule: its drop counter is selected by its address. */
export interface LocalWorkload {
  name: string;
  address: string;
  counter: string;
}

/**
 * PolicyIR is the compiled table as data. Entries are sorted (source, destination numerically,
 * then port) and, per source and destination, port ranges are merged where they overlap or
 * touch: nft refuses overlapping intervals in a concatenated set. Destinations are local
 * workloads only; a pair whose source is the destination itself is left out (that packet never
 * leaves the workload).
 */
export interface PolicyIR {
  /** self is this capsule and its own fabric address. */
  self: { name: string; address: string };
  fabricIface: string;
  fabricCidr: string;
  tcp: PortEntry[];
  udp: PortEntry[];
  icmp: AddressPair[];
  /** visitorsTcp: local destination . port ranges internet visitors may reach through the fabric (see ImplicitRule.visitors). */
  visitorsTcp: { dst: string; from: number; to: number }[];
  /** local lists the workloads on this capsule, sorted by address. */
  local: LocalWorkload[];
}

/** CompiledPolicy is the compiler's output: the `nft -f` text, the IR it renders, and the selectors matching nothing. */
export interface CompiledPolicy {
  script: string;
  ir: PolicyIR;
  warnings: Warning[];
}

const IFACE = /^[A-Za-z0-9_.-]{1,15}$/;

/**
 * counterName is the name of a local workload's drop counter: `wl_` and the name with dashes
 * as underscores. Workload names are lowercase letters, digits and dashes, so the mapping is
 * one-to-one and never equals {@link UNKNOWN_COUNTER}. Pure. Throws CAPSULE_INVALID_ARGUMENT for
 * anything that is not a workload name.
 */
export function counterName(workload: string): string {
  if (!WORKLOAD_NAME.test(workload))
    throw invalidArgument("workload", `"${workload}" is not a workload name`);
  return `wl_${workload.replace(/-/g, "_")}`;
}

function checkInput(input: PolicyCompileInput): void {
  if (!IFACE.test(input.fabricIface))
    throw invalidArgument("fabricIface", `"${input.fabricIface}" is not an interface name`);
  const [net = "", len = ""] = input.fabricCidr.split("/");
  if (!isIPv4(net) || !/^\d{1,2}$/.test(len) || Number(len) > 32)
    throw invalidArgument("fabricCidr", `"${input.fabricCidr}" is not an IPv4 CIDR`);
  const bits = Number(len);
  const mask = bits === 0 ? 0 : (0xffffffff << (32 - bits)) >>> 0;
  if ((ipToInt(net) & ~mask) >>> 0 !== 0)
    throw invalidArgument("fabricCidr", `"${input.fabricCidr}" has host bits set`);
  const { mesh } = input;
  // Only what would make the table wrong or unloadable is refused: an inventory may list an
  // address twice for a moment (a workload migrating), which changes no set element.
  for (const c of mesh.capsules)
    if (!isIPv4(c.address))
      throw invalidArgument(`mesh.capsules.${c.name}.address`, `"${c.address}" is not an IPv4 address`);
  const self = mesh.capsules.find((c) => c.name === mesh.self);
  if (!self) throw invalidArgument("mesh.self", `capsule ${mesh.self} is not in mesh.capsules`);
  const localNames = new Set<string>();
  const localAddrs = new Map<string, string>([[self.address, `capsule ${self.name}`]]);
  for (const w of mesh.workloads) {
    const field = `mesh.workloads.${w.name}.address`;
    if (!isIPv4(w.address)) throw invalidArgument(field, `"${w.address}" is not an IPv4 address`);
    if (w.capsule !== mesh.self) continue;
    counterName(w.name);
    if (localNames.has(w.name)) throw invalidArgument("mesh.workloads", `workload ${w.name} is listed twice`);
    localNames.add(w.name);
    const prev = localAddrs.get(w.address);
    if (prev !== undefined)
      throw invalidArgument(field, `${w.address} is both ${prev}'s and workload ${w.name}'s`);
    localAddrs.set(w.address, `workload ${w.name}`);
    if (!inCidr(w.address, input.fabricCidr))
      throw invalidArgument(field, `${w.address} is outside the fabric ${input.fabricCidr}`);
  }
  const checkPort = (field: string, p: PortRange) => {
    const ok =
      p.proto === "icmp" ||
      ((p.proto === "tcp" || p.proto === "udp") &&
        Number.isInteger(p.from) &&
        Number.isInteger(p.to) &&
        p.from >= 1 &&
        p.from <= p.to &&
        p.to <= 65535);
    if (!ok) throw invalidArgument(field, `${JSON.stringify(p)} is not a port range`);
  };
  for (const p of input.policies)
    p.allow.forEach((r, i) =>
      r.ports.forEach((port, j) => checkPort(`${p.name}: allow.${i}.ports.${j}`, port)),
    );
  for (const r of input.implicit)
    r.rule.ports.forEach((port, j) => checkPort(`implicit ${r.origin}: ports.${j}`, port));
  for (const [name, v] of Object.entries(input.counters ?? {}))
    for (const n of [v.packets, v.bytes])
      if (!Number.isSafeInteger(n) || n < 0)
        throw invalidArgument(`counters.${name}`, `${n} is not a counter value`);
}

/** mergeRanges sorts inclusive ranges and merges those that overlap or touch. */
function mergeRanges(ranges: [number, number][]): [number, number][] {
  const sorted = [...ranges].sort((a, b) => a[0] - b[0] || a[1] - b[1]);
  const out: [number, number][] = [];
  for (const r of sorted) {
    const last = out[out.length - 1];
    if (last && r[0] <= last[1] + 1) last[1] = Math.max(last[1], r[1]);
    else out.push([r[0], r[1]]);
  }
  return out;
}

const pairOrder = (a: AddressPair, b: AddressPair) => compareIPv4(a.src, b.src) || compareIPv4(a.dst, b.dst);

/**
 * buildIR computes the IR: for every rule (decision order does not matter here: the table is
 * a union), every source its `from` resolves to and every local workload its `to` resolves
 * to, one entry per port. Pure; inputs must have been checked.
 */
function buildIR(input: PolicyCompileInput): PolicyIR {
  const { mesh } = input;
  const self = mesh.capsules.find((c) => c.name === mesh.self)!;
  const local = mesh.workloads
    .filter((w) => w.capsule === mesh.self)
    .map((w) => ({ name: w.name, address: w.address, counter: counterName(w.name) }))
    .sort((a, b) => compareIPv4(a.address, b.address));
  const localAddrs = new Set(local.map((w) => w.address));
  const ports = { tcp: new Map<string, [number, number][]>(), udp: new Map<string, [number, number][]>() };
  const icmp = new Map<string, AddressPair>();
  const index = new MeshIndex(mesh);
  const visitors = new Map<string, [number, number][]>();
  for (const r of input.implicit) {
    if (!r.visitors) continue;
    for (const dst of index.resolve(r.rule.to).filter((a) => localAddrs.has(a)))
      for (const p of r.rule.ports)
        if (p.proto === "tcp") visitors.set(dst, [...(visitors.get(dst) ?? []), [p.from, p.to]]);
  }
  for (const { rule } of rankedRules(input.policies, input.implicit)) {
    const dsts = index.resolve(rule.to).filter((a) => localAddrs.has(a));
    if (dsts.length === 0) continue;
    const srcs = index.resolve(rule.from);
    for (const dst of dsts)
      for (const src of srcs) {
        if (src === dst) continue;
        const key = `${src} ${dst}`;
        for (const p of rule.ports) {
          if (p.proto === "icmp") icmp.set(key, { src, dst });
          else {
            const m = ports[p.proto];
            const list = m.get(key) ?? [];
            list.push([p.from, p.to]);
            m.set(key, list);
          }
        }
      }
  }
  const entries = (m: Map<string, [number, number][]>): PortEntry[] =>
    [...m.entries()]
      .flatMap(([key, ranges]) => {
        const [src = "", dst = ""] = key.split(" ");
        return mergeRanges(ranges).map(([from, to]) => ({ src, dst, from, to }));
      })
      .sort((a, b) => pairOrder(a, b) || a.from - b.from);
  return {
    self: { name: self.name, address: self.address },
    fabricIface: input.fabricIface,
    fabricCidr: input.fabricCidr,
    tcp: entries(ports.tcp),
    udp: entries(ports.udp),
    icmp: [...icmp.values()].sort(pairOrder),
    visitorsTcp: [...visitors.entries()]
      .sort(([a], [b]) => compareIPv4(a, b))
      .flatMap(([dst, ranges]) => mergeRanges(ranges).map(([from, to]) => ({ dst, from, to }))),
    local,
  };
}

const portText = (e: PortEntry) => (e.from === e.to ? `${e.from}` : `${e.from}-${e.to}`);

/**
 * renderPolicyTable returns the `table inet capsule_policy { ... }` block alone, in the layout
 * `nft list table` prints (up to the wrapping of set elements), from an IR. `counters` seeds
 * the named counters (unset = 0). Pure and deterministic.
 */
export function renderPolicyTable(
  ir: PolicyIR,
  counters: Readonly<Record<string, CounterValue>> = {},
): string {
  const lines = [`table inet ${POLICY_TABLE} {`];
  const counter = (name: string) => {
    const v = counters[name] ?? { packets: 0, bytes: 0 };
    lines.push(`\tcounter ${name} {`, `\t\tpackets ${v.packets} bytes ${v.bytes}`, "\t}", "");
  };
  for (const w of [...ir.local].sort((a, b) => (a.counter < b.counter ? -1 : 1))) counter(w.counter);
  counter(UNKNOWN_COUNTER);
  const set = (name: string, type: string, interval: boolean, elements: string[]) => {
    lines.push(`\tset ${name} {`, `\t\ttype ${type}`);
    if (interval) lines.push("\t\tflags interval");
    if (elements.length) lines.push(`\t\telements = { ${elements.join(", ")} }`);
    lines.push("\t}", "");
  };
  const concat = "ipv4_addr . ipv4_addr . inet_service";
  set(
    "allow_tcp",
    concat,
    true,
    ir.tcp.map((e) => `${e.src} . ${e.dst} . ${portText(e)}`),
  );
  set(
    "allow_udp",
    concat,
    true,
    ir.udp.map((e) => `${e.src} . ${e.dst} . ${portText(e)}`),
  );
  set(
    "allow_icmp",
    "ipv4_addr . ipv4_addr",
    false,
    ir.icmp.map((e) => `${e.src} . ${e.dst}`),
  );
  set(
    "allow_visitors_tcp",
    "ipv4_addr . inet_service",
    true,
    ir.visitorsTcp.map((e) => `${e.dst} . ${e.from === e.to ? `${e.from}` : `${e.from}-${e.to}`}`),
  );
  lines.push("\tmap drop_counters {", "\t\ttype ipv4_addr : counter");
  if (ir.local.length)
    lines.push(`\t\telements = { ${ir.local.map((w) => `${w.address} : "${w.counter}"`).join(", ")} }`);
  lines.push(
    "\t}",
    "",
    "\tchain forward {",
    "\t\ttype filter hook forward priority filter; policy accept;",
    "\t\tmeta nfproto != ipv4 accept",
    `\t\tip daddr != ${ir.fabricCidr} accept`,
    `\t\toifname "${ir.fabricIface}" accept`,
    "\t\tct direction reply accept",
    "\t\tct state related meta l4proto icmp accept",
    "\t\tct status dnat accept",
    "\t\tip saddr . ip daddr . tcp dport @allow_tcp accept",
    `\t\tiifname "${ir.fabricIface}" ip saddr != ${ir.fabricCidr} ip daddr . tcp dport @allow_visitors_tcp accept`,
    "\t\tip saddr . ip daddr . udp dport @allow_udp accept",
    "\t\tmeta l4proto icmp ip saddr . ip daddr @allow_icmp accept",
    "\t\tcounter name ip daddr map @drop_counters drop",
    `\t\tcounter name "${UNKNOWN_COUNTER}" drop`,
    "\t}",
    "}",
  );
  return `${lines.join("\n")}\n`;
}

/**
 * compilePolicy compiles the desired policy state of `mesh.self`. `script` is the complete
 * `nft -f` input that makes table `inet capsule_policy` exactly that state in one transaction
 * (declare the table, a no-op when it exists; delete it; define it whole), so the replace is
 * atomic and works whether or not the table existed. Pure and deterministic. Throws
 * CAPSULE_INVALID_ARGUMENT on a malformed interface name, CIDR or address, a local workload
 * address used twice or outside the fabric, a local workload name that is invalid or listed
 * twice, or a bad port range.
 */
export function compilePolicy(input: PolicyCompileInput): CompiledPolicy {
  checkInput(input);
  const ir = buildIR(input);
  const script = `table inet ${POLICY_TABLE} {\n}\ndelete table inet ${POLICY_TABLE}\n${renderPolicyTable(ir, input.counters)}`;
  return { script, ir, warnings: warnings(input.policies, input.mesh) };
}

/**
 * CompiledPacket is a packet arriving in this capsule's forward path. Unset fields: `oif` is
 * "local" when the destination is a local workload, else "fabric" (the capsule routes the
 * rest of the fabric to its peers); `reply` and `dnat` are false.
 */
export interface CompiledPacket extends PacketTuple {
  /** oif is where routing sends the packet: a local workload's veth, or the fabric interface. */
  oif?: "local" | "fabric";
  /** reply: the packet belongs to the reply direction of a tracked flow. */
  reply?: boolean;
  /** dnat: the flow was DNATed by a hostPort publish. */
  dnat?: boolean;
  /** iif is where the packet arrived: the fabric interface, or anything else (unset). */
  iif?: "fabric" | "other";
}

/** CompiledVerdict is what the table does with a packet: `judged` when it reached the set lookups; `counter` names the drop counter. */
export interface CompiledVerdict {
  allowed: boolean;
  judged: boolean;
  counter?: string;
}

/**
 * decideCompiled answers from the IR the way the table would, for a packet seen by this
 * capsule. Packets that never reach its forward chain pass unjudged: a workload reaching its
 * own address (stays in its namespace), a packet to the capsule's own address (input path) or
 * from it (output path). Pure.
 */
export function decideCompiled(ir: PolicyIR, p: CompiledPacket): CompiledVerdict {
  const pass: CompiledVerdict = { allowed: true, judged: false };
  if (p.src === p.dst) return pass;
  if (!inCidr(p.dst, ir.fabricCidr)) return pass;
  if (p.dst === ir.self.address || p.src === ir.self.address) return pass;
  const local = ir.local.find((w) => w.address === p.dst);
  if ((p.oif ?? (local ? "local" : "fabric")) === "fabric") return pass;
  if (p.reply || p.dnat) return pass;
  if (
    p.proto === "tcp" &&
    p.iif === "fabric" &&
    !inCidr(p.src, ir.fabricCidr) &&
    ir.visitorsTcp.some((e) => e.dst === p.dst && e.from <= p.port && p.port <= e.to)
  )
    return { allowed: true, judged: true };
  const hit =
    p.proto === "icmp"
      ? ir.icmp.some((e) => e.src === p.src && e.dst === p.dst)
      : ir[p.proto].some((e) => e.src === p.src && e.dst === p.dst && e.from <= p.port && p.port <= e.to);
  if (hit) return { allowed: true, judged: true };
  return { allowed: false, judged: true, counter: local ? local.counter : UNKNOWN_COUNTER };
}
