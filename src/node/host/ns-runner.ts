import type { CommandRunner, RunOptions, RunResult } from "./runner.js";
import type { ProcessSpawner, SpawnOptions } from "./spawner.js";

/**
 * NsTarget names the namespaces a command runs in. `netns` is required: a name under
 * /run/netns (as `ip netns add` makes) or an absolute path to a namespace file. `mountNs` is
 * optional: the file a mount namespace is pinned on (e.g. one with a private /run, so
 * wireguard-go's /var/run/wireguard/IFACE.sock of one capsule never meets another's); unset =
 * stay in the caller's mount namespace.
 */
export interface NsTarget {
  netns: string;
  mountNs?: string;
}

/**
 * nsenterArgv is the argv prefix that runs a command inside `target`. nsenter opens every
 * namespace before entering any, so the /run/netns path is resolved in the caller's mount
 * namespace, and it execs the command in place (no fork for net and mount namespaces), so a
 * detached process's pid is the command's own.
 */
export function nsenterArgv(target: NsTarget): string[] {
  const net = target.netns.startsWith("/") ? target.netns : `/run/netns/${target.netns}`;
  return ["nsenter", `--net=${net}`, ...(target.mountNs ? [`--mount=${target.mountNs}`] : []), "--"];
}

/**
 * NsRunner runs every command of an inner {@link CommandRunner} inside a network (and
 * optionally mount) namespace. It exists for code that drives a namespace from outside (root
 * tests, the lab); capsuled itself already runs inside its namespaces and uses its runner
 * directly. Errors name the full argv, nsenter prefix included.
 */
export class NsRunner implements CommandRunner {
  private readonly prefix: string[];

  constructor(
    private readonly inner: CommandRunner,
    target: NsTarget,
  ) {
    this.prefix = nsenterArgv(target);
  }

  run(argv: readonly string[], opts?: RunOptions): Promise<RunResult> {
    return this.inner.run([...this.prefix, ...argv], opts);
  }
}

/** NsSpawner is {@link NsRunner}'s counterpart for detached processes (wireguard-go in a test namespace). */
export class NsSpawner implements ProcessSpawner {
  private readonly prefix: string[];

  constructor(
    private readonly inner: ProcessSpawner,
    target: NsTarget,
  ) {
    this.prefix = nsenterArgv(target);
  }

  spawnDetached(argv: readonly string[], opts: SpawnOptions): Promise<number> {
    return this.inner.spawnDetached([...this.prefix, ...argv], opts);
  }

  isAlive(pid: number): Promise<boolean> {
    return this.inner.isAlive(pid);
  }
}
