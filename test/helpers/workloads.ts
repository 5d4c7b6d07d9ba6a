/**
 * Helpers for lab tests and benchmarks that run workloads: wait for a capsule's workload
 * runtime, and kill every container process of a capsule by its cgroup (they live in workload
 * namespaces `lab down` does not know about, so this runs before the lab's own teardown).
 */
import { readdirSync, readFileSync, rmdirSync } from "node:fs";
import { join } from "node:path";
import type { Lab } from "../../lab/lab.js";
import { containerdPaths } from "../../src/node/runtime/containerd.js";
import { defaultCgroupParent } from "../../src/node/runtime/containers.js";
import { rpc, waitFor } from "./fabric.js";

/** cgroupTree lists every cgroup directory named `parent` and below (v1 hierarchies or v2), and the pids in them. */
export function cgroupTree(parent: string): { dirs: string[]; pids: number[] } {
  const root = "/sys/fs/cgroup";
  const dirs: string[] = [];
  const pids: number[] = [];
  const walk = (d: string) => {
    let entries: string[];
    try {
      entries = readdirSync(d, { withFileTypes: true })
        .filter((e) => e.isDirectory())
        .map((e) => join(d, e.name));
    } catch {
      return;
    }
    dirs.push(d);
    try {
      for (const l of readFileSync(join(d, "cgroup.procs"), "utf8").split("\n")) if (l) pids.push(Number(l));
    } catch {}
    for (const e of entries) walk(e);
  };
  walk(join(root, parent));
  for (const h of readdirSync(root)) walk(join(root, h, parent));
  return { dirs, pids };
}

/** capsuleCgroup is the cgroup parent of lab capsule `name`'s containers. */
export function capsuleCgroup(lab: Lab, name: string): string {
  return defaultCgroupParent({
    address: containerdPaths(lab.capsule(name).stateDir).address,
    namespace: "capsule",
    snapshotter: "overlayfs",
  });
}

/** killWorkloads SIGKILLs every container process of the named lab capsules and removes their cgroups (bounded, 2 s). */
export async function killWorkloads(lab: Lab, capsules: readonly string[]): Promise<void> {
  for (const c of capsules) {
    const parent = capsuleCgroup(lab, c);
    for (let i = 0; i < 20; i++) {
      const { pids, dirs } = cgroupTree(parent);
      for (const p of pids)
        try {
          process.kill(p, "SIGKILL");
        } catch {}
      for (const d of dirs.reverse())
        try {
          rmdirSync(d);
        } catch {}
      if (!cgroupTree(parent).dirs.length) break;
      await new Promise((r) => setTimeout(r, 100));
    }
  }
}

/** waitRuntime waits (at most `timeoutMs`) until lab capsule `name` answers Images/List; returns the time taken or -1. */
export function waitRuntime(lab: Lab, name: string, timeoutMs = 60_000): Promise<number> {
  return waitFor(
    async () => {
      try {
        await rpc(lab, name, "Images/List");
        return true;
      } catch {
        return false;
      }
    },
    timeoutMs,
    250,
  );
}

/** shellQuote quotes `s` for a POSIX shell: as is when it is plainly safe, else in single quotes. */
export function shellQuote(s: string): string {
  return /^[A-Za-z0-9_@%+=:,./-]+$/.test(s) ? s : `'${s.replace(/'/g, `'\\''`)}'`;
}
