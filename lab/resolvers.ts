/**
 * Name resolution inside the lab: every lab namespace that should resolve through the lab DNS
 * gets `/etc/netns/<ns>/resolv.conf`. `ip netns exec <ns>` binds it over /etc/resolv.conf in the
 * mount namespace it makes (client, routers, `<p>-ca` and its dnsmasq and Caddy, `lab exec` of a
 * non-capsule node); a capsule's pinned mount namespace binds the same file when it is made (see
 * capsules.ts), so capsuled, its Caddy and `lab exec <capsule>` resolve alike. The host's own
 * /etc/resolv.conf and /etc/hosts are never written.
 *
 * The lab owns `/etc/netns/<prefix>-*` (as it owns the namespaces `<prefix>-*`): `up` writes what
 * the plan has and removes the resolv.conf of any other such entry, `down` removes them all.
 */
import type { CommandRunner } from "../src/node/host/runner.js";
import type { LabCommand } from "./network.js";
import type { LabPlan } from "./plan.js";

/** ETC_NETNS is where `ip netns exec` looks for per-namespace files. */
export const ETC_NETNS = "/etc/netns";

/** resolvFilePath is the resolv.conf `ip netns exec <ns>` uses in place of /etc/resolv.conf. */
export function resolvFilePath(ns: string): string {
  return `${ETC_NETNS}/${ns}/resolv.conf`;
}

/** ResolverState is what exists: the `/etc/netns/<prefix>-*` entries and the content of their resolv.conf. */
export interface ResolverState {
  /** entries are the namespace names with a directory under /etc/netns. */
  entries: string[];
  /** files maps a namespace to its resolv.conf content (absent: no readable file). */
  files: Record<string, string>;
}

/** listResolverEntries lists the `/etc/netns/<prefix>-*` directories by namespace name (read-only). */
export async function listResolverEntries(runner: CommandRunner, prefix: string): Promise<string[]> {
  const r = await runner.run(
    ["find", ETC_NETNS, "-mindepth", "1", "-maxdepth", "1", "-name", `${prefix}-*`],
    { allowFailure: true },
  );
  return r.stdout
    .split("\n")
    .filter((l) => l.startsWith(`${ETC_NETNS}/`))
    .map((l) => l.slice(ETC_NETNS.length + 1))
    .sort();
}

/** observeResolvers reads the lab's /etc/netns entries and their resolv.conf (read-only). */
export async function observeResolvers(runner: CommandRunner, prefix: string): Promise<ResolverState> {
  const entries = await listResolverEntries(runner, prefix);
  const files: Record<string, string> = {};
  await Promise.all(
    entries.map(async (ns) => {
      const r = await runner.run(["cat", resolvFilePath(ns)], { allowFailure: true });
      if (r.exitCode === 0) files[ns] = r.stdout;
    }),
  );
  return { entries, files };
}

/** removeResolverCommands removes the lab's resolv.conf of `ns` and its directory when that is then empty (pure). */
export function removeResolverCommands(ns: string): LabCommand[] {
  return [
    { argv: ["rm", "-f", resolvFilePath(ns)] },
    { argv: ["rmdir", "--ignore-fail-on-non-empty", `${ETC_NETNS}/${ns}`] },
  ];
}

/**
 * reconcileResolvers returns the commands that take `observed` to the plan: write each planned
 * resolv.conf whose content differs, remove the resolv.conf of every other lab entry. Pure; an
 * empty list means nothing to do.
 */
export function reconcileResolvers(plan: LabPlan, observed: ResolverState): LabCommand[] {
  const cmds: LabCommand[] = [];
  const wanted = new Set<string>();
  for (const n of plan.nodes) {
    if (n.resolvConf === undefined) continue;
    wanted.add(n.ns);
    if (observed.files[n.ns] === n.resolvConf) continue;
    if (!observed.entries.includes(n.ns)) cmds.push({ argv: ["mkdir", "-p", `${ETC_NETNS}/${n.ns}`] });
    cmds.push({ argv: ["tee", resolvFilePath(n.ns)], input: n.resolvConf });
  }
  for (const ns of observed.entries) if (!wanted.has(ns)) cmds.push(...removeResolverCommands(ns));
  return cmds;
}

/** applyResolvers observes, reconciles and runs the difference; returns the commands it ran. Idempotent. */
export async function applyResolvers(runner: CommandRunner, plan: LabPlan): Promise<LabCommand[]> {
  const cmds = reconcileResolvers(plan, await observeResolvers(runner, plan.prefix));
  for (const c of cmds) await runner.run(c.argv, c.input === undefined ? {} : { input: c.input });
  return cmds;
}

/** removeResolvers removes every `/etc/netns/<prefix>-*` resolv.conf the lab made (teardown); returns the namespaces. */
export async function removeResolvers(runner: CommandRunner, prefix: string): Promise<string[]> {
  const entries = await listResolverEntries(runner, prefix);
  for (const ns of entries)
    for (const c of removeResolverCommands(ns)) await runner.run(c.argv, { allowFailure: true });
  return entries;
}
