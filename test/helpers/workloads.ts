/**
 * Helpers for lab tests and benchmarks that run workloads. Container processes need no
 * cleanup here: `lab down` finds them by their capsule's container cgroup.
 */
import type { Lab } from "../../lab/lab.js";
import { rpc, waitFor } from "./fabric.js";

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
