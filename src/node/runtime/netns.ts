/**
 * WorkloadNet: each workload's network namespace and its one link to the capsule.
 *
 * The pattern is routed point-to-point veths, one per workload, no bridge (Calico's layout):
 *
 *   capsule netns                                   workload netns cw-<name>
 *   cw<hash> (no IPv4 address, MAC ee:ee:ee:ee:ee:ee) <-veth-> eth0 100.64.7.2/32
 *   route 100.64.7.2/32 dev cw<hash> [src capsule]     route 169.254.1.1 dev eth0 scope link
 *   rp_filter=1 on cw<hash>                            default via 169.254.1.1 dev eth0
 *                                                      neigh 169.254.1.1 lladdr ee:ee:ee:ee:ee:ee permanent
 *
 * Why no bridge: every packet to or from a workload, even between two workloads of one
 * capsule, then crosses the capsule's IP forwarding path, where nftables policy sees it with
 * an input or output interface that names the workload; on a bridge, two workloads could reach
 * each other at layer 2 and around the policy (a container has CAP_NET_RAW by default), unless
 * br_netfilter, a host-global module, were loaded. Each workload keeps its /32: nothing has to
 * be carved out of the fabric pool for a link subnet.
 *
 * Why a link-local gateway with a permanent neighbour entry rather than proxy ARP: the
 * workload's gateway 169.254.1.1 is a fixed name for "the other end of eth0", and the host end
 * has a fixed MAC, so the workload needs no ARP answer at all. Proxy ARP would answer only
 * while the capsule has a route to 169.254.1.1 through another interface (its default route),
 * which a capsule on a fabric-only network does not have. The host end has no IPv4 address,
 * so capsule-originated packets to the workload carry a real capsule address as source (the
 * route's `src` when given, else the kernel's pick), never a link-local one.
 *
 * rp_filter=1 on the host end drops packets whose source is not the workload's own address
 * (anti-spoofing, before any policy). Forwarding between workloads and the fabric needs the
 * capsule's net.ipv4.ip_forward=1, which the fabric sets; this module leaves global sysctls
 * alone.
 *
 * Namespaces are made with `ip netns add`, under the /run of the mount namespace the runner
 * acts in: a capsule's private /run keeps its `cw-web` apart from another capsule's.
 * Host-side state goes through the Netlink seam, everything else through the CommandRunner.
 */
import { createHash } from "node:crypto";
import { CommandError, invalidArgument } from "../../errors.js";
import type { Netlink } from "../host/netlink.js";
import { parseCidr } from "../host/netlink.js";
import type { CommandRunner } from "../host/runner.js";

/** GATEWAY is every workload's default gateway: the host end of its veth, by a permanent neighbour entry. */
export const GATEWAY = "169.254.1.1";

/** HOST_MAC is the MAC of every host-side veth (each is its own link, so they need not differ). */
export const HOST_MAC = "ee:ee:ee:ee:ee:ee";

/** NETNS_PREFIX starts the name of every workload network namespace. */
export const NETNS_PREFIX = "cw-";

/** WORKLOAD_IFACE is the workload's interface name inside its namespace. */
export const WORKLOAD_IFACE = "eth0";

const NAME = /^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$/;

/** WorkloadNetNames are the names one workload's plumbing uses (see {@link workloadNetNames}). */
export interface WorkloadNetNames {
  /** netns is the namespace name, `cw-<workload>`. */
  netns: string;
  /** netnsPath is the namespace file a container joins, `/run/netns/cw-<workload>`. */
  netnsPath: string;
  /** hostIface is the capsule-side veth, `cw` + 11 hex digits of sha256(workload) (interface names have 15 characters at most). */
  hostIface: string;
}

/** workloadNetNames derives a workload's names (pure); throws CAPSULE_INVALID_ARGUMENT for a name that is not a DNS label. */
export function workloadNetNames(workload: string): WorkloadNetNames {
  if (!NAME.test(workload)) {
    throw invalidArgument(
      "workload",
      `"${workload}" is not a workload name`,
      "use a DNS label: a-z, 0-9, '-'",
    );
  }
  const netns = `${NETNS_PREFIX}${workload}`;
  return {
    netns,
    netnsPath: `/run/netns/${netns}`,
    hostIface: `cw${createHash("sha256").update(workload).digest("hex").slice(0, 11)}`,
  };
}

/** vethAddArgv creates the pair: host end named and MAC'd in the capsule, `eth0` straight into the namespace (pure). */
export function vethAddArgv(n: WorkloadNetNames): string[] {
  return [
    "ip",
    "link",
    "add",
    "dev",
    n.hostIface,
    "address",
    HOST_MAC,
    "type",
    "veth",
    "peer",
    "name",
    WORKLOAD_IFACE,
    "netns",
    n.netns,
  ];
}

interface AddrJson {
  ifname?: string;
  flags?: string[];
  addr_info?: { family?: string; local?: string; prefixlen?: number }[];
}
interface RouteJson {
  dst?: string;
  gateway?: string;
  dev?: string;
  scope?: string;
}
interface NeighJson {
  dst?: string;
  lladdr?: string;
  state?: string[];
}

/**
 * WorkloadSideState is what the workload namespace looks like: the JSON of
 * `ip -json addr show`, `ip -json -4 route show table main` and `ip -json -4 neigh show dev eth0`
 * run in it.
 */
export interface WorkloadSideState {
  addrs: string;
  routes: string;
  neigh: string;
}

const parse = <T>(s: string): T[] => (s.trim() ? (JSON.parse(s) as T[]) : []);

/**
 * workloadSideBatch returns the `ip -batch` lines that take the workload namespace from
 * `state` to the layout in the module comment for `address` (pure); none when it is there.
 * Ordered so each line's prerequisites come first (links up, address, on-link route to the
 * gateway, default route, neighbour entry); stray IPv4 addresses on eth0 are removed.
 */
export function workloadSideBatch(state: WorkloadSideState, address: string): string[] {
  const want = `${parseCidr(address, "address").ip}/32`;
  const links = parse<AddrJson>(state.addrs);
  const lo = links.find((l) => l.ifname === "lo");
  const eth = links.find((l) => l.ifname === WORKLOAD_IFACE);
  const have = (eth?.addr_info ?? [])
    .filter((a) => a.family === "inet" && a.local)
    .map((a) => `${a.local}/${a.prefixlen}`);
  const routes = parse<RouteJson>(state.routes);
  const neigh = parse<NeighJson>(state.neigh);
  const out: string[] = [];
  if (!lo?.flags?.includes("UP")) out.push("link set dev lo up");
  if (!eth?.flags?.includes("UP")) out.push(`link set dev ${WORKLOAD_IFACE} up`);
  for (const a of have) if (a !== want) out.push(`addr del ${a} dev ${WORKLOAD_IFACE}`);
  if (!have.includes(want)) out.push(`addr add ${want} dev ${WORKLOAD_IFACE}`);
  if (!routes.some((r) => r.dst === GATEWAY && r.dev === WORKLOAD_IFACE && !r.gateway && r.scope === "link"))
    out.push(`route replace ${GATEWAY}/32 dev ${WORKLOAD_IFACE} scope link`);
  if (!routes.some((r) => r.dst === "default" && r.gateway === GATEWAY && r.dev === WORKLOAD_IFACE))
    out.push(`route replace default via ${GATEWAY} dev ${WORKLOAD_IFACE}`);
  if (
    !neigh.some(
      (n) => n.dst === GATEWAY && n.lladdr?.toLowerCase() === HOST_MAC && n.state?.includes("PERMANENT"),
    )
  )
    out.push(`neigh replace ${GATEWAY} lladdr ${HOST_MAC} dev ${WORKLOAD_IFACE} nud permanent`);
  return out;
}

/** parseNetnsList reads `ip netns list` ("cw-web (id: 3)" lines) into names (pure). */
export function parseNetnsList(text: string): string[] {
  return text
    .split("\n")
    .map((l) => l.trim().split(/\s+/)[0] ?? "")
    .filter(Boolean);
}

/** WorkloadNetSpec: `workload` and `address` are required; `hostSrc` is optional. */
export interface WorkloadNetSpec {
  workload: string;
  /** address is the workload's fabric address ("100.64.7.2" or "100.64.7.2/32"). */
  address: string;
  /**
   * hostSrc is the source address the capsule uses towards the workload (its own fabric
   * address; it must be local to the capsule); unset = the kernel's choice.
   */
  hostSrc?: string;
}

/** WorkloadNetResult is a workload's plumbing after {@link WorkloadNet.ensure}: its names and whether anything changed. */
export interface WorkloadNetResult extends WorkloadNetNames {
  changed: boolean;
}

/** WorkloadNetOptions: both required. `netlink` acts on the capsule's namespace; `runner` runs `ip` there. */
export interface WorkloadNetOptions {
  runner: CommandRunner;
  netlink: Netlink;
}

/** WorkloadNet makes, checks and removes workloads' network plumbing (see the module comment). */
export class WorkloadNet {
  private readonly runner: CommandRunner;
  private readonly nl: Netlink;

  constructor(opts: WorkloadNetOptions) {
    this.runner = opts.runner;
    this.nl = opts.netlink;
  }

  /** list returns the workloads that have a namespace (from `ip netns list`), sorted. Read-only. */
  async list(): Promise<string[]> {
    const r = await this.runner.run(["ip", "netns", "list"]);
    return parseNetnsList(r.stdout)
      .filter((n) => n.startsWith(NETNS_PREFIX))
      .map((n) => n.slice(NETNS_PREFIX.length))
      .sort();
  }

  /** exists reports whether `workload` has a network namespace. Read-only. */
  async exists(workload: string): Promise<boolean> {
    const { netns } = workloadNetNames(workload);
    const r = await this.runner.run(["ip", "netns", "list"]);
    return parseNetnsList(r.stdout).includes(netns);
  }

  private async eth0Exists(netns: string): Promise<boolean> {
    const argv = ["ip", "-n", netns, "-json", "link", "show", "dev", WORKLOAD_IFACE];
    const r = await this.runner.run(argv, { allowFailure: true });
    if (r.exitCode === 0) return true;
    if (/does not exist|Cannot find device/i.test(r.stderr)) return false;
    throw new CommandError(argv, r.exitCode, r.stdout, r.stderr);
  }

  /**
   * ensure makes `spec.workload`'s namespace, veth pair, addresses, routes and neighbour entry
   * exactly as the module comment draws them. Idempotent: a complete setup is only read (four
   * `ip` reads and the Netlink checks) and `changed` is false; a partial one (a capsuled killed
   * halfway, a pair whose namespace was deleted under a running container) is completed or
   * rebuilt. The workload's address is its fabric /32. Throws CAPSULE_INVALID_ARGUMENT for a bad
   * name or address.
   */
  async ensure(spec: WorkloadNetSpec): Promise<WorkloadNetResult> {
    const n = workloadNetNames(spec.workload);
    const addr = parseCidr(spec.address, "address");
    if (addr.prefix !== 32) throw invalidArgument("address", `"${spec.address}" is not a single address`);
    let changed = false;

    if (!(await this.exists(spec.workload))) {
      await this.runner.run(["ip", "netns", "add", n.netns]);
      changed = true;
    }
    const host = await this.nl.linkExists(n.hostIface);
    const eth0 = await this.eth0Exists(n.netns);
    if (host !== eth0 || !host) {
      // Half a pair is a stale one (its other end went with an old namespace): start over.
      if (host) await this.runner.run(["ip", "link", "del", "dev", n.hostIface]);
      if (eth0) await this.runner.run(["ip", "-n", n.netns, "link", "del", "dev", WORKLOAD_IFACE]);
      await this.runner.run(vethAddArgv(n));
      changed = true;
    }

    changed = (await this.nl.setSysctl(`net.ipv4.conf.${n.hostIface}.rp_filter`, "1")) || changed;
    changed = (await this.nl.setLinkUp(n.hostIface)) || changed;
    const src = spec.hostSrc === undefined ? {} : { src: spec.hostSrc };
    changed = (await this.nl.ensureRoute(`${addr.ip}/32`, n.hostIface, src)) || changed;

    const ns = (...a: string[]) => this.runner.run(["ip", "-n", n.netns, "-json", ...a]);
    const state: WorkloadSideState = {
      addrs: (await ns("addr", "show")).stdout,
      routes: (await ns("-4", "route", "show", "table", "main")).stdout,
      neigh: (await ns("-4", "neigh", "show", "dev", WORKLOAD_IFACE)).stdout,
    };
    const batch = workloadSideBatch(state, addr.ip);
    if (batch.length) {
      await this.runner.run(["ip", "-n", n.netns, "-batch", "-"], { input: `${batch.join("\n")}\n` });
      changed = true;
    }
    return { ...n, changed };
  }

  /**
   * teardown removes `workload`'s veth pair (its host route goes with it) and namespace.
   * Idempotent: false when there was nothing. Remove the workload's container first: a
   * namespace a process still lives in outlives its name, though its link is gone.
   */
  async teardown(workload: string): Promise<boolean> {
    const n = workloadNetNames(workload);
    let changed = false;
    if (await this.nl.linkExists(n.hostIface)) {
      await this.runner.run(["ip", "link", "del", "dev", n.hostIface]);
      changed = true;
    }
    if (await this.exists(workload)) {
      await this.runner.run(["ip", "netns", "del", n.netns]);
      changed = true;
    }
    return changed;
  }
}
