// Runs the whole suite tier by tier (lint, typecheck, unit, e2e, root, lab-qemu) and closes with
// one line "N passed, N failed, N skipped" summed over the tiers. Exits non-zero if anything
// failed. Usage: node scripts/test.mjs [tier...]   (default: unit e2e root lab-qemu; the
// lab-qemu tier boots QEMU guests under TCG: the tiny guest, then two full capsules, 2-6 min)
import { spawnSync } from "node:child_process";

const tiers = process.argv.slice(2).length ? process.argv.slice(2) : ["unit", "e2e", "root", "lab-qemu"];
let failedStep = false;
function step(label, cmd, args) {
  process.stdout.write(`\n== ${label}\n`);
  const r = spawnSync(cmd, args, { stdio: ["ignore", "pipe", "inherit"], encoding: "utf8" });
  process.stdout.write(r.stdout ?? "");
  if (r.status !== 0) failedStep = true;
  return r;
}

if (!process.argv.slice(2).length) {
  step("lint (eslint, prettier)", "npm", ["run", "--silent", "lint"]);
  step("typecheck (tsc)", "npx", ["tsc", "-p", "tsconfig.json", "--noEmit"]);
}
const totals = { pass: 0, fail: 0, skip: 0 };
for (const tier of tiers) {
  const r = step(`tests: ${tier}`, "npx", ["tap", `test/${tier}`]);
  const m = /# \{ total: (\d+), pass: (\d+)(?:, fail: (\d+))?(?:, skip: (\d+))?/.exec(r.stdout ?? "");
  if (m) {
    totals.pass += Number(m[2]);
    totals.fail += Number(m[3] ?? 0);
    totals.skip += Number(m[4] ?? 0);
  } else if (r.status !== 0) {
    totals.fail += 1;
  }
}
process.stdout.write(`\n${totals.pass} passed, ${totals.fail} failed, ${totals.skip} skipped\n`);
process.exit(failedStep || totals.fail > 0 ? 1 : 0);
