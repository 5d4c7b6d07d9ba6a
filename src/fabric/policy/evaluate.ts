/**
 * The direct evaluator: the policy semantics of model.ts written as plainly as possible, for
 * `policy explain`, `policy test`, the `tests` of a Policy, and as the reference the compiled
 * nftables form (compile.ts) is checked against. Everything here is pure.
 *
 * A packet `{src, dst, proto, port}` is decided across the whole mesh: it is judged by the
 * capsule that runs the destination workload (its forward chain), unless it never reaches a
 * forward chain (see {@link VerdictReason}). There, the first rule that allows it wins: rules of
 * the policies in name order (each in its `allow` order), then the implicit rules in the order
 * given. No rule: denied.
 */
import { invalidArgument } from "../../errors.js";
import { FABRIC_CIDR, ipToInt } from "../ipam.js";
import type {
  Decision,
  ImplicitRule,
  Mesh,
  MeshWorkload,
  Policy,
  PolicyTest,
  PortRange,
  Proto,
  Rule,
  RuleRef,
  Selector,
  Warning,
} from "./model.js";

/** PacketTuple is one packet as policy sees it; `port` is the destination port (ignored for icmp). */
export interface PacketTuple {
  src: string;
  dst: string;
  proto: Proto;
  port: number;
}

/**
 * VerdictReason says how a packet was decided:
 * - "rule": a rule allows it (judged by the destination's capsule);
 * - "no-rule": nothing allows it (judged; also a fabric destination the inventory does not know);
 * - "outside-fabric": the destination is not a fabric address, so not ours to judge;
 * - "same-address": a workload reaching its own address never leaves its network namespace;
 * - "capsule-address": the destination is a capsule's own address (its input path, not policed);
 * - "own-capsule": the source is the address of the capsule that runs the destination (its
 *   agent or a host process: locally generated, never judged).
 */
export type VerdictReason =
  "rule" | "no-rule" | "outside-fabric" | "same-address" | "capsule-address" | "own-capsule";

/** Verdict is a {@link Decision} with how it was reached. `rule` is set exactly when reason is "rule". */
export interface Verdict extends Decision {
  reason: VerdictReason;
  /** judge is the capsule whose forward chain judges the packet; unset when none does. */
  judge?: string;
}

/** TestResult is the outcome of one `tests` entry of a policy. */
export interface TestResult {
  policy: string;
  /** index is the test's 0-based position in the policy's `tests`. */
  index: number;
  test: PolicyTest;
  passed: boolean;
  /** verdict is the deciding verdict (the first pair that disagreed, else the last); unset when an endpoint is unknown. */
  verdict?: Verdict;
  /** message is one line for `policy test` and apply errors. */
  message: string;
}

const IPV4 = /^(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(\.(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)){3}$/;

/** isIPv4 reports whether `s` is a dotted-quad IPv4 address (no leading zeros). Pure. */
export function isIPv4(s: string): boolean {
  return IPV4.test(s);
}

/** inCidr reports whether IPv4 `ip` lies in `cidr` ("100.64.0.0/10"). Pure; both must be valid. */
export function inCidr(ip: string, cidr: string): boolean {
  const [net = "", len = "32"] = cidr.split("/");
  const bits = Number(len);
  const mask = bits === 0 ? 0 : (0xffffffff << (32 - bits)) >>> 0;
  return (ipToInt(ip) & mask) >>> 0 === (ipToInt(net) & mask) >>> 0;
}

const ipNums = new Map<string, number>();
/** ipNum is ipToInt memoized (compilers sort tens of thousands of pairs of the same few addresses). */
function ipNum(ip: string): number {
  let n = ipNums.get(ip);
  if (n === undefined) {
    n = ipToInt(ip);
    if (ipNums.size > 100_000) ipNums.clear();
    ipNums.set(ip, n);
  }
  return n;
}

/** compareIPv4 orders dotted-quad addresses numerically. */
export function compareIPv4(a: string, b: string): number {
  return ipNum(a) - ipNum(b);
}

/** sortedPolicies returns the policies in decision order: by name (code-point order), stable. */
export function sortedPolicies(policies: readonly Policy[]): Policy[] {
  return [...policies].sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
}

/** RankedRule is a rule with its reference, in decision order. */
export interface RankedRule {
  ref: RuleRef;
  rule: Rule;
}

/** rankedRules lists every rule in decision order: policies by name, each in `allow` order, then implicit rules as given. Pure. */
export function rankedRules(policies: readonly Policy[], implicit: readonly ImplicitRule[]): RankedRule[] {
  const out: RankedRule[] = [];
  for (const p of sortedPolicies(policies))
    p.allow.forEach((rule, index) => out.push({ ref: { policy: p.name, index }, rule }));
  for (const r of implicit) out.push({ ref: { origin: r.origin }, rule: r.rule });
  return out;
}

const labelsMatch = (want: Record<string, string>, have: Record<string, string>) => {
  const keys = Object.keys(want);
  return keys.length > 0 && keys.every((k) => Object.hasOwn(have, k) && have[k] === want[k]);
};

/**
 * resolveSelector returns the fabric addresses `sel` picks in `mesh`, sorted numerically,
 * without duplicates:
 * - workload: every workload of that name (names are unique per capsule, not across the mesh);
 * - labels: every workload whose labels include all of the given ones (an empty map: none);
 * - capsule: that capsule's own address and every workload running on it;
 * - edge: that capsule's own address, if it is an edge (a non-edge capsule: none).
 * Pure.
 */
export function resolveSelector(sel: Selector, mesh: Mesh): string[] {
  const out = new Set<string>();
  if ("workload" in sel) {
    for (const w of mesh.workloads) if (w.name === sel.workload) out.add(w.address);
  } else if ("labels" in sel) {
    for (const w of mesh.workloads) if (labelsMatch(sel.labels, w.labels)) out.add(w.address);
  } else if ("capsule" in sel) {
    for (const c of mesh.capsules) if (c.name === sel.capsule) out.add(c.address);
    for (const w of mesh.workloads) if (w.capsule === sel.capsule) out.add(w.address);
  } else {
    for (const c of mesh.capsules) if (c.name === sel.edge && c.edge) out.add(c.address);
  }
  return [...out].sort(compareIPv4);
}

/** portMatches reports whether any of `ports` allows `proto`/`port` (icmp: any ICMP). Pure. */
export function portMatches(ports: readonly PortRange[], proto: Proto, port: number): boolean {
  return ports.some((p) => p.proto === proto && (proto === "icmp" || (p.from <= port && port <= p.to)));
}

/**
 * MeshIndex resolves selectors against one mesh, indexed by workload and capsule name and
 * cached per selector (by {@link selectorKey}), so resolving the same selectors of thousands
 * of rules costs a map lookup each. Same answers as {@link resolveSelector}.
 */
export class MeshIndex {
  private readonly cache = new Map<string, { list: string[]; set: Set<string> }>();
  private readonly byName = new Map<string, MeshWorkload[]>();
  private readonly byCapsule = new Map<string, MeshWorkload[]>();
  constructor(private readonly mesh: Mesh) {
    for (const w of mesh.workloads) {
      this.byName.set(w.name, [...(this.byName.get(w.name) ?? []), w]);
      const c = this.byCapsule.get(w.capsule);
      if (c) c.push(w);
      else this.byCapsule.set(w.capsule, [w]);
    }
  }
  private entry(sel: Selector): { list: string[]; set: Set<string> } {
    const key = selectorKey(sel);
    let e = this.cache.get(key);
    if (!e) {
      let list: string[];
      if ("workload" in sel) {
        list = [...new Set((this.byName.get(sel.workload) ?? []).map((w) => w.address))].sort(compareIPv4);
      } else if ("capsule" in sel) {
        const out = new Set<string>();
        for (const c of this.mesh.capsules) if (c.name === sel.capsule) out.add(c.address);
        for (const w of this.byCapsule.get(sel.capsule) ?? []) out.add(w.address);
        list = [...out].sort(compareIPv4);
      } else list = resolveSelector(sel, this.mesh);
      e = { list, set: new Set(list) };
      this.cache.set(key, e);
    }
    return e;
  }
  /** resolve is {@link resolveSelector} (sorted addresses); callers must not modify the array. */
  resolve(sel: Selector): readonly string[] {
    return this.entry(sel).list;
  }
  /** has reports whether `sel` picks `address`. */
  has(sel: Selector, address: string): boolean {
    return this.entry(sel).set.has(address);
  }
}

/** selectorKey is a canonical text of a selector (labels sorted), usable as a map key. Pure. */
export function selectorKey(sel: Selector): string {
  if ("labels" in sel)
    return JSON.stringify({ labels: Object.fromEntries(Object.entries(sel.labels).sort()) });
  return JSON.stringify(sel);
}

function decideWith(
  rules: readonly RankedRule[],
  resolver: MeshIndex,
  mesh: Mesh,
  t: PacketTuple,
  fabricCidr: string,
): Verdict {
  if (!inCidr(t.dst, fabricCidr)) return { allowed: true, reason: "outside-fabric" };
  if (t.src === t.dst) return { allowed: true, reason: "same-address" };
  if (mesh.capsules.some((c) => c.address === t.dst)) return { allowed: true, reason: "capsule-address" };
  const dst = mesh.workloads.find((w) => w.address === t.dst);
  if (!dst) return { allowed: false, reason: "no-rule" };
  const judge = dst.capsule;
  if (mesh.capsules.some((c) => c.name === judge && c.address === t.src))
    return { allowed: true, reason: "own-capsule" };
  for (const r of rules) {
    if (!portMatches(r.rule.ports, t.proto, t.port)) continue;
    if (resolver.has(r.rule.to, t.dst) && resolver.has(r.rule.from, t.src))
      return { allowed: true, reason: "rule", rule: r.ref, judge };
  }
  return { allowed: false, reason: "no-rule", judge };
}

/**
 * decide returns the verdict for one packet across the mesh (see the module comment): the
 * first allowing rule in policy-name order, then the implicit rules; denied when none allows
 * it, including a fabric destination the inventory does not know. The destination need not
 * run on `mesh.self`. Pure.
 */
export function decide(
  policies: readonly Policy[],
  implicit: readonly ImplicitRule[],
  mesh: Mesh,
  tuple: PacketTuple,
  fabricCidr: string = FABRIC_CIDR,
): Verdict {
  return decideWith(rankedRules(policies, implicit), new MeshIndex(mesh), mesh, tuple, fabricCidr);
}

/** formatPort prints a port as written in a policy: `5432/tcp`, `8000-8100/udp`, `icmp`. Pure. */
export function formatPort(p: PortRange): string {
  if (p.proto === "icmp") return "icmp";
  return p.from === p.to ? `${p.from}/${p.proto}` : `${p.from}-${p.to}/${p.proto}`;
}

/** formatSelector prints a selector in YAML flow style: `{workload: web}`, `{labels: {app: db}}` (keys sorted). Pure. */
export function formatSelector(sel: Selector): string {
  if ("workload" in sel) return `{workload: ${sel.workload}}`;
  if ("capsule" in sel) return `{capsule: ${sel.capsule}}`;
  if ("edge" in sel) return `{edge: ${sel.edge}}`;
  const labels = Object.entries(sel.labels)
    .sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))
    .map(([k, v]) => `${k}: ${v}`)
    .join(", ");
  return `{labels: {${labels}}}`;
}

/** formatRule prints a rule: `from {workload: web} to {labels: {app: db}} 5432/tcp, icmp`. Pure. */
export function formatRule(rule: Rule): string {
  return `from ${formatSelector(rule.from)} to ${formatSelector(rule.to)} ${rule.ports.map(formatPort).join(", ")}`;
}

/** formatRuleRef names a rule: `policy web-db rule 1` (1-based) or `implicit rule (ORIGIN)`. Pure. */
export function formatRuleRef(ref: RuleRef): string {
  return "policy" in ref ? `policy ${ref.policy} rule ${ref.index + 1}` : `implicit rule (${ref.origin})`;
}

/** findRule returns the rule a reference names, if it exists. Pure. */
export function findRule(
  ref: RuleRef,
  policies: readonly Policy[],
  implicit: readonly ImplicitRule[],
): Rule | undefined {
  if ("policy" in ref) return policies.find((p) => p.name === ref.policy)?.allow[ref.index];
  return implicit.find((r) => r.origin === ref.origin)?.rule;
}

/**
 * explainVerdict renders a verdict as one line: "allowed by policy web-db rule 1: from
 * {workload: web} to {labels: {app: db}} 5432/tcp", "denied: no rule", or "allowed: not
 * judged (...)" saying why. Pure.
 */
export function explainVerdict(
  v: Verdict,
  tuple: PacketTuple,
  policies: readonly Policy[],
  implicit: readonly ImplicitRule[],
  mesh: Mesh,
): string {
  switch (v.reason) {
    case "rule": {
      const ref = v.rule!;
      const rule = findRule(ref, policies, implicit);
      return `allowed by ${formatRuleRef(ref)}${rule ? `: ${formatRule(rule)}` : ""}`;
    }
    case "no-rule":
      return v.judge === undefined
        ? `denied: no rule (${tuple.dst} is not a workload in the mesh inventory)`
        : "denied: no rule";
    case "outside-fabric":
      return `allowed: not judged (${tuple.dst} is not a fabric address)`;
    case "same-address":
      return "allowed: not judged (a workload reaching its own address never leaves its namespace)";
    case "capsule-address": {
      const c = mesh.capsules.find((x) => x.address === tuple.dst);
      return `allowed: not judged (${tuple.dst} is capsule ${c?.name ?? "?"}'s own address)`;
    }
    case "own-capsule": {
      const c = mesh.capsules.find((x) => x.address === tuple.src);
      return `allowed: not judged (capsule ${c?.name ?? "?"} reaches its own workloads)`;
    }
  }
}

/** explain decides one packet (see {@link decide}) and renders the verdict (see {@link explainVerdict}). Pure. */
export function explain(
  policies: readonly Policy[],
  implicit: readonly ImplicitRule[],
  mesh: Mesh,
  tuple: PacketTuple,
  fabricCidr: string = FABRIC_CIDR,
): string {
  return explainVerdict(decide(policies, implicit, mesh, tuple, fabricCidr), tuple, policies, implicit, mesh);
}

function emptyReason(sel: Selector, mesh: Mesh): string {
  if ("workload" in sel) return `no workload named ${sel.workload} in the mesh`;
  if ("labels" in sel)
    return Object.keys(sel.labels).length === 0
      ? "an empty labels selector matches nothing"
      : `no workload has labels ${formatSelector(sel).slice("{labels: ".length, -1)}`;
  const name = "capsule" in sel ? sel.capsule : sel.edge;
  const c = mesh.capsules.find((x) => x.name === name);
  if (!c) return `no capsule named ${name} in the mesh`;
  return `capsule ${name} is not an edge`;
}

/**
 * warnings lists the selectors that match nothing in `mesh` (policies in name order, rules in
 * order, `from` before `to`). A `to` matching only capsule addresses matches nothing either:
 * a capsule's own address is never judged, so such a rule allows nothing. Not errors: a
 * policy may name workloads before they exist. Pure.
 */
export function warnings(policies: readonly Policy[], mesh: Mesh): Warning[] {
  const workloadAddrs = new Set(mesh.workloads.map((w) => w.address));
  const meshIndex = new MeshIndex(mesh);
  const out: Warning[] = [];
  for (const p of sortedPolicies(policies)) {
    p.allow.forEach((rule, index) => {
      for (const side of ["from", "to"] as const) {
        const sel = rule[side];
        const addrs = meshIndex.resolve(sel);
        let why: string | undefined;
        if (addrs.length === 0) why = emptyReason(sel, mesh);
        else if (side === "to" && !addrs.some((a) => workloadAddrs.has(a)))
          why =
            "edge" in sel
              ? `edge ${sel.edge}'s own address is never judged; as a destination this selects no workload`
              : `capsule ${"capsule" in sel ? sel.capsule : "?"} runs no workload (its own address is never judged)`;
        if (why)
          out.push({
            policy: p.name,
            index,
            side,
            message: `${formatSelector(sel)} matches nothing: ${why}`,
          });
      }
    });
  }
  return out;
}

/**
 * runTests checks the `tests` of every policy (in name order) against all `policies` and
 * `implicit` rules together. A test's endpoints are workload names resolved through `mesh`;
 * an unknown name fails that test ("workload db is not in the mesh inventory"). A name that
 * several capsules run is checked for every pair: the test passes when all agree with
 * `expect`. Pure.
 */
export function runTests(
  policies: readonly Policy[],
  implicit: readonly ImplicitRule[],
  mesh: Mesh,
  fabricCidr: string = FABRIC_CIDR,
): TestResult[] {
  const rules = rankedRules(policies, implicit);
  const resolver = new MeshIndex(mesh);
  const out: TestResult[] = [];
  for (const p of sortedPolicies(policies)) {
    p.tests.forEach((test, index) => {
      const head = `${test.from} -> ${test.to} ${formatPort(test.port)}`;
      const srcs = mesh.workloads.filter((w) => w.name === test.from).map((w) => w.address);
      const dsts = mesh.workloads.filter((w) => w.name === test.to).map((w) => w.address);
      const missing = srcs.length === 0 ? test.from : dsts.length === 0 ? test.to : undefined;
      if (missing !== undefined) {
        out.push({
          policy: p.name,
          index,
          test,
          passed: false,
          message: `${head}: workload ${missing} is not in the mesh inventory`,
        });
        return;
      }
      let verdict: Verdict | undefined;
      let tuple: PacketTuple | undefined;
      let passed = true;
      for (const src of srcs) {
        for (const dst of dsts) {
          tuple = { src, dst, proto: test.port.proto, port: test.port.from };
          verdict = decideWith(rules, resolver, mesh, tuple, fabricCidr);
          if (verdict.allowed !== (test.expect === "allow")) passed = false;
          if (!passed) break;
        }
        if (!passed) break;
      }
      const said = explainVerdict(verdict!, tuple!, policies, implicit, mesh);
      out.push({
        policy: p.name,
        index,
        test,
        passed,
        verdict: verdict!,
        message: passed
          ? `${head}: ${test.expect} (${said})`
          : `${head}: expected ${test.expect}, got ${said}${srcs.length * dsts.length > 1 ? ` for ${tuple!.src} -> ${tuple!.dst}` : ""}`,
      });
    });
  }
  return out;
}

/**
 * endpointAddress turns an explain endpoint into an address: an IPv4 address as is, else a
 * workload name, else a capsule name. Pure. Throws CAPSULE_INVALID_ARGUMENT naming `field` for
 * an unknown name or a workload name that several capsules run.
 */
export function endpointAddress(mesh: Mesh, text: string, field = "endpoint"): string {
  if (isIPv4(text)) return text;
  const ws = mesh.workloads.filter((w) => w.name === text);
  if (ws.length === 1) return ws[0]!.address;
  if (ws.length > 1)
    throw invalidArgument(
      field,
      `workload ${text} runs on ${ws.map((w) => w.capsule).join(", ")}`,
      "give its fabric address instead",
    );
  const c = mesh.capsules.find((x) => x.name === text);
  if (c) return c.address;
  throw invalidArgument(field, `${text} is not a workload, capsule or IPv4 address in the mesh`);
}
