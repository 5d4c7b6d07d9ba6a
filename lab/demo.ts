#!/usr/bin/env node
/**
 * `npm run demo`: bring the lab up, show it, and ask every capsule who it is as the operator.
 * The lab is left running; `npm run lab -- down` removes it.
 */
import { formatError } from "../src/errors.js";
import { capsulectl, formatStatus, labStatus, labUp } from "./lab.js";

const say = (s = "") => process.stdout.write(`${s}\n`);

async function main(): Promise<void> {
  say(
    "Bringing up the lab: an edge on the internet, two homes behind NAT, a visitor and the operator's laptop.",
  );
  const up = await labUp({}, { log: (l) => say(`  ${l}`) });
  const { plan } = up;
  say(`Lab up in ${(up.elapsedMs / 1000).toFixed(1)} s.`);
  say();
  say("$ npm run lab -- status");
  process.stdout.write(formatStatus(await labStatus({ prefix: plan.prefix, labDir: plan.labDir })));
  say();
  say(`$ ip netns exec ${plan.prefix}-op capsulectl --config-dir ${plan.operatorDir} --all capsule info`);
  const info = await capsulectl(["--all", "capsule", "info"], { prefix: plan.prefix, labDir: plan.labDir });
  process.stdout.write(info.stdout);
  process.stderr.write(info.stderr);
  if (info.exitCode !== 0) process.exitCode = info.exitCode;
  say();
  say("What you are looking at:");
  say(`  - each capsule runs its own capsuled in its own network and mount namespace (private /run);`);
  say(
    `  - the operator (${plan.prefix}-op) reaches each one over a point-to-point 203.0.113.x/30 admin link;`,
  );
  say(
    `  - home capsules sit behind NAT routers (198.51.100.x LANs): the internet (192.0.2.0/24) cannot reach them.`,
  );
  say();
  say(
    "What comes next (later issues): enroll the capsules into the WireGuard fabric (capsulectl fabric enroll),",
  );
  say("run workloads (capsulectl apply), allow traffic with policies, and publish a workload at the edge");
  say("(capsulectl expose ... --edge edge) for the visitor in the client namespace.");
  say();
  say("Try it:");
  say("  npm run lab -- ctl -- --capsule homeA capsule info       # capsulectl as the operator");
  say("  npm run lab -- exec homeA -- ip addr                      # a shell command inside a capsule");
  say("  npm run lab -- exec client -- bash                        # be the visitor on the internet");
  say(`  less ${plan.capsules[0]?.logFile ?? `${plan.labDir}/<capsule>/capsuled.log`}`);
  say();
  say("The lab keeps running. Tear it down with: npm run lab -- down");
}

main().catch((e: unknown) => {
  process.stderr.write(`${formatError(e)}\n`);
  process.exitCode = 1;
});
