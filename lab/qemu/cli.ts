/**
 * `npm run lab:qemu -- <command>`: the QEMU capsule lab (lab/qemu/vmlab.ts) for exploration.
 *
 *   up [--count N] [--no-capsuled]   build/reuse the boot files, boot N guests (default 2), wait
 *                                    until each is ready, print how to reach them, and exit
 *                                    leaving them running
 *   exec <guest> <shell command>     run a command in a guest through qemu-ga
 *   down                             kill the guests, delete the namespace and the work dir
 *
 * Environment: CAPSULE_GUEST_DIR is the boot-file cache (default $TMPDIR/capsule-guest, shared
 * with the test tier); CAPSULE_VM_LAB_DIR is the work dir (default $TMPDIR/capsule-vm-lab).
 * Needs root (namespace, TAP).
 */
import { existsSync, readFileSync } from "node:fs";
import { rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { QgaClient } from "./qga.js";
import { CAPSULED_PORT, type LabState, planVmLab, prepareBoot, teardownVmLab, VmLab } from "./vmlab.js";

const CACHE = process.env.CAPSULE_GUEST_DIR ?? join(tmpdir(), "capsule-guest");
const WORK = process.env.CAPSULE_VM_LAB_DIR ?? join(tmpdir(), "capsule-vm-lab");
const STATE = join(WORK, "lab.json");

const say = (s: string) => process.stdout.write(`${s}\n`);

function flag(args: string[], name: string): string | undefined {
  const i = args.indexOf(name);
  return i >= 0 ? args[i + 1] : undefined;
}

async function up(args: string[]): Promise<void> {
  if (existsSync(STATE)) throw new Error(`a lab is up (${STATE}); run down first`);
  const plan = planVmLab({
    workDir: WORK,
    count: Number(flag(args, "--count") ?? 2),
    capsuled: !args.includes("--no-capsuled"),
  });
  const t0 = Date.now();
  const boot = await prepareBoot(CACHE);
  say(`boot files ready in ${Date.now() - t0} ms (${JSON.stringify(boot.timings)})`);
  const lab = new VmLab(plan);
  try {
    await lab.start(boot);
    const ready = await lab.waitReady();
    say(`guests ready (ms since start): ${JSON.stringify(ready)}`);
  } catch (e) {
    await lab.stop();
    await rm(WORK, { recursive: true, force: true });
    throw e;
  }
  for (const a of plan.guests.map((g) => lab.agent(g.name))) a.close();
  say(`namespace ${plan.ns}: bridge ${plan.bridge} ${plan.hostIp}/24`);
  for (const g of plan.guests)
    say(`  ${g.name}  ${g.ip}  console ${g.console}  qemu-ga ${g.qga}  disk /dev/vda`);
  say(`run in a guest:    npm run lab:qemu -- exec ${plan.guests[0]?.name} 'wg show; dmsetup ls'`);
  say(
    `adopt a capsule:   ip netns exec ${plan.ns} npx capsulectl --config-dir ${join(WORK, "operator")} ` +
      `adopt ${plan.guests[0]?.ip}:${CAPSULED_PORT} --name ${plan.guests[0]?.name} --yes`,
  );
  say(`                   (capsuled needs a minute or two to start under TCG)`);
  say(`stop:              npm run lab:qemu -- down`);
}

async function exec(args: string[]): Promise<number> {
  const [name, ...cmd] = args;
  if (!name || cmd.length === 0) throw new Error("usage: exec <guest> <shell command>");
  const plan = planVmLab({ workDir: WORK, count: 3 });
  const g = plan.guests.find((x) => x.name === name);
  if (!g || !existsSync(g.qga)) throw new Error(`no running guest ${name}`);
  const a = await QgaClient.connect(g.qga, 10_000);
  try {
    const r = await a.exec(cmd.join(" "), { allowFailure: true, timeoutMs: 600_000 });
    process.stdout.write(r.stdout);
    process.stderr.write(r.stderr);
    return r.exitCode;
  } finally {
    a.close();
  }
}

async function down(): Promise<void> {
  const st: LabState = existsSync(STATE)
    ? (JSON.parse(readFileSync(STATE, "utf8")) as LabState)
    : { ns: planVmLab({ workDir: WORK }).ns, workDir: WORK, pids: {} };
  await teardownVmLab(st);
  await rm(WORK, { recursive: true, force: true });
  say(`lab down (namespace ${st.ns} deleted, ${WORK} removed)`);
}

async function main(argv: string[]): Promise<number> {
  const [cmd, ...rest] = argv;
  if (process.getuid?.() !== 0) throw new Error("the QEMU lab needs root (network namespace, TAP)");
  switch (cmd) {
    case "up":
      await up(rest);
      return 0;
    case "exec":
      return exec(rest);
    case "down":
      await down();
      return 0;
    default:
      say("usage: lab:qemu up [--count N] [--no-capsuled] | exec <guest> <cmd> | down");
      return cmd ? 2 : 0;
  }
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (e: unknown) => {
    process.stderr.write(`lab:qemu: ${e instanceof Error ? e.message : String(e)}\n`);
    process.exit(1);
  },
);
