// Runs every benchmark in bench/ (files named *.bench.js after the build) and writes
// bench/RESULTS.md: one table, figures and ratios measured side by side in this run.
import { readdirSync, readFileSync, writeFileSync } from "node:fs";
import { arch, cpus, release, totalmem } from "node:os";
import { join } from "node:path";

/** Row is one measured figure. `target` states the goal, `ok` whether this run met it (undefined: no goal). */
export interface Row {
  bench: string;
  metric: string;
  value: string;
  target?: string;
  ok?: boolean;
}

const here = import.meta.dirname;
const only = process.argv.slice(2);
const rows: Row[] = [];
const files = readdirSync(here)
  .filter((f) => f.endsWith(".bench.js"))
  .filter((f) => only.length === 0 || only.some((o) => f.includes(o)))
  .sort();
for (const f of files) {
  process.stdout.write(`bench: ${f}\n`);
  const mod = (await import(join(here, f))) as { run: () => Promise<Row[]> };
  try {
    const got = await mod.run();
    for (const r of got)
      process.stdout.write(`  ${r.metric}: ${r.value}${r.target ? ` (target ${r.target})` : ""}\n`);
    rows.push(...got);
  } catch (e) {
    rows.push({ bench: f, metric: "error", value: (e as Error).message.split("\n")[0] ?? "", ok: false });
    process.stdout.write(`  failed: ${(e as Error).message}\n`);
  }
}
// Results are kept per bench file in bench/results.json, so running one file (`npm run bench --
// policy`) replaces that file's rows and keeps the others; each section says when it ran.
// Ratios inside a section are always from one run.
const store = join(here, "..", "..", "bench", "results.json");
let saved: Record<string, { at: string; env: string; rows: Row[] }> = {};
try {
  saved = JSON.parse(readFileSync(store, "utf8")) as typeof saved;
} catch {}
const env = `Node ${process.version}, kernel ${release()}, ${arch()}, ${cpus().length} cores, ${Math.round(totalmem() / 2 ** 30)} GiB`;
for (const f of files) {
  const name = f.replace(/\.bench\.js$/, "");
  saved[name] = {
    at: new Date().toISOString(),
    env,
    rows: rows.filter((r) => r.bench === name || r.bench === f),
  };
}
writeFileSync(store, `${JSON.stringify(saved, null, 2)}\n`);
const md = [
  "# Benchmark results",
  "",
  "Written by `npm run bench` (all benches) or `npm run bench -- NAME` (one; the others keep their last run).",
  "Figures and ratios within a section are measured side by side in the same run.",
  "",
  ...Object.entries(saved)
    .sort(([a], [b]) => (a < b ? -1 : 1))
    .flatMap(([name, s]) => [
      `## ${name}`,
      "",
      `Run ${s.at}: ${s.env}.`,
      "",
      "| metric | value | target | met |",
      "|---|---|---|---|",
      ...s.rows.map(
        (r) =>
          `| ${r.metric} | ${r.value} | ${r.target ?? ""} | ${r.ok === undefined ? "" : r.ok ? "yes" : "no"} |`,
      ),
      "",
    ]),
].join("\n");
// bench/RESULTS.md sits beside the sources (../../bench from dist/bench).
writeFileSync(join(here, "..", "..", "bench", "RESULTS.md"), md);
process.stdout.write(`wrote bench/RESULTS.md (${rows.length} rows)\n`);
