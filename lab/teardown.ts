/**
 * Teardown: find everything a lab made from its prefix and lab dir (the state file helps but is
 * not needed) and remove it: processes, mount pins, namespaces, the lab dir.
 */
import { join } from "node:path";
import type { Clock } from "../src/node/host/clock.js";
import type { CommandRunner } from "../src/node/host/runner.js";
import { containerdPaths } from "../src/node/runtime/containerd.js";
import { defaultCgroupParent } from "../src/node/runtime/containers.js";
import { listMounts } from "./capsules.js";
import { parseNetnsList } from "./network.js";
import { listResolverEntries, removeResolvers } from "./resolvers.js";

/**
 * TeardownInput names the lab (both required). Nothing else is needed: namespaces are found by
 * prefix, processes by namespace and state dir, mounts by lab dir, so a lab whose `up` crashed
 * before writing its state file is removed just the same.
 */
export interface TeardownInput {
  prefix: string;
  labDir: string;
}

/** TeardownResult says what was removed and what could not be. */
export interface TeardownResult {
  /** killed are the pids that were signalled. */
  killed: number[];
  namespaces: string[];
  /** resolvers are the namespaces whose /etc/netns/<ns> entry was removed. */
  resolvers: string[];
  unmounted: string[];
  removedDir: boolean;
  /** leftovers describes anything still present afterwards (empty on success). */
  leftovers: string[];
}

/** escapeRegex makes a literal string safe inside a pgrep (extended) regex. */
export function escapeRegex(s: string): string {
  return s.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
}

/** parsePids parses whitespace-separated pids, dropping anything that is not a pid > 1. */
export function parsePids(stdout: string): number[] {
  return stdout
    .split(/\s+/)
    .map((x) => Number.parseInt(x, 10))
    .filter((n) => Number.isInteger(n) && n > 1);
}

/** labNamespaces lists the namespaces whose name starts with `<prefix>-`. */
export async function labNamespaces(runner: CommandRunner, prefix: string): Promise<string[]> {
  const all = parseNetnsList((await runner.run(["ip", "-j", "netns", "list"])).stdout);
  return all.filter((n) => n.startsWith(`${prefix}-`));
}

/** CGROUP_PROCS prints the pids in every cgroup below $1 in every hierarchy (v1 or v2). */
export const CGROUP_PROCS =
  'find /sys/fs/cgroup -path "*$1/*" -name cgroup.procs 2>/dev/null | while read -r f; do cat "$f"; done';
/** CGROUP_RMDIR removes the (empty) cgroups $1 and below, deepest first. */
export const CGROUP_RMDIR =
  'find /sys/fs/cgroup -depth -type d -path "*$1*" -exec rmdir {} + 2>/dev/null; true';

/**
 * workloadCgroups lists the cgroup parents of the lab capsules' containers (one per capsule
 * state dir under `labDir`, see defaultCgroupParent). Workload processes live in namespaces
 * the lab did not make and carry no lab path on their command line: their cgroup is how they
 * are found.
 */
export async function workloadCgroups(runner: CommandRunner, labDir: string): Promise<string[]> {
  const r = await runner.run(
    ["find", labDir, "-mindepth", "2", "-maxdepth", "2", "-type", "d", "-name", "state"],
    {
      allowFailure: true,
    },
  );
  return r.stdout
    .split("\n")
    .filter(Boolean)
    .sort()
    .map((stateDir) =>
      defaultCgroupParent({
        address: containerdPaths(stateDir).address,
        namespace: "capsule",
        snapshotter: "overlayfs",
      }),
    );
}

/**
 * LAB_DIR_FLAGS are the flags by which a lab process names a file under its lab dir: capsuled's
 * `--state-dir`, the CA's `caddy run --config` and `dnsmasq --conf-file=`.
 */
const LAB_DIR_FLAGS = "(--state-dir |--config |--conf-file=)";

/** labPids finds every process that belongs to the lab: everything inside its network namespaces,
 * plus any process still running with its lab dir after one of {@link LAB_DIR_FLAGS} (e.g. one
 * whose namespace is gone).
 */
export async function labPids(
  runner: CommandRunner,
  namespaces: string[],
  labDir: string | undefined,
): Promise<number[]> {
  const found = new Set<number>();
  const lists = await Promise.all(
    namespaces.map((ns) => runner.run(["ip", "netns", "pids", ns], { allowFailure: true })),
  );
  for (const r of lists) for (const p of parsePids(r.stdout)) found.add(p);
  if (labDir !== undefined) {
    const byDir = await runner.run(["pgrep", "-f", "--", `${LAB_DIR_FLAGS}${escapeRegex(labDir)}/`], {
      allowFailure: true,
    });
    for (const p of parsePids(byDir.stdout)) found.add(p);
    for (const parent of await workloadCgroups(runner, labDir)) {
      const r = await runner.run(["sh", "-c", CGROUP_PROCS, "cgroup-procs", parent], { allowFailure: true });
      for (const p of parsePids(r.stdout)) found.add(p);
    }
  }
  found.delete(process.pid);
  return [...found].sort((a, b) => a - b);
}

async function groupLeaders(runner: CommandRunner, pids: number[]): Promise<number[]> {
  if (!pids.length) return [];
  const r = await runner.run(["ps", "-o", "pid=,pgid=", "-p", pids.join(",")], { allowFailure: true });
  const leaders = new Set<number>();
  for (const line of r.stdout.split("\n")) {
    const [pid, pgid] = parsePids(line);
    // A lab process that leads its own group (capsuled after setsid): signal the whole group,
    // which reaches children such as wireguard-go even if they left the namespace.
    if (pid !== undefined && pid === pgid) leaders.add(pid);
  }
  return [...leaders];
}

async function signal(runner: CommandRunner, sig: "TERM" | "KILL", pids: number[]): Promise<void> {
  if (!pids.length) return;
  const leaders = await groupLeaders(runner, pids);
  await runner.run(["kill", "-s", sig, "--", ...leaders.map((p) => `-${p}`), ...pids.map(String)], {
    allowFailure: true,
  });
}

async function waitGone(
  runner: CommandRunner,
  clock: Clock,
  namespaces: string[],
  labDir: string | undefined,
  ms: number,
): Promise<number[]> {
  const deadline = clock.now() + ms;
  for (;;) {
    const left = await labPids(runner, namespaces, labDir);
    if (!left.length || clock.now() >= deadline) return left;
    await clock.sleep(100);
  }
}

/**
 * stopProcesses sends SIGTERM to every lab process found by {@link labPids} (and to the process
 * groups they lead), SIGKILL to what is left after 3 s, and waits at most 3 s more. `labDir`
 * undefined limits the search to the namespaces. Returns the pids signalled and any still alive.
 */
export async function stopProcesses(
  runner: CommandRunner,
  clock: Clock,
  namespaces: string[],
  labDir: string | undefined,
): Promise<{ killed: number[]; remaining: number[] }> {
  const killed = new Set<number>();
  let pids = await labPids(runner, namespaces, labDir);
  for (const p of pids) killed.add(p);
  await signal(runner, "TERM", pids);
  pids = await waitGone(runner, clock, namespaces, labDir, 3_000);
  if (pids.length) {
    for (const p of pids) killed.add(p);
    await signal(runner, "KILL", pids);
    pids = await waitGone(runner, clock, namespaces, labDir, 3_000);
  }
  return { killed: [...killed].sort((a, b) => a - b), remaining: pids };
}

/**
 * pruneNamespaces removes lab namespaces the current plan no longer has (e.g. `up --homes 1`
 * after `up --homes 2`): stops their processes, unpins mount namespaces under `mntDir` that are
 * not in `keepPins`, deletes the namespaces. Returns the namespaces removed. Idempotent.
 */
export async function pruneNamespaces(
  runner: CommandRunner,
  clock: Clock,
  strays: string[],
  mntDir: string,
  keepPins: string[],
): Promise<string[]> {
  if (strays.length) await stopProcesses(runner, clock, strays, undefined);
  const pins = [...(await listMounts(runner))].filter(
    (m) => m.startsWith(`${mntDir}/`) && !keepPins.includes(m),
  );
  for (const m of pins) await runner.run(["umount", "-l", m], { allowFailure: true });
  for (const ns of strays) await runner.run(["ip", "netns", "del", ns], { allowFailure: true });
  return strays;
}

/**
 * teardownLab removes a lab: SIGTERM to its processes (and their process groups), SIGKILL after
 * 3 s, unmount every mount under the lab dir (mount namespace pins, the private mnt dir),
 * delete its network namespaces (which deletes every veth and bridge in them), remove its
 * `/etc/netns/<prefix>-*` resolv.conf entries and remove the lab dir if it carries the lab marker. Every wait is bounded. Idempotent.
 */
export async function teardownLab(
  runner: CommandRunner,
  clock: Clock,
  input: TeardownInput,
): Promise<TeardownResult> {
  const { prefix, labDir } = input;
  const namespaces = await labNamespaces(runner, prefix);
  const { killed, remaining: pids } = await stopProcesses(runner, clock, namespaces, labDir);

  const unmounted: string[] = [];
  const mounts = [...(await listMounts(runner))]
    .filter((m) => m === labDir || m.startsWith(`${labDir}/`))
    .sort((a, b) => b.length - a.length);
  for (const m of mounts) {
    const r = await runner.run(["umount", m], { allowFailure: true });
    if (r.exitCode !== 0) await runner.run(["umount", "-l", m], { allowFailure: true });
    unmounted.push(m);
  }

  for (const ns of namespaces) await runner.run(["ip", "netns", "del", ns], { allowFailure: true });
  const resolvers = await removeResolvers(runner, prefix);

  // Workload cgroups (now empty) and loop devices backing the capsules' volumes.
  for (const parent of await workloadCgroups(runner, labDir))
    await runner.run(["sh", "-c", CGROUP_RMDIR, "cgroup-rmdir", parent], { allowFailure: true });
  const loops = await runner.run(["losetup", "-n", "-l", "-O", "NAME,BACK-FILE"], { allowFailure: true });
  for (const line of loops.stdout.split("\n")) {
    const [dev, file] = line.trim().split(/\s+/);
    if (dev && file?.startsWith(`${labDir}/`))
      await runner.run(["losetup", "-d", dev], { allowFailure: true });
  }

  let removedDir = false;
  const marked = await runner.run(["test", "-e", join(labDir, ".capsule-lab")], { allowFailure: true });
  if (marked.exitCode === 0) {
    await runner.run(["rm", "-rf", "--one-file-system", labDir], { allowFailure: true });
    removedDir = true;
  }

  const leftovers: string[] = [];
  for (const ns of await labNamespaces(runner, prefix)) leftovers.push(`namespace ${ns}`);
  for (const ns of await listResolverEntries(runner, prefix)) leftovers.push(`/etc/netns/${ns}`);
  for (const p of pids) leftovers.push(`process ${p}`);
  for (const m of [...(await listMounts(runner))].filter((x) => x === labDir || x.startsWith(`${labDir}/`))) {
    leftovers.push(`mount ${m}`);
  }
  if (removedDir && (await runner.run(["test", "-e", labDir], { allowFailure: true })).exitCode === 0) {
    leftovers.push(`directory ${labDir}`);
  }
  return { killed, namespaces, resolvers, unmounted, removedDir, leftovers };
}
