/**
 * The network applier: observe what exists in the lab's namespaces, diff it against a
 * {@link LabPlan} with the pure {@link reconcileNetwork}, run the difference. Applying the same
 * plan twice runs no mutating command the second time. Only objects the plan names are touched:
 * links, addresses, routes or sysctls a capsuled adds inside its namespace are left alone.
 */
import type { CommandRunner } from "../src/node/host/runner.js";
import type { LabPlan, NetNode } from "./plan.js";

/** LabCommand is one command line, with optional stdin. */
export interface LabCommand {
  argv: string[];
  input?: string;
}

/** LinkState is an observed interface. */
export interface LinkState {
  up: boolean;
  master: string | undefined;
  /** addresses are the interface's IPv4 CIDRs. */
  addresses: string[];
}

/** NsState is what the lab observed inside one existing namespace. */
export interface NsState {
  links: Record<string, LinkState>;
  /** routes maps a destination ("default") to its gateway ("" when none). */
  routes: Record<string, string>;
  sysctls: Record<string, string>;
  /** nftHash is the plan hash carried by the lab table's comment, undefined when the table is absent. */
  nftHash: string | undefined;
}

/** ObservedNetwork maps each existing lab namespace to its state. Absent namespaces are absent keys. */
export type ObservedNetwork = Record<string, NsState>;

/** parseNetnsList parses `ip -j netns list` (empty output means none). */
export function parseNetnsList(stdout: string): string[] {
  const text = stdout.trim();
  if (!text) return [];
  return (JSON.parse(text) as { name: string }[]).map((e) => e.name);
}

/** parseLinks parses `ip -j addr show` into links with their IPv4 addresses. */
export function parseLinks(stdout: string): Record<string, LinkState> {
  const text = stdout.trim();
  const out: Record<string, LinkState> = {};
  if (!text) return out;
  const rows = JSON.parse(text) as {
    ifname: string;
    flags?: string[];
    master?: string;
    addr_info?: { family: string; local: string; prefixlen: number }[];
  }[];
  for (const r of rows) {
    out[r.ifname] = {
      up: (r.flags ?? []).includes("UP"),
      master: r.master,
      addresses: (r.addr_info ?? [])
        .filter((a) => a.family === "inet")
        .map((a) => `${a.local}/${a.prefixlen}`),
    };
  }
  return out;
}

/** parseRoutes parses `ip -j route show` into destination → gateway. */
export function parseRoutes(stdout: string): Record<string, string> {
  const text = stdout.trim();
  const out: Record<string, string> = {};
  if (!text) return out;
  for (const r of JSON.parse(text) as { dst: string; gateway?: string }[]) out[r.dst] = r.gateway ?? "";
  return out;
}

/** parseNftHash extracts the plan hash from `nft list table` output (`comment "lab:<hash>"`). */
export function parseNftHash(stdout: string): string | undefined {
  return /comment "lab:([0-9a-f]+)"/.exec(stdout)?.[1];
}

function ownedLinks(plan: LabPlan, n: NetNode): string[] {
  const names = new Set<string>(n.bridges);
  for (const v of plan.veths) {
    if (v.a.ns === n.ns) names.add(v.a.ifname);
    if (v.b.ns === n.ns) names.add(v.b.ifname);
  }
  return [...names];
}

/** observeNetwork reads the state of every lab namespace that exists. Read-only. */
export async function observeNetwork(runner: CommandRunner, plan: LabPlan): Promise<ObservedNetwork> {
  const existing = new Set(parseNetnsList((await runner.run(["ip", "-j", "netns", "list"])).stdout));
  const observed: ObservedNetwork = {};
  await Promise.all(
    plan.nodes
      .filter((n) => existing.has(n.ns))
      .map(async (n) => {
        const keys = Object.keys(n.sysctls);
        const [links, routes, sysctls, nft] = await Promise.all([
          runner.run(["ip", "-n", n.ns, "-j", "addr", "show"]),
          runner.run(["ip", "-n", n.ns, "-j", "route", "show"]),
          keys.length
            ? runner.run(["ip", "netns", "exec", n.ns, "sysctl", "-n", ...keys], { allowFailure: true })
            : Promise.resolve(undefined),
          n.ruleset
            ? runner.run(
                ["ip", "netns", "exec", n.ns, "nft", "list", "table", n.ruleset.family, n.ruleset.table],
                {
                  allowFailure: true,
                },
              )
            : Promise.resolve(undefined),
        ]);
        const values = sysctls?.exitCode === 0 ? sysctls.stdout.trim().split("\n") : [];
        observed[n.ns] = {
          links: parseLinks(links.stdout),
          routes: parseRoutes(routes.stdout),
          sysctls: Object.fromEntries(keys.map((k, i) => [k, values[i]?.trim() ?? ""])),
          nftHash: nft?.exitCode === 0 ? parseNftHash(nft.stdout) : undefined,
        };
      }),
  );
  return observed;
}

const EMPTY: NsState = { links: {}, routes: {}, sysctls: {}, nftHash: undefined };

/**
 * reconcileNetwork returns the commands that take `observed` to `plan`, in dependency order
 * (namespaces, sysctls, bridges, veths, bridge ports, addresses, link up, routes, nftables).
 * Pure. An empty list means the network already matches. Stale IPv4 addresses on lab-owned
 * interfaces are removed; interfaces the lab does not own are never touched.
 */
export function reconcileNetwork(plan: LabPlan, observed: ObservedNetwork): LabCommand[] {
  const cmds: LabCommand[] = [];
  const st = (ns: string): NsState => observed[ns] ?? EMPTY;
  const has = (ns: string, ifname: string) => st(ns).links[ifname] !== undefined;

  for (const n of plan.nodes) if (!observed[n.ns]) cmds.push({ argv: ["ip", "netns", "add", n.ns] });
  for (const n of plan.nodes) {
    const s = st(n.ns);
    if (!s.links["lo"]?.up) cmds.push({ argv: ["ip", "-n", n.ns, "link", "set", "lo", "up"] });
    const diff = Object.entries(n.sysctls).filter(([k, v]) => s.sysctls[k] !== v);
    // Set before links exist so `default.*` values apply to the interfaces made next.
    if (diff.length) {
      cmds.push({
        argv: ["ip", "netns", "exec", n.ns, "sysctl", "-q", "-w", ...diff.map(([k, v]) => `${k}=${v}`)],
      });
    }
  }
  for (const n of plan.nodes) {
    for (const br of n.bridges) {
      if (!has(n.ns, br)) cmds.push({ argv: ["ip", "-n", n.ns, "link", "add", br, "type", "bridge"] });
    }
  }
  for (const v of plan.veths) {
    const a = has(v.a.ns, v.a.ifname);
    const b = has(v.b.ns, v.b.ifname);
    if (a && b) continue;
    // A lone end cannot be re-paired: delete it and make the pair afresh.
    if (a) cmds.push({ argv: ["ip", "-n", v.a.ns, "link", "del", v.a.ifname] });
    if (b) cmds.push({ argv: ["ip", "-n", v.b.ns, "link", "del", v.b.ifname] });
    cmds.push({
      argv: [
        "ip",
        "-n",
        v.a.ns,
        "link",
        "add",
        v.a.ifname,
        "type",
        "veth",
        "peer",
        "name",
        v.b.ifname,
        "netns",
        v.b.ns,
      ],
    });
  }
  for (const v of plan.veths) {
    if (!v.master) continue;
    const link = st(v.a.ns).links[v.a.ifname];
    if (link?.master !== v.master || !has(v.b.ns, v.b.ifname)) {
      cmds.push({ argv: ["ip", "-n", v.a.ns, "link", "set", v.a.ifname, "master", v.master] });
    }
  }
  for (const n of plan.nodes) {
    const s = st(n.ns);
    const want = new Map<string, string[]>();
    for (const a of n.addresses) want.set(a.ifname, [...(want.get(a.ifname) ?? []), a.cidr]);
    for (const [ifname, cidrs] of want) {
      const fresh = plan.veths.some(
        (v) =>
          (v.a.ns === n.ns &&
            v.a.ifname === ifname &&
            !(has(v.a.ns, v.a.ifname) && has(v.b.ns, v.b.ifname))) ||
          (v.b.ns === n.ns && v.b.ifname === ifname && !(has(v.a.ns, v.a.ifname) && has(v.b.ns, v.b.ifname))),
      );
      const have = fresh ? [] : (s.links[ifname]?.addresses ?? []);
      for (const c of have)
        if (!cidrs.includes(c)) cmds.push({ argv: ["ip", "-n", n.ns, "addr", "del", c, "dev", ifname] });
      for (const c of cidrs)
        if (!have.includes(c)) cmds.push({ argv: ["ip", "-n", n.ns, "addr", "add", c, "dev", ifname] });
    }
  }
  for (const n of plan.nodes) {
    const s = st(n.ns);
    for (const ifname of ownedLinks(plan, n)) {
      const peerMissing = plan.veths.some(
        (v) =>
          ((v.a.ns === n.ns && v.a.ifname === ifname) || (v.b.ns === n.ns && v.b.ifname === ifname)) &&
          !(has(v.a.ns, v.a.ifname) && has(v.b.ns, v.b.ifname)),
      );
      if (peerMissing || !s.links[ifname]?.up)
        cmds.push({ argv: ["ip", "-n", n.ns, "link", "set", ifname, "up"] });
    }
  }
  for (const n of plan.nodes) {
    const s = st(n.ns);
    for (const r of n.routes) {
      if (s.routes[r.dst] !== r.via)
        cmds.push({ argv: ["ip", "-n", n.ns, "route", "replace", r.dst, "via", r.via] });
    }
  }
  for (const n of plan.nodes) {
    if (!n.ruleset || st(n.ns).nftHash === n.ruleset.hash) continue;
    const { family, table, text } = n.ruleset;
    // Whole-table replace in one transaction: create-if-missing, delete, define.
    const script = `table ${family} ${table}\ndelete table ${family} ${table}\n${text}`;
    cmds.push({ argv: ["ip", "netns", "exec", n.ns, "nft", "--check", "-f", "-"], input: script });
    cmds.push({ argv: ["ip", "netns", "exec", n.ns, "nft", "-f", "-"], input: script });
  }
  return cmds;
}

/** applyNetwork observes, reconciles and runs the difference; returns the commands it ran. Idempotent. */
export async function applyNetwork(runner: CommandRunner, plan: LabPlan): Promise<LabCommand[]> {
  const cmds = reconcileNetwork(plan, await observeNetwork(runner, plan));
  for (const c of cmds) await runner.run(c.argv, c.input === undefined ? {} : { input: c.input });
  return cmds;
}
