/**
 * The policy model shared by the pure compiler/evaluator (src/fabric/policy/) and the node
 * side that stores, applies and explains policies (src/node/policy/). Types, and the workload name rule.
 *
 * Semantics (the contract: "with no Policy, nothing reaches a workload's fabric IP except from
 * its own capsule's agent"; policies are unions of allow rules, there are no deny rules):
 * - A packet is judged at its DESTINATION capsule only, in the forward path, when its
 *   destination is a fabric address (100.64.0.0/10) other than the capsule's own. Traffic
 *   leaving through the fabric interface (to a peer, or relayed through a hub) is judged where
 *   it arrives.
 * - Only the original direction of a flow is judged, on every packet (not only the first): a
 *   narrowed policy stops an established flow at its next packet. The reply direction of a flow
 *   (ct direction reply) passes.
 * - The capsule itself (its agent, any host process) reaches its local workloads: that traffic
 *   is locally generated (output path) and never judged.
 * - A workload reaching its own fabric address never leaves its network namespace (the address
 *   is local there): always allowed, never judged.
 * - hostPort forwards (DNAT by capsule_nat) are an explicit publish in the manifest: allowed.
 */

/** WORKLOAD_NAME is what a workload may be called: lowercase letters, digits, inner dashes, at most 63. */
export const WORKLOAD_NAME = /^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$/;

/** Proto is a transport a rule may allow. */
export type Proto = "tcp" | "udp" | "icmp";

/** PortRange is a parsed `N/tcp`, `N-M/udp` or `icmp` (icmp: from = to = 0). */
export interface PortRange {
  proto: Proto;
  from: number;
  to: number;
}

/**
 * Selector picks endpoints; exactly one key is set.
 * - workload: the workload of that name, on whichever capsule runs it.
 * - labels: every workload whose labels include all of these (an empty map matches nothing).
 * - capsule: that capsule's own fabric address and every workload running on it.
 * - edge: that edge capsule's own fabric address (where its Caddy proxies from).
 */
export type Selector =
  { workload: string } | { labels: Record<string, string> } | { capsule: string } | { edge: string };

/** Rule is one allow rule: traffic from `from` to `to` on any of `ports`. */
export interface Rule {
  from: Selector;
  to: Selector;
  ports: PortRange[];
}

/** PolicyTest is one `tests` entry: endpoints are workload names. */
export interface PolicyTest {
  from: string;
  to: string;
  port: PortRange;
  expect: "allow" | "deny";
}

/** Policy is a validated `kind: Policy` document. */
export interface Policy {
  name: string;
  allow: Rule[];
  tests: PolicyTest[];
}

/** MeshWorkload is a workload anywhere in the mesh, as the inventory knows it. */
export interface MeshWorkload {
  name: string;
  address: string;
  labels: Record<string, string>;
  /** capsule is the name of the capsule running it. */
  capsule: string;
}

/** MeshCapsule is one capsule of the mesh (this one included). */
export interface MeshCapsule {
  name: string;
  /** address is the capsule's own fabric address. */
  address: string;
  edge: boolean;
}

/** Mesh is everything a capsule knows about the fabric: its own inventory and its peers'. */
export interface Mesh {
  /** self is this capsule's name. */
  self: string;
  capsules: MeshCapsule[];
  workloads: MeshWorkload[];
}

/**
 * Implicit allow rules that are not written in a Policy document, such as those `expose`
 * adds for an edge (edge issue): shown by `policy show` with their origin.
 */
export interface ImplicitRule {
  origin: string;
  rule: Rule;
  /**
   * visitors: the rule also admits internet visitors forwarded by the `from` edge with their
   * own (non-fabric) source address kept, i.e. any source outside the fabric arriving on the
   * fabric interface (`expose --tcp`: the edge DNATs, the visitor's address survives).
   * WireGuard's cryptokey routing accepts such sources only from the one peer whose AllowedIPs
   * hold 0.0.0.0/0: the edge. TCP ports only.
   */
  visitors?: boolean;
}

/** RuleRef names a rule: the policy and its 0-based index in `allow`, or an implicit rule's origin. */
export type RuleRef = { policy: string; index: number } | { origin: string };

/** Decision is the verdict for one packet tuple and the first rule (in policy-name order) that allows it. */
export interface Decision {
  allowed: boolean;
  rule?: RuleRef;
}

/** Warning is a selector that matches nothing in the current mesh (not an error; `policy show` lists it). */
export interface Warning {
  policy: string;
  index: number;
  side: "from" | "to";
  message: string;
}
