/**
 * The nftables side of policy: {@link NftPolicyApplier} loads the compiler's script (one
 * `nft -f` transaction that replaces table `inet capsule_policy` whole) and reads the table's
 * per-workload drop counters. Nothing else writes to that table.
 *
 * Deny at boot: the last ruleset that applied is also written to `<stateDir>/policy.nft`, which
 * capsule-policy.service (packaging/systemd) loads with `nft -f` before network-pre.target, i.e.
 * before any interface is configured and long before capsuled, WireGuard or a workload starts.
 * So after a reboot the fabric comes up already filtered by the last enforced policies, and a
 * capsule that never had a ruleset gets the compiler's output for "no policies" on capsuled's
 * first apply, which is default deny (nothing reaches a workload's fabric address except its
 * own capsule's agent). There is no window in which workloads are reachable unfiltered.
 */
import { closeSync, fsyncSync, openSync, renameSync, writeSync } from "node:fs";
import { join } from "node:path";
import { POLICY_TABLE } from "../../fabric/policy/compile.js";
import type { CommandRunner } from "../host/runner.js";

/** POLICY_FILE is the persisted ruleset under the state dir, loaded at boot by capsule-policy.service. */
export const POLICY_FILE = "policy.nft";

/** POLICY_TABLE_REF is the table the applier reads counters from (family and name). */
export const POLICY_TABLE_REF = ["inet", POLICY_TABLE] as const;

/** PolicyApplier is what the policy manager needs of the data plane (implemented by {@link NftPolicyApplier}). */
export interface PolicyApplier {
  /** check validates a script without changing anything; throws the tool's error. */
  check(script: string): Promise<void>;
  /** apply makes the script the live ruleset (checked first); returns whether anything changed. */
  apply(script: string): Promise<boolean>;
  /** dropCounters returns packets dropped per counter name, monotonic across applies. */
  dropCounters(): Promise<Map<string, bigint>>;
}

/** NftPolicyApplierOptions: all required. */
export interface NftPolicyApplierOptions {
  /** runner runs nft in the capsule's network namespace. */
  runner: CommandRunner;
  /** stateDir is where {@link POLICY_FILE} is kept. */
  stateDir: string;
}

/**
 * writeFileAtomic replaces `path` with `text` so that a crash leaves either the old or the new
 * file, never a torn one: write a temp file, fsync it, rename it over, fsync the directory.
 */
export function writeFileAtomic(path: string, text: string, dir: string): void {
  const tmp = `${path}.tmp`;
  const fd = openSync(tmp, "w", 0o600);
  try {
    writeSync(fd, text);
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
  renameSync(tmp, path);
  const dfd = openSync(dir, "r");
  try {
    fsyncSync(dfd);
  } finally {
    closeSync(dfd);
  }
}

/**
 * parseCounters reads `nft -j list counters table inet capsule_policy` output into packets per
 * counter name. Pure; anything unparsable yields an empty map (metrics are best effort).
 */
export function parseCounters(json: string): Map<string, bigint> {
  const out = new Map<string, bigint>();
  let doc: { nftables?: { counter?: { name?: string; packets?: number | string } }[] };
  try {
    doc = JSON.parse(json) as typeof doc;
  } catch {
    return out;
  }
  for (const o of doc.nftables ?? []) {
    const c = o.counter;
    if (c?.name !== undefined && c.packets !== undefined) out.set(c.name, BigInt(c.packets));
  }
  return out;
}

/**
 * NftPolicyApplier applies compiled policy scripts. `apply` is declarative and idempotent: the
 * same script as the last one applied changes nothing (no nft run); otherwise it runs
 * `nft --check -f -` then `nft -f -`, both over stdin, so a ruleset nft rejects leaves the
 * previous one in force (nft runs a file as one transaction), and only then persists the script
 * to {@link POLICY_FILE} (atomically) for the next boot. The first apply after start always
 * runs nft: the live table may differ from anything this process knows. Calls are serialized.
 */
export class NftPolicyApplier implements PolicyApplier {
  private readonly runner: CommandRunner;
  private readonly stateDir: string;
  private last: string | undefined;
  /** checked is the script the last successful check was of (apply does not check it again). */
  private checked: string | undefined;
  private queue: Promise<unknown> = Promise.resolve();
  /** base holds drops counted by tables that were since replaced (their counters restarted at 0). */
  private readonly base = new Map<string, bigint>();
  /** seen is the latest reading of the live table's counters. */
  private seen = new Map<string, bigint>();

  constructor(o: NftPolicyApplierOptions) {
    this.runner = o.runner;
    this.stateDir = o.stateDir;
  }

  /** file is the persisted ruleset's path. */
  get file(): string {
    return join(this.stateDir, POLICY_FILE);
  }

  /** lastApplied is the script last applied by this process, or undefined before the first apply. */
  get lastApplied(): string | undefined {
    return this.last;
  }

  /**
   * check runs `nft --check -f -` on the script (nothing for the live one); read-only. Throws
   * CAPSULE_COMMAND_FAILED with nft's message.
   */
  async check(script: string): Promise<void> {
    if (script === this.last || script === this.checked) return;
    await this.runner.run(["nft", "--check", "-f", "-"], { input: script });
    this.checked = script;
  }

  /** apply makes `script` the live ruleset (see the class comment); resolves to whether nft ran. */
  apply(script: string): Promise<boolean> {
    const run = this.queue.then(() => this.applyNow(script));
    this.queue = run.catch(() => undefined);
    return run;
  }

  private async applyNow(script: string): Promise<boolean> {
    if (this.last === script) return false;
    await this.check(script);
    // The replace restarts every counter at zero: keep what the old table counted.
    const before = await this.readLive();
    this.last = undefined; // unknown until the apply succeeds
    await this.runner.run(["nft", "-f", "-"], { input: script });
    this.last = script;
    for (const [name, n] of before) this.base.set(name, (this.base.get(name) ?? 0n) + n);
    this.seen = new Map();
    writeFileAtomic(this.file, script, this.stateDir);
    return true;
  }

  private async readLive(): Promise<Map<string, bigint>> {
    const r = await this.runner.run(["nft", "-j", "list", "counters", "table", ...POLICY_TABLE_REF], {
      allowFailure: true,
    });
    return r.exitCode === 0 ? parseCounters(r.stdout) : new Map();
  }

  /**
   * dropCounters returns the packets each named counter of the table counted since this process
   * started, across applies: a counter that went backwards or vanished (the table was replaced
   * behind our back) is taken as restarted and its previous reading kept. Read-only
   * on the host; serialized with applies so a replace is never counted twice.
   */
  dropCounters(): Promise<Map<string, bigint>> {
    const run = this.queue.then(async () => {
      const live = await this.readLive();
      const out = new Map<string, bigint>();
      // A counter that went backwards or vanished restarted (or went) with a replaced table.
      for (const [name, prev] of this.seen) {
        const n = live.get(name) ?? 0n;
        if (n < prev) this.base.set(name, (this.base.get(name) ?? 0n) + prev);
      }
      this.seen = live;
      for (const name of new Set([...this.base.keys(), ...live.keys()]))
        out.set(name, (this.base.get(name) ?? 0n) + (live.get(name) ?? 0n));
      return out;
    });
    this.queue = run.catch(() => undefined);
    return run;
  }
}
