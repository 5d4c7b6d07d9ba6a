/**
 * Capsule processes: each capsule gets a persistent mount namespace with a private /run (so
 * wireguard-go's UAPI sockets in /var/run/wireguard never collide) and a capsuled started
 * detached inside its network and mount namespaces. Every effect goes through the runner.
 *
 * How the mount namespace is made and kept:
 * 1. `<labDir>/mnt` is bind-mounted onto itself and made private: a mount namespace can only
 *    be pinned by binding its nsfs file on a mount that does not propagate.
 * 2. `nsenter --net=/run/netns/<ns> unshare --mount=<labDir>/mnt/<cap>.mnt --propagation private sh -c ...`
 *    creates the namespace from the root mount namespace (so the pin lands in the root namespace,
 *    not in a throwaway `ip netns exec` one), detaches its copy of /run/netns (so it never holds
 *    other namespaces alive), binds `<labDir>/<cap>/run` over /run and mounts a sysfs that shows
 *    the capsule's own interfaces. The shell exits; the pin keeps the namespace.
 * 3. capsuled, `lab exec` and tests enter with `nsenter --net=/run/netns/<ns> --mount=<pin>`,
 *    which works whether or not capsuled is alive.
 */
import type { Clock } from "../src/node/host/clock.js";
import { CapsuleError, ErrorCode } from "../src/errors.js";
import type { CommandRunner } from "../src/node/host/runner.js";
import type { LabCommand } from "./network.js";
import type { CapsulePlan, LabPlan } from "./plan.js";

/** RefClock is the real clock with timers that keep the process alive while a lab waits. */
export class RefClock implements Clock {
  now(): number {
    return Date.now();
  }
  sleep(ms: number): Promise<void> {
    return new Promise((r) => setTimeout(r, ms));
  }
}

/** parseMounts parses `findmnt -rn -o TARGET` (raw mode escapes blanks as \xNN) into a set of paths. */
export function parseMounts(stdout: string): Set<string> {
  const out = new Set<string>();
  for (const line of stdout.split("\n")) {
    if (!line) continue;
    out.add(
      line.replace(/\\x([0-9a-fA-F]{2})/g, (_, h: string) => String.fromCharCode(Number.parseInt(h, 16))),
    );
  }
  return out;
}

/** listMounts returns every mount target in the root mount namespace. */
export async function listMounts(runner: CommandRunner): Promise<Set<string>> {
  return parseMounts((await runner.run(["findmnt", "-rn", "-o", "TARGET"])).stdout);
}

/** netnsPath is the bind-mounted file `ip netns add` pins a network namespace on. */
export function netnsPath(ns: string): string {
  return `/run/netns/${ns}`;
}

/**
 * LabProcess is one detached process the lab runs and finds again by its pid file: a capsule's
 * daemon, or a service of the lab CA namespace (dnsmasq, Caddy).
 */
export interface LabProcess {
  name: string;
  /** ns is the network namespace it runs in. */
  ns: string;
  /**
   * mntns, when set, is the pinned mount namespace it runs in (capsules); unset, it runs under
   * `ip netns exec`, which gives it /etc/netns/<ns>/resolv.conf as /etc/resolv.conf.
   */
  mntns?: string;
  argv: string[];
  /** env is set in the process's environment (optional). */
  env?: Record<string, string>;
  pidFile: string;
  logFile: string;
}

/**
 * enterArgv is the prefix that runs a command inside a lab process's namespaces: a capsule's
 * network and mount namespaces (nsenter), or `ip netns exec` for a namespace without a pinned
 * mount namespace.
 */
export function enterArgv(p: { ns: string; mntns?: string }): string[] {
  return p.mntns === undefined
    ? ["ip", "netns", "exec", p.ns]
    : ["nsenter", `--net=${netnsPath(p.ns)}`, `--mount=${p.mntns}`, "--"];
}

/** mountDirCommands pins `<labDir>/mnt` as a private bind mount (pure; run only when it is not mounted). */
export function mountDirCommands(plan: LabPlan): LabCommand[] {
  return [
    { argv: ["mount", "--bind", plan.mntDir, plan.mntDir] },
    { argv: ["mount", "--make-private", plan.mntDir] },
  ];
}

// Run by `sh -c` inside the new mount namespace; $1 is the capsule's run dir. A fresh sysfs
// (so /sys/class/net shows this capsule's links) hides the host's cgroup mounts, which runc
// needs; they are noted first and mounted again: mounting a hierarchy with the same
// options attaches the host's existing one, so the capsule sees the real cgroup tree.
// $2, when not empty, is the lab's resolv.conf for this namespace (/etc/netns/<ns>/resolv.conf,
// what `ip netns exec` would bind): bound first, while /etc/resolv.conf still resolves on the host's /run.
const MNTNS_SCRIPT = [
  "umount -l /run/netns 2>/dev/null",
  'if [ -n "$2" ]; then mount --bind "$2" /etc/resolv.conf || exit 1; fi',
  'mount --bind "$1" /run || exit 1',
  'cg=$(awk \'$3=="cgroup"||$3=="cgroup2"{print $3, $2, $4}\' /proc/self/mounts)',
  'tmp=$(awk \'$2=="/sys/fs/cgroup"&&$3=="tmpfs"{print 1}\' /proc/self/mounts)',
  "mount -t sysfs sysfs /sys || exit 1",
  'if [ -n "$tmp" ]; then mount -t tmpfs -o mode=755 cgroup /sys/fs/cgroup || exit 1; fi',
  'echo "$cg" | while read -r t d o; do [ -z "$t" ] || { mkdir -p "$d" && mount -t "$t" -o "$o" "$t" "$d"; } || exit 1; done || exit 1',
  "mkdir -p /run/wireguard",
].join("\n");

/** mountNsCommands creates and pins a capsule's mount namespace (pure; run only when the pin is not mounted). */
export function mountNsCommands(c: CapsulePlan): LabCommand[] {
  return [
    { argv: ["touch", c.mntns] },
    {
      argv: [
        "nsenter",
        `--net=${netnsPath(c.ns)}`,
        "unshare",
        `--mount=${c.mntns}`,
        "--propagation",
        "private",
        "sh",
        "-c",
        MNTNS_SCRIPT,
        "capsule-lab",
        c.runDir,
        c.resolvFile ?? "",
      ],
    },
  ];
}

/** resolvBindCommand binds the lab's resolv.conf over /etc/resolv.conf in a capsule's existing mount namespace (pure). */
export function resolvBindCommand(c: CapsulePlan & { resolvFile: string }): LabCommand {
  return { argv: ["nsenter", `--mount=${c.mntns}`, "mount", "--bind", c.resolvFile, "/etc/resolv.conf"] };
}

// Detached start: new session (so its process group is its pid), output to the log, pid to the pid file.
const START_SCRIPT = 'exec >>"$2" 2>&1 </dev/null; echo $$ >"$1"; shift 2; exec "$@"';

/**
 * startCommand starts a lab process detached inside its namespaces (pure). NODE_OPTIONS is
 * dropped so a test runner's loaders never leak into capsuled.
 */
export function startCommand(c: LabProcess): LabCommand {
  return {
    argv: [
      ...enterArgv(c),
      "setsid",
      "-f",
      "sh",
      "-c",
      START_SCRIPT,
      "capsule-lab",
      c.pidFile,
      c.logFile,
      "env",
      "-u",
      "NODE_OPTIONS",
      ...Object.entries(c.env ?? {}).map(([k, v]) => `${k}=${v}`),
      ...c.argv,
    ],
  };
}

/** tcpProbeArgv connects from the operator namespace to `host:port` and exits 0 when it connected. */
export function tcpProbeArgv(plan: LabPlan, host: string, port: number, timeoutSec = 2): string[] {
  return [
    "ip",
    "netns",
    "exec",
    `${plan.prefix}-op`,
    "timeout",
    String(timeoutSec),
    "bash",
    "-c",
    'exec 3<>"/dev/tcp/$0/$1"',
    host,
    String(port),
  ];
}

/** pidInNs returns true when process `pid` lives in network namespace `ns`. */
export async function pidInNs(runner: CommandRunner, pid: number, ns: string): Promise<boolean> {
  const r = await runner.run(["ip", "netns", "identify", String(pid)], { allowFailure: true });
  return r.exitCode === 0 && r.stdout.split(/\s+/).includes(ns);
}

/** processPid reads a lab process's pid file and returns the pid if that process is alive in its namespace. */
export async function processPid(runner: CommandRunner, c: LabProcess): Promise<number | undefined> {
  const r = await runner.run(["cat", c.pidFile], { allowFailure: true });
  const pid = Number.parseInt(r.stdout.trim(), 10);
  if (r.exitCode !== 0 || !Number.isInteger(pid) || pid <= 1) return undefined;
  return (await pidInNs(runner, pid, c.ns)) ? pid : undefined;
}

/** logTail returns the last lines of a lab process's log ("" when unreadable). */
export async function logTail(runner: CommandRunner, c: LabProcess, lines = 15): Promise<string> {
  const r = await runner.run(["tail", "-n", String(lines), c.logFile], { allowFailure: true });
  return r.exitCode === 0 ? r.stdout.trimEnd() : "";
}

/**
 * ensureDirs makes the mnt dir and every capsule's run and state dirs. Idempotent. The operator
 * dir is left to capsulectl, which creates it with the mode it wants.
 */
export async function ensureDirs(runner: CommandRunner, plan: LabPlan): Promise<void> {
  await runner.run(["mkdir", "-p", plan.mntDir, ...plan.capsules.flatMap((c) => [c.runDir, c.stateDir])]);
}

/**
 * ensureMountNamespaces pins the private mnt dir and every capsule's mount namespace that is not
 * pinned yet, and gives an already pinned one whose /etc/resolv.conf is not the planned one (a
 * lab made before it had DNS) the lab's resolv.conf. Idempotent: on a lab that is up it only reads.
 */
export async function ensureMountNamespaces(runner: CommandRunner, plan: LabPlan): Promise<void> {
  const mounts = await listMounts(runner);
  const cmds: LabCommand[] = [];
  if (!mounts.has(plan.mntDir)) cmds.push(...mountDirCommands(plan));
  for (const c of plan.capsules) {
    if (!mounts.has(c.mntns)) {
      cmds.push(...mountNsCommands(c));
      continue;
    }
    const want = plan.nodes.find((n) => n.ns === c.ns)?.resolvConf;
    if (c.resolvFile === undefined || want === undefined) continue;
    const have = await runner.run(["nsenter", `--mount=${c.mntns}`, "cat", "/etc/resolv.conf"], {
      allowFailure: true,
    });
    if (have.stdout !== want) cmds.push(resolvBindCommand({ ...c, resolvFile: c.resolvFile }));
  }
  for (const cmd of cmds) await runner.run(cmd.argv);
}

/**
 * stopDaemon stops a lab process's process group: SIGTERM, then SIGKILL after 5 s. Bounded; a
 * process that is already gone is fine.
 */
export async function stopDaemon(
  runner: CommandRunner,
  clock: Clock,
  c: LabProcess,
  pid: number,
): Promise<void> {
  for (const sig of ["TERM", "KILL"]) {
    await runner.run(["kill", "-s", sig, "--", `-${pid}`], { allowFailure: true });
    const deadline = clock.now() + 5_000;
    while ((await processPid(runner, c)) !== undefined) {
      if (clock.now() >= deadline) break;
      await clock.sleep(50);
    }
    if ((await processPid(runner, c)) === undefined) return;
  }
}

/**
 * ensureDaemon starts a lab process (a capsule's daemon, a CA service) unless it is already running with the planned argv;
 * returns its pid. `runningArgv` is the argv the running process was started with (from the
 * state file; unset = unknown, taken as current): when it differs from the plan (say the
 * management address moved) the process is stopped and started again. Idempotent.
 */
export async function ensureDaemon(
  runner: CommandRunner,
  clock: Clock,
  c: LabProcess,
  runningArgv?: readonly string[],
): Promise<{ pid: number; started: boolean }> {
  const running = await processPid(runner, c);
  if (running !== undefined) {
    const current = runningArgv === undefined || runningArgv.join("\0") === c.argv.join("\0");
    if (current) return { pid: running, started: false };
    await stopDaemon(runner, clock, c, running);
  }
  await runner.run(["rm", "-f", c.pidFile]);
  const cmd = startCommand(c);
  await runner.run(cmd.argv);
  const deadline = clock.now() + 5_000;
  for (;;) {
    const pid = await processPid(runner, c);
    if (pid !== undefined) return { pid, started: true };
    if (clock.now() >= deadline) {
      const tail = await logTail(runner, c);
      throw new CapsuleError(
        ErrorCode.Timeout,
        `${c.name}: the process did not start (no live pid in ${c.pidFile})`,
        {
          hint: `see ${c.logFile}${tail ? `:\n${tail}` : ""}`,
        },
      );
    }
    await clock.sleep(50);
  }
}

/**
 * waitListening polls a TCP connect from the operator namespace to the capsule's API until it
 * succeeds, the process dies, or `timeoutMs` passes; the error names the log file and quotes its tail.
 */
export async function waitListening(
  runner: CommandRunner,
  clock: Clock,
  plan: LabPlan,
  c: CapsulePlan,
  timeoutMs: number,
): Promise<void> {
  const deadline = clock.now() + timeoutMs;
  for (;;) {
    const probe = await runner.run(tcpProbeArgv(plan, c.mgmtAddress, plan.apiPort), { allowFailure: true });
    if (probe.exitCode === 0) return;
    const alive = (await processPid(runner, c)) !== undefined;
    if (!alive || clock.now() >= deadline) {
      const tail = await logTail(runner, c);
      const why = alive ? `is not listening on ${c.api} after ${timeoutMs} ms` : "exited before listening";
      throw new CapsuleError(ErrorCode.Timeout, `${c.name}: ${plan.daemon} ${why}`, {
        hint: `see ${c.logFile}${tail ? `:\n${tail}` : ""}`,
        details: { capsule: c.name, log: c.logFile },
      });
    }
    await clock.sleep(100);
  }
}

/** isListening reports whether a TCP connect from the operator namespace to the capsule's API succeeds. */
export async function isListening(runner: CommandRunner, plan: LabPlan, c: CapsulePlan): Promise<boolean> {
  return (
    (await runner.run(tcpProbeArgv(plan, c.mgmtAddress, plan.apiPort, 1), { allowFailure: true }))
      .exitCode === 0
  );
}
