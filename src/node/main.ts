#!/usr/bin/env -S node --optimize-for-size --max-semi-space-size=1
import { Command } from "commander";
import { formatError } from "../errors.js";
import { type DaemonFlags, resolveConfig } from "./config.js";
import { fingerprintOfStateDir } from "./identity.js";
import { startAgent, VERSION } from "./root.js";

const program = new Command("capsuled")
  .description("Capsule node agent")
  .version(VERSION)
  .enablePositionalOptions()
  .option("--name <name>", "capsule name (default: the host name)")
  .option("--state-dir <dir>", "state directory", "/var/lib/capsule")
  .option("--listen <host:port>", "API address (TLS 1.3)", "0.0.0.0:50000")
  .option("--fabric-iface <iface>", "WireGuard fabric interface", "capsule0")
  .option("--fabric-port <port>", "WireGuard UDP port", "51820")
  .option("--endpoint <host:port>", "address peers dial for WireGuard (omit when behind NAT)")
  .option("--claim-window <duration>", "how long a fresh capsule may be claimed", "30m")
  .option("--metrics <host:port>", "serve Prometheus metrics on this address")
  .option("--log-level <level>", "trace|debug|info|warn|error", "info")
  .option("--edge", "run Caddy and serve as an edge")
  .option("--acme-ca <url|internal>", "ACME directory URL, or internal for Caddy's own CA")
  .option("--acme-ca-root <file>", "PEM file of extra roots to trust for the ACME CA (labs, LANs)")
  .option("--acme-email <email>", "ACME account contact")
  .option("--public-address <ip>", "address visitors reach (default: the --endpoint address)")
  .option("--no-fabric", "serve the API only: no WireGuard interface (tests, hosts without WireGuard)")
  .action(async (flags: DaemonFlags) => {
    const config = resolveConfig(flags);
    const agent = await startAgent(config);
    process.stderr.write(
      `capsuled ${config.name} (${agent.identity.id}) fingerprint ${agent.identity.fingerprint}\n`,
    );
    if (agent.identity.created || agent.store.operatorCount() === 0) {
      process.stderr.write(
        `claim window open for ${flags.claimWindow ?? "30m"} from first start: capsulectl adopt HOST:${agent.port} --name ${config.name} --fingerprint ${agent.identity.fingerprint}\n`,
      );
    }
    let stopping = false;
    const stop = async (signal: string) => {
      if (stopping) return;
      stopping = true;
      process.stderr.write(`capsuled: ${signal}, stopping (workloads keep running)\n`);
      await agent.stop();
      process.exit(0);
    };
    process.on("SIGTERM", () => void stop("SIGTERM"));
    process.on("SIGINT", () => void stop("SIGINT"));
  });

program
  .command("fingerprint")
  .description("print this capsule's TLS fingerprint")
  .requiredOption("--state-dir <dir>", "state directory")
  .action((o: { stateDir: string }) => {
    process.stdout.write(`${fingerprintOfStateDir(o.stateDir)}\n`);
  });

program.parseAsync(process.argv).catch((e: unknown) => {
  process.stderr.write(`${formatError(e)}\n`);
  process.exit(1);
});
