/**
 * Throwaway namespaces for root tests: each node is a network namespace plus a pinned mount
 * namespace with a private /run, which is what a capsule gets in the lab (two wireguard-go
 * processes on one interface name would otherwise share /var/run/wireguard/IFACE.sock).
 *
 * The mount namespace is made from the root mount namespace with `unshare --mount=PIN`, pinned on
 * a file inside a private bind mount (a mount namespace can only be pinned on a mount that does
 * not propagate), and its copy of /run/netns is detached before /run is covered: otherwise it
 * would keep every namespace that existed at that moment alive after `ip netns del`.
 *
 * {@link withNamespaces} registers a teardown that always runs: it kills every process in the
 * nodes' network namespaces, unpins the mount namespaces, deletes the network namespaces and
 * the temp dir, then reports anything left.
 */
import { randomBytes } from "node:crypto";
import { existsSync, mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { Test } from "tap";
import type { Clock } from "../../src/node/host/clock.js";
import { type NsTarget, NsRunner, NsSpawner } from "../../src/node/host/ns-runner.js";
import {
  type CommandRunner,
  ExecaRunner,
  type RunOptions,
  type RunResult,
} from "../../src/node/host/runner.js";
import { DetachedSpawner } from "../../src/node/host/spawner.js";

/** ROOT_SKIP is the skip reason of every test that needs root. */
export const ROOT_SKIP = "requires superuser privileges";

/** isRoot reports whether this process may create namespaces. */
export function isRoot(): boolean {
  return process.getuid?.() === 0;
}

/** NsNode is one simulated capsule: its namespaces, dirs, and a runner and spawner that act inside them. */
export interface NsNode {
  name: string;
  /** netns is the network namespace's name under /run/netns. */
  netns: string;
  /** mountNs is the file the mount namespace is pinned on. */
  mountNs: string;
  /** runDir is the host directory mounted on the node's /run. */
  runDir: string;
  /** stateDir is a private host directory for keys and logs (visible inside too). */
  stateDir: string;
  target: NsTarget;
  runner: CommandRunner;
  spawner: NsSpawner;
}

/** RecordingRunner passes commands through and keeps their canonical text, for asserting what a step ran. */
export class RecordingRunner implements CommandRunner {
  readonly commands: string[] = [];
  constructor(private readonly inner: CommandRunner) {}
  run(argv: readonly string[], opts?: RunOptions): Promise<RunResult> {
    this.commands.push(argv.join(" "));
    return this.inner.run(argv, opts);
  }
}

const host = new ExecaRunner();

/** refClock is the real clock with timers that keep the process alive while a test waits (SystemClock's do not). */
export const refClock: Clock = {
  now: () => Date.now(),
  sleep: (ms) => sleep(ms),
};

/** sleep waits `ms` with a timer that keeps the process alive. */
export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/** waitFor polls `check` every 50 ms until it returns true or `timeoutMs` passes; returns the last answer. */
export async function waitFor(check: () => Promise<boolean>, timeoutMs: number): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (await check()) return true;
    if (Date.now() >= deadline) return false;
    await sleep(50);
  }
}

/** Sandbox owns a set of nodes that share a random prefix and a temp dir. */
export class Sandbox {
  readonly prefix: string;
  readonly dir: string;
  private readonly mntDir: string;
  readonly nodes = new Map<string, NsNode>();
  /** pids seen in the namespaces at teardown, checked for exit afterwards. */
  private killed: number[] = [];

  constructor() {
    const alphabet = "abcdefghijklmnopqrstuvwxyz0123456789";
    this.prefix = `cns${[...randomBytes(4)].map((b) => alphabet[b % alphabet.length]).join("")}`;
    this.dir = mkdtempSync(join(tmpdir(), `${this.prefix}-`));
    this.mntDir = join(this.dir, "mnt");
  }

  /** node creates a namespace pair named `<prefix>-<name>` with loopback up. */
  async node(name: string): Promise<NsNode> {
    if (this.nodes.size === 0) {
      await host.run(["mkdir", "-p", this.mntDir]);
      await host.run(["mount", "--bind", this.mntDir, this.mntDir]);
      await host.run(["mount", "--make-private", this.mntDir]);
    }
    const netns = `${this.prefix}-${name}`;
    const mountNs = join(this.mntDir, `${name}.mnt`);
    const runDir = join(this.dir, name, "run");
    const stateDir = join(this.dir, name, "state");
    await host.run(["mkdir", "-p", runDir, stateDir]);
    await host.run(["chmod", "700", stateDir]);
    await host.run(["ip", "netns", "add", netns]);
    await host.run(["touch", mountNs]);
    await host.run([
      "unshare",
      `--mount=${mountNs}`,
      "--propagation",
      "private",
      "sh",
      "-c",
      'umount -l /run/netns 2>/dev/null; mount --bind "$1" /run && mkdir -p /run/wireguard',
      "capsule-ns",
      runDir,
    ]);
    const target: NsTarget = { netns, mountNs };
    const node: NsNode = {
      name,
      netns,
      mountNs,
      runDir,
      stateDir,
      target,
      runner: new NsRunner(host, target),
      spawner: new NsSpawner(new DetachedSpawner(), target),
    };
    this.nodes.set(name, node);
    await node.runner.run(["ip", "link", "set", "dev", "lo", "up"]);
    return node;
  }

  /** exec runs argv inside node `name` (network and mount namespace). */
  exec(name: string, argv: readonly string[], opts?: RunOptions): Promise<RunResult> {
    const n = this.nodes.get(name);
    if (!n) throw new Error(`no node ${name}`);
    return n.runner.run(argv, opts);
  }

  /** link connects two nodes with a veth pair (`ifA` in a, `ifB` in b), addresses given as CIDRs, both up. */
  async link(a: string, ifA: string, cidrA: string, b: string, ifB: string, cidrB: string): Promise<void> {
    const na = this.nodes.get(a)!;
    const nb = this.nodes.get(b)!;
    await host.run([
      "ip",
      "-n",
      na.netns,
      "link",
      "add",
      ifA,
      "type",
      "veth",
      "peer",
      "name",
      ifB,
      "netns",
      nb.netns,
    ]);
    await na.runner.run(["ip", "addr", "add", cidrA, "dev", ifA]);
    await nb.runner.run(["ip", "addr", "add", cidrB, "dev", ifB]);
    await na.runner.run(["ip", "link", "set", "dev", ifA, "up"]);
    await nb.runner.run(["ip", "link", "set", "dev", ifB, "up"]);
  }

  /** pids lists the processes living in node `name`'s network namespace. */
  async pids(name: string): Promise<number[]> {
    const r = await host.run(["ip", "netns", "pids", `${this.prefix}-${name}`], { allowFailure: true });
    return r.stdout
      .split("\n")
      .map((l) => Number.parseInt(l, 10))
      .filter((p) => Number.isInteger(p) && p > 0);
  }

  /** destroy removes everything the sandbox made. Safe to call after a partial setup, and twice. */
  async destroy(): Promise<void> {
    for (const name of this.nodes.keys()) {
      const pids = await this.pids(name);
      this.killed.push(...pids);
      if (pids.length) await host.run(["kill", "-9", ...pids.map(String)], { allowFailure: true });
    }
    await waitFor(async () => this.killed.every((p) => !alive(p)), 5_000);
    for (const n of this.nodes.values()) {
      await host.run(["umount", n.mountNs], { allowFailure: true });
      await host.run(["ip", "netns", "del", n.netns], { allowFailure: true });
    }
    await host.run(["umount", this.mntDir], { allowFailure: true });
    await host.run(["rm", "-rf", this.dir], { allowFailure: true });
  }

  /** leftovers lists what remains after {@link destroy}: namespaces, mounts, processes, the temp dir. */
  async leftovers(): Promise<string[]> {
    const out: string[] = [];
    const ns = (await host.run(["ip", "netns", "list"])).stdout
      .split("\n")
      .map((l) => l.split(" ")[0] ?? "")
      .filter((n) => n.startsWith(`${this.prefix}-`));
    out.push(...ns.map((n) => `namespace ${n}`));
    const mounts = (await host.run(["findmnt", "-rn", "-o", "TARGET"])).stdout
      .split("\n")
      .filter((m) => m.startsWith(this.dir));
    out.push(...mounts.map((m) => `mount ${m}`));
    out.push(...this.killed.filter(alive).map((p) => `process ${p}`));
    if (existsSync(this.dir)) out.push(`dir ${this.dir}`);
    return out;
  }
}

// Zombies count as gone: they hold no namespace, and an orphan's zombie waits for pid 1 to reap it.
const alive = (pid: number) => DetachedSpawner.isAliveSync(pid);

/**
 * withNamespaces makes a {@link Sandbox} whose teardown always runs (even when the test fails
 * halfway through setup) and fails the test if anything is left behind.
 */
export function withNamespaces(t: Test): Sandbox {
  const sb = new Sandbox();
  t.teardown(async () => {
    await sb.destroy();
    const left = await sb.leftovers();
    if (left.length) t.fail(`namespaces left behind: ${left.join(", ")}`);
  });
  return sb;
}
