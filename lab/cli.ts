#!/usr/bin/env node
/**
 * `lab`: the multi-capsule lab on this machine.
 *
 *   lab up [--prefix P] [--homes N] [--capsules-per-home N] [--no-edge] [--no-ca] [--port-forward SPEC]...
 *   lab down | status [-o json] | exec NAME -- CMD... | ctl -- CAPSULECTL-ARGS...
 *
 * `npm run lab -- up` runs it from the checkout.
 */
import { spawn } from "node:child_process";
import { Command, Option } from "commander";
import { formatError } from "../src/errors.js";
import {
  capsulectl,
  formatStatus,
  labDown,
  labExecArgv,
  labPlan,
  labStatus,
  labUp,
  readLabState,
} from "./lab.js";
import { ExecaRunner } from "../src/node/host/runner.js";
import { defaultLabDir, type PortForward, parsePortForward, planLab } from "./plan.js";

interface Common {
  prefix: string;
  labDir?: string;
}

function sel(o: Common) {
  return { prefix: o.prefix, labDir: o.labDir ?? defaultLabDir(o.prefix) };
}

// With passThroughOptions commander hands over the "--" that separates our options from the command.
function stripDashes(args: string[]): string[] {
  return args[0] === "--" ? args.slice(1) : args;
}

const program = new Command("lab")
  .description("a multi-capsule network (edge, homes behind NAT, internet client, operator) on this machine")
  .enablePositionalOptions();

const prefixOpt = () =>
  new Option("--prefix <prefix>", "lab prefix (namespaces are <prefix>-...)").default(
    process.env.CAPSULE_LAB_PREFIX || "cl",
  );
const dirOpt = () => new Option("--lab-dir <dir>", "lab dir (default /tmp/capsule-lab-<prefix>)");

program
  .command("up")
  .description("bring the lab up (idempotent) and adopt every capsule into <lab-dir>/operator")
  .addOption(prefixOpt())
  .addOption(dirOpt())
  .option("--homes <n>", "home networks behind NAT (0-8)", "2")
  .option("--capsules-per-home <n>", "capsules on each home LAN", "1")
  .option("--no-edge", "leave out the edge capsule")
  .option("--no-ca", "leave out the lab CA and DNS (<prefix>-ca); the edge then uses --acme-ca internal")
  .option(
    "--port-forward <spec>",
    "DNAT on a home router: HOME:tcp|udp:PORT[:CAPSULE[:TOPORT]]",
    parsePortForward,
  )
  .addOption(
    new Option("--daemon <kind>", "what each capsule runs")
      .choices(["capsuled", "stand-in"])
      .default("capsuled"),
  )
  .option("--no-adopt", "do not adopt the capsules")
  .option("--timeout <ms>", "wait for each capsule's API at most this long", "20000")
  .action(
    async (
      o: Common & {
        homes: string;
        capsulesPerHome: string;
        edge: boolean;
        ca: boolean;
        portForward?: PortForward[];
        daemon: "capsuled" | "stand-in";
        adopt: boolean;
        timeout: string;
      },
    ) => {
      const r = await labUp(
        {
          ...sel(o),
          homes: Number(o.homes),
          capsulesPerHome: Number(o.capsulesPerHome),
          edge: o.edge,
          // Unset = the planner's default (a CA when there is an edge).
          ...(o.ca ? {} : { ca: false }),
          portForwards: o.portForward ?? [],
          daemon: o.daemon,
          adopt: o.adopt,
          startTimeoutMs: Number(o.timeout),
        },
        { log: (l) => process.stderr.write(`lab: ${l}\n`) },
      );
      process.stdout.write(formatStatus(await labStatus(sel(o))));
      process.stderr.write(`lab: up in ${(r.elapsedMs / 1000).toFixed(1)} s\n`);
    },
  );

program
  .command("down")
  .description("remove every namespace, process, mount and file of the lab (works after a crashed up)")
  .addOption(prefixOpt())
  .addOption(dirOpt())
  .action(async (o: Common) => {
    const r = await labDown(sel(o), { log: (l) => process.stderr.write(`lab: ${l}\n`) });
    if (r.leftovers.length) {
      process.stderr.write(`lab: left behind: ${r.leftovers.join(", ")}\n`);
      process.exitCode = 1;
    }
  });

program
  .command("status")
  .description("print every lab node: role, namespace, addresses, capsuled (or CA) liveness, log")
  .addOption(prefixOpt())
  .addOption(dirOpt())
  .addOption(new Option("-o, --output <format>", "table or json").choices(["table", "json"]).default("table"))
  .action(async (o: Common & { output: string }) => {
    const s = await labStatus(sel(o));
    process.stdout.write(o.output === "json" ? `${JSON.stringify(s, null, 2)}\n` : formatStatus(s));
    if (!s.found) process.exitCode = 1;
  });

program
  .command("exec")
  .description(
    "run CMD inside a lab node: a capsule (net + mount namespace), client, op, inet, homeA-rtr, ...",
  )
  .addOption(prefixOpt())
  .addOption(dirOpt())
  .argument("<name>", "capsule or node name")
  .argument("<cmd...>", "command and arguments (after --)")
  .passThroughOptions()
  .action(async (name: string, cmd: string[], o: Common) => {
    const state = await readLabState(new ExecaRunner(), sel(o).labDir);
    const plan = state ? planLab(state.options) : labPlan(sel(o));
    const argv = labExecArgv(plan, name, stripDashes(cmd));
    // Interactive passthrough: stdio is the user's terminal, so this one spawn bypasses the runner.
    const child = spawn(argv[0]!, argv.slice(1), { stdio: "inherit" });
    const code = await new Promise<number>((resolve) => {
      child.on("error", (e) => {
        process.stderr.write(`${formatError(e)}\n`);
        resolve(127);
      });
      child.on("exit", (c, s) => resolve(c ?? (s ? 128 : 1)));
    });
    process.exitCode = code;
  });

program
  .command("ctl")
  .description("run capsulectl as the lab's operator (inside <prefix>-op, --config-dir <lab-dir>/operator)")
  .addOption(prefixOpt())
  .addOption(dirOpt())
  .argument("<args...>", "capsulectl arguments (after --)")
  .passThroughOptions()
  .action(async (args: string[], o: Common) => {
    const r = await capsulectl(stripDashes(args), sel(o));
    process.stdout.write(r.stdout);
    process.stderr.write(r.stderr);
    process.exitCode = r.exitCode;
  });

program.parseAsync(process.argv).catch((e: unknown) => {
  process.stderr.write(`${formatError(e)}\n`);
  process.exitCode = 1;
});
