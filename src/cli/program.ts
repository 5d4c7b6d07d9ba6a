/**
 * The capsulectl command tree (commander) and {@link run}, which drives it for one argv and
 * returns the exit code: 0 success, 1 an error (or any failed target), 2 a usage error.
 */
import { existsSync, readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { Command, CommanderError, InvalidArgumentError, Option } from "commander";
import { formatError, toCapsuleError } from "../errors.js";
import { adopt } from "./commands/adopt.js";
import { capsuleInfo } from "./commands/capsule.js";
import { contextDelete, contextList, contextShow, contextUse } from "./commands/context.js";
import {
  fabricEnroll,
  fabricInventory,
  fabricPeers,
  fabricRepool,
  fabricRotateKey,
  fabricStatus,
  fabricUnenroll,
} from "./commands/fabric.js";
import {
  DEFAULT_PULL_TIMEOUT_MS,
  DEFAULT_PUSH_TIMEOUT_MS,
  imageList,
  imagePull,
  imagePush,
} from "./commands/image.js";
import { operatorAdd, operatorList, operatorRemove, operatorWhoami } from "./commands/operator.js";
import {
  policyApply,
  policyDelete,
  policyExplain,
  policyList,
  policyShow,
  policyTest,
} from "./commands/policy.js";
import { volumeCreate, volumeDelete, volumeList } from "./commands/volume.js";
import { edgeList } from "./commands/edge.js";
import { expose, type ExposeFlags, unexpose, type UnexposeFlags } from "./commands/expose.js";
import {
  apply,
  type LifecycleVerb,
  workloadDelete,
  workloadExec,
  workloadGet,
  workloadLifecycle,
  workloadList,
  workloadLogs,
} from "./commands/workload.js";
import { parseDuration } from "./duration.js";
import { OUTPUT_FORMATS, type OutputFormat } from "./output.js";
import { type CliIO, defaultIO, type GlobalOptions, Session } from "./session.js";

/** EXIT_USAGE is the exit code of a usage error (unknown command or flag, bad flag value). */
export const EXIT_USAGE = 2;

/** cliVersion is the package version, read from the package.json above this file (src/ or dist/src/). */
export function cliVersion(): string {
  let dir = dirname(fileURLToPath(import.meta.url));
  while (dir !== dirname(dir)) {
    const p = join(dir, "package.json");
    if (existsSync(p))
      return String((JSON.parse(readFileSync(p, "utf8")) as { version?: string }).version ?? "0.0.0");
    dir = dirname(dir);
  }
  return "0.0.0";
}

/** durationArg parses a duration flag ("10s", "2m") for commander, naming only the problem and fix. */
function durationArg(flag: string) {
  return (v: string): number => {
    try {
      return parseDuration(v, flag);
    } catch (e) {
      // commander names the option itself; keep only the problem and the fix.
      const ce = toCapsuleError(e);
      const problem = ce.message.replace(new RegExp(`^${flag}: `), "");
      throw new InvalidArgumentError(ce.hint ? `${problem}; ${ce.hint}` : problem);
    }
  };
}

/** countArg parses a non-negative integer flag (--tail). */
function countArg(v: string): number {
  if (!/^\d+$/.test(v)) throw new InvalidArgumentError("not a whole number of lines");
  return Number(v);
}

interface RawGlobals {
  capsule?: string;
  all?: boolean;
  output: OutputFormat;
  configDir?: string;
  timeout: number;
}

/**
 * buildProgram builds a fresh command tree bound to `io`; `state.exitCode` receives the exit
 * code the commands chose. A fresh tree per run keeps runs independent (tests run many).
 */
export function buildProgram(io: CliIO, state: { exitCode: number }): Command {
  const program = new Command("capsulectl");
  const session = (cmd: Command): Session => {
    const g = cmd.optsWithGlobals<RawGlobals>();
    const globals: GlobalOptions = {
      capsule: g.capsule,
      all: g.all,
      output: g.output,
      configDir: g.configDir,
      timeoutMs: g.timeout,
    };
    return new Session(io, globals);
  };
  // Every action gets its Session from its own Command (the last argument commander passes).
  const act =
    (fn: (s: Session, ...args: never[]) => Promise<void>) =>
    async (...args: unknown[]): Promise<void> => {
      const cmd = args[args.length - 1] as Command;
      const s = session(cmd);
      await (fn as (s: Session, ...a: unknown[]) => Promise<void>)(s, ...args.slice(0, -1));
      state.exitCode = Math.max(state.exitCode, s.exitCode);
    };

  program
    .description(
      "Control capsules: adopt them, inspect them, join them in a fabric, run workloads, manage operator keys.",
    )
    .version(cliVersion(), "-V, --version", "print the version")
    .helpOption("-h, --help", "show help")
    .addOption(
      new Option(
        "--capsule <targets>",
        "comma list of context names, HOST:PORTs or $CAPSULE_HOST (default: current context)",
      ),
    )
    .addOption(new Option("--all", "run against every context").conflicts("capsule"))
    .addOption(new Option("-o, --output <format>", "output format").choices(OUTPUT_FORMATS).default("table"))
    .addOption(
      new Option("--config-dir <dir>", "config dir (default: $CAPSULE_CONFIG_DIR, else ~/.config/capsule)"),
    )
    .addOption(
      new Option("--timeout <duration>", "per-capsule deadline, e.g. 10s, 1m")
        .default(10_000, "10s")
        .argParser(durationArg("--timeout")),
    )
    .exitOverride()
    .configureOutput({
      writeOut: (str) => io.stdout.write(str),
      writeErr: (str) => io.stderr.write(str),
    })
    .showHelpAfterError("hint: add --help for usage")
    .showSuggestionAfterError(true);

  program
    .command("adopt")
    .description(
      "pin a capsule's key (trust on first use) and enroll your operator key during its claim window",
    )
    .argument("<host:port>", "the capsule's API address")
    .requiredOption("--name <name>", "context name for the capsule")
    .option("--fingerprint <fp>", "expected key fingerprint SHA256:...; a mismatch refuses")
    .option("--yes", "trust the presented key without asking")
    .option("--operator-name <name>", "label for your key on the capsule (default: $USER@hostname)")
    .action(
      act(
        (
          s,
          address: string,
          opts: { name: string; fingerprint?: string; yes?: boolean; operatorName?: string },
        ) => adopt(s, address, opts),
      ),
    );

  const context = program.command("context").description("list and choose pinned capsules (local, no RPC)");
  context
    .command("list")
    .description("list contexts; * marks the current one")
    .action(act((s) => contextList(s)));
  context
    .command("use")
    .description("make NAME the current context")
    .argument("<name>")
    .action(act((s, name: string) => contextUse(s, name)));
  context
    .command("show")
    .description("show a context (default: the current one)")
    .argument("[name]")
    .action(act((s, name: string | undefined) => contextShow(s, name)));
  context
    .command("delete")
    .description("forget a context and its pinned key")
    .argument("<name>")
    .action(act((s, name: string) => contextDelete(s, name)));

  const capsule = program.command("capsule").description("inspect capsules");
  capsule
    .command("info")
    .description("name, id, version, fabric address, uptime, kernel, WireGuard mode")
    .action(act((s) => capsuleInfo(s)));

  const fabric = program.command("fabric").description("the WireGuard mesh between capsules");
  fabric
    .command("enroll")
    .description("enroll two capsules with each other (either order); a refused enroll changes nothing")
    .argument("<a>", "context name of one capsule")
    .argument("<b>", "context name of the other")
    .action(act((s, a: string, b: string) => fabricEnroll(s, a, b)));
  fabric
    .command("unenroll")
    .description("remove two capsules from each other (both sides)")
    .argument("<a>", "context name of one capsule")
    .argument("<b>", "context name of the other")
    .action(act((s, a: string, b: string) => fabricUnenroll(s, a, b)));
  fabric
    .command("status")
    .description("peers with endpoint, handshake age, rx/tx and relay, wg-style")
    .action(act((s) => fabricStatus(s)));
  fabric
    .command("peers")
    .description("enrolled peers: address, endpoint, relay, key")
    .action(act((s) => fabricPeers(s)));
  fabric
    .command("rotate-key")
    .description("make a new WireGuard key and hand it to every peer")
    .action(act((s) => fabricRotateKey(s)));
  fabric
    .command("repool")
    .description("move a capsule with no peers and no workloads to a free address pool")
    .action(act((s) => fabricRepool(s)));
  fabric
    .command("inventory")
    .description("addresses on the fabric: this capsule's and its peers' as last received")
    .action(act((s) => fabricInventory(s)));

  const image = program.command("image").description("the images in a capsule's image store");
  image
    .command("push")
    .description("stream an OCI-layout or docker-save archive into each capsule's image store")
    .argument("<archive>", "the .tar archive")
    .addOption(
      new Option("--push-timeout <duration>", "bound on each capsule's whole push")
        .default(DEFAULT_PUSH_TIMEOUT_MS, "10m")
        .argParser(durationArg("--push-timeout")),
    )
    .action(
      act((s, archive: string, opts: { pushTimeout: number }) =>
        imagePush(s, archive, { timeoutMs: opts.pushTimeout }),
      ),
    );
  image
    .command("pull")
    .description("have each capsule pull an image by reference from a registry it can reach")
    .argument("<ref>", "[REGISTRY/]NAME:TAG")
    .option("--plain-http", "the registry speaks plain HTTP (a LAN registry without TLS)")
    .addOption(
      new Option("--pull-timeout <duration>", "bound on each capsule's pull (a longer --timeout wins)")
        .default(DEFAULT_PULL_TIMEOUT_MS, "10m30s")
        .argParser(durationArg("--pull-timeout")),
    )
    .action(
      act((s, ref: string, opts: { plainHttp?: boolean; pullTimeout: number }) =>
        imagePull(s, ref, { plainHttp: opts.plainHttp === true, timeoutMs: opts.pullTimeout }),
      ),
    );
  image
    .command("list")
    .description("images: reference, digest, size")
    .action(act((s) => imageList(s)));

  program
    .command("apply")
    .description(
      "create or update workloads and policies from manifests (idempotent; policies first); validated locally first",
    )
    .requiredOption("-f, --filename <path>", "a manifest file, or a directory of *.yaml, *.yml, *.json")
    .option("--wait", "wait until every applied workload runs; fail on failed/backoff")
    .option("--dry-run", "validate on the capsule and report what would change, changing nothing")
    .addOption(
      new Option("--wait-timeout <duration>", "bound on --wait")
        .default(120_000, "2m")
        .argParser(durationArg("--wait-timeout")),
    )
    .action(
      act((s, opts: { filename: string; wait?: boolean; dryRun?: boolean; waitTimeout: number }) =>
        apply(s, {
          file: opts.filename,
          wait: opts.wait,
          dryRun: opts.dryRun,
          waitTimeoutMs: opts.waitTimeout,
        }),
      ),
    );

  const workload = program.command("workload").description("containers and microVMs on the fabric");
  workload
    .command("list")
    .description("workloads: phase, fabric address, image, restarts, age")
    .action(act((s) => workloadList(s)));
  workload
    .command("get")
    .description("one workload: status, fabric address, ports, latest events")
    .argument("<name>")
    .action(act((s, name: string) => workloadGet(s, name)));
  for (const [verb, what] of [
    ["start", "start a stopped workload"],
    ["stop", "stop a workload (it stays stopped until started)"],
    ["restart", "restart a workload"],
  ] as [LifecycleVerb, string][]) {
    workload
      .command(verb)
      .description(what)
      .argument("<name>")
      .action(act((s, name: string) => workloadLifecycle(s, verb, name)));
  }
  workload
    .command("delete")
    .description("delete a workload (idempotent); its volumes stay")
    .argument("<name>")
    .action(act((s, name: string) => workloadDelete(s, name)));
  workload
    .command("logs")
    .description("print a workload's output; -f follows until Ctrl-C")
    .argument("<name>")
    .option("-f, --follow", "keep streaming new output until Ctrl-C")
    .option("--tail <lines>", "start with the last N lines (default: all)", countArg)
    .action(act((s, name: string, opts: { follow?: boolean; tail?: number }) => workloadLogs(s, name, opts)));
  workload
    .command("exec")
    .description("run a command in a workload; exits with its exit code")
    .argument("<name>")
    .argument("<cmd...>", "the command and its arguments, after --")
    .option("-t, --tty", "allocate a terminal for the command (raw mode with -i on a terminal)")
    .option("-i, --stdin", "pass stdin to the command")
    .addOption(
      new Option("--exec-timeout <duration>", "bound on the command (without -t/-i)")
        .default(60_000, "60s")
        .argParser(durationArg("--exec-timeout")),
    )
    .action(
      act((s, name: string, cmd: string[], opts: { tty?: boolean; stdin?: boolean; execTimeout: number }) =>
        workloadExec(s, name, cmd, { tty: opts.tty, stdin: opts.stdin, timeoutMs: opts.execTimeout }),
      ),
    );

  const volume = program.command("volume").description("persistent volumes for workloads");
  volume
    .command("create")
    .description("create a volume")
    .argument("<name>")
    .requiredOption("--size <size>", "bytes or a unit: 100M, 512Mi, 1Gi (16Mi to 16Ti)")
    .action(act((s, name: string, opts: { size: string }) => volumeCreate(s, name, opts.size)));
  volume
    .command("list")
    .description("volumes: size, backend, the workload using each")
    .action(act((s) => volumeList(s)));
  volume
    .command("delete")
    .description("delete a volume no workload uses (idempotent)")
    .argument("<name>")
    .action(act((s, name: string) => volumeDelete(s, name)));

  program
    .command("expose")
    .description(
      "publish a workload at an edge: HTTPS by host name (ACME certificate), TLS passthrough by SNI, or raw TCP",
    )
    .argument("<workload>", "a workload on the target capsule")
    .requiredOption("--edge <edge>", "the edge capsule's name")
    .option("--host <name>", "the DNS name visitors use (pointed at the edge's public address)")
    .option("--port <port>", "the workload's port")
    .option(
      "--passthrough",
      "route TLS by SNI to the workload without terminating it (it has its own certificate)",
    )
    .option("--tcp <public:port>", "raw TCP: the edge's public port and the workload's port (e.g. 2222:22)")
    .action(act((s, workload: string, opts: ExposeFlags) => expose(s, workload, opts)));
  program
    .command("unexpose")
    .description("stop publishing a workload at an edge, and drop its allow rule (idempotent)")
    .argument("<workload>")
    .requiredOption("--edge <edge>", "the edge capsule's name")
    .option("--host <name>", "the exposed host name")
    .option("--tcp <public>", "the exposed public TCP port")
    .action(act((s, workload: string, opts: UnexposeFlags) => unexpose(s, workload, opts)));
  const edge = program.command("edge").description("routes at edges");
  edge
    .command("list")
    .description(
      "routes (on an edge) or exposures: host or port, workload, capsule, upstream, certificate, health",
    )
    .action(act((s) => edgeList(s)));

  const policy = program
    .command("policy")
    .description("allow rules between workloads on the fabric (with none, nothing reaches a workload)");
  policy
    .command("apply")
    .description("create or replace policies; every test must pass or nothing changes (idempotent)")
    .requiredOption("-f, --filename <path>", "a manifest file, or a directory of *.yaml, *.yml, *.json")
    .option("--dry-run", "validate and run the tests on the capsule, changing nothing")
    .action(
      act((s, opts: { filename: string; dryRun?: boolean }) =>
        policyApply(s, { file: opts.filename, dryRun: opts.dryRun }),
      ),
    );
  policy
    .command("test")
    .description("run the tests of these policies and of the stored ones against their union; stores nothing")
    .requiredOption("-f, --filename <path>", "a manifest file, or a directory of *.yaml, *.yml, *.json")
    .action(act((s, opts: { filename: string }) => policyTest(s, opts.filename)));
  policy
    .command("show")
    .description(
      "per workload, the allow rules in force, their sources and origin; selectors that match nothing",
    )
    .action(act((s) => policyShow(s)));
  policy
    .command("explain")
    .description("would SRC reach DST on PORT/PROTO, and by which rule (judged by DST's capsule)")
    .argument("<src>", "workload name or fabric address")
    .argument("<dst>", "workload name or fabric address")
    .argument("<port>", "N/tcp, N/udp or icmp")
    .action(act((s, src: string, dst: string, port: string) => policyExplain(s, src, dst, port)));
  policy
    .command("list")
    .description("stored policies: rules, tests, last update")
    .action(act((s) => policyList(s)));
  policy
    .command("delete")
    .description("delete a policy (idempotent); what it allowed is denied again")
    .argument("<name>")
    .action(act((s, name: string) => policyDelete(s, name)));

  const operator = program.command("operator").description("manage the operator keys a capsule accepts");
  operator
    .command("list")
    .description("list operator keys")
    .action(act((s) => operatorList(s)));
  operator
    .command("add")
    .description("add an operator's public key")
    .argument("<name>", "label for the key")
    .requiredOption(
      "--public-key-file <file>",
      "Ed25519 public key: JWK JSON, `operator whoami -o json` output, or PEM",
    )
    .action(
      act((s, name: string, opts: { publicKeyFile: string }) => operatorAdd(s, name, opts.publicKeyFile)),
    );
  operator
    .command("remove")
    .description("remove an operator key by id")
    .argument("<id>")
    .action(act((s, id: string) => operatorRemove(s, id)));
  operator
    .command("whoami")
    .description("print your operator key id and public key (creates the key on first use)")
    .action(act((s) => operatorWhoami(s)));

  return program;
}

/**
 * run executes capsulectl for `argv` (the arguments after the program name) and resolves with
 * the exit code; it never throws and never exits the process. `io` fields default to the real
 * process (see defaultIO), so tests pass only what they fake.
 */
export async function run(argv: string[], io: Partial<CliIO> = {}): Promise<number> {
  const full: CliIO = { ...defaultIO(), ...io };
  const state = { exitCode: 0 };
  const program = buildProgram(full, state);
  try {
    await program.parseAsync(argv, { from: "user" });
    return state.exitCode;
  } catch (e) {
    if (e instanceof CommanderError) {
      // --help and --version end through exitOverride too, with exit code 0.
      if (e.code === "commander.helpDisplayed" || e.code === "commander.version") return 0;
      return e.exitCode === 0 ? 0 : EXIT_USAGE;
    }
    full.stderr.write(`${formatError(e)}\n`);
    return 1;
  }
}
