// Dependencies point one way: cli -> api client; node -> fabric | edge | migrate -> host seams, store.
// The CLI never imports the agent's internals, and subsystems never import the composition root.
import { readdirSync, readFileSync, statSync } from "node:fs";
import { join, relative, resolve, dirname } from "node:path";
import t from "tap";
import { REPO } from "../helpers/capsuled.js";

function files(dir: string): string[] {
  return readdirSync(dir).flatMap((f) => {
    const p = join(dir, f);
    return statSync(p).isDirectory() ? files(p) : p.endsWith(".ts") ? [p] : [];
  });
}

function imports(file: string): string[] {
  const src = readFileSync(file, "utf8");
  const out: string[] = [];
  for (const m of src.matchAll(
    /(?:import|export)[^"']*?from\s+["']([^"']+)["']|import\(\s*["']([^"']+)["']\s*\)/g,
  )) {
    const spec = m[1] ?? m[2];
    if (spec?.startsWith(".")) out.push(relative(REPO, resolve(dirname(file), spec)).replace(/\.js$/, ".ts"));
  }
  return out;
}

const RULES: { from: string; mayNot: RegExp; why: string }[] = [
  {
    from: "src/cli/",
    mayNot: /^src\/(node|fabric|edge|migrate)\//,
    why: "the CLI is a thin client of the API",
  },
  {
    from: "src/api/",
    mayNot: /^src\/(node|cli|fabric|edge|migrate)\//,
    why: "the API client is shared and below both",
  },
  {
    from: "src/fabric/",
    mayNot: /^src\/(cli|edge|migrate)\/|^src\/node\/(?!host\/|store\/)/,
    why: "subsystems use seams, not the agent",
  },
  {
    from: "src/edge/",
    mayNot: /^src\/(cli|fabric|migrate)\/|^src\/node\/(?!host\/|store\/)/,
    why: "subsystems use seams, not the agent",
  },
  {
    from: "src/migrate/",
    mayNot: /^src\/(cli|edge)\/|^src\/node\/(?!host\/|store\/)/,
    why: "subsystems use seams, not the agent",
  },
  {
    from: "src/node/runtime/",
    mayNot: /^src\/(cli|fabric|edge|migrate)\/|^src\/node\/(?!host\/|store\/|runtime\/)/,
    why: "the runtime layer uses seams, not the agent",
  },
  {
    from: "src/node/host/",
    mayNot: /^src\/(?!errors\.ts|node\/host\/)/,
    why: "seams depend on nothing of ours",
  },
  { from: "src/", mayNot: /^(lab|test|bench)\//, why: "product code never imports tests, lab or benchmarks" },
];

t.test("import direction", async (t) => {
  const all = files(join(REPO, "src")).filter((f) => !f.includes("/src/gen/"));
  t.ok(all.length > 10, "found the sources");
  const violations: string[] = [];
  for (const f of all) {
    const rel = relative(REPO, f);
    for (const rule of RULES) {
      if (!rel.startsWith(rule.from)) continue;
      for (const imp of imports(f))
        if (rule.mayNot.test(imp)) violations.push(`${rel} imports ${imp}: ${rule.why}`);
    }
  }
  t.same(violations, []);
});

t.test("the rule catches a violation", async (t) => {
  const rule = RULES[0]!;
  t.ok(rule.mayNot.test("src/node/root.ts"));
  t.notOk(rule.mayNot.test("src/api/client.ts"));
});

t.test("only the composition root constructs real implementations", async (t) => {
  const offenders = files(join(REPO, "src"))
    .filter((f) => !f.endsWith("src/node/root.ts") && !f.includes("/host/"))
    .filter((f) =>
      /new (ExecaRunner|SystemClock|DetachedSpawner|RtNetlink|WgClient)\(/.test(readFileSync(f, "utf8")),
    )
    .map((f) => relative(REPO, f));
  t.same(offenders, []);
});
