import t from "tap";
import { parse as parseYaml } from "yaml";
import { humanDuration, parseDuration } from "../../src/cli/duration.js";
import type { FanOutResult } from "../../src/cli/fanout.js";
import {
  type Column,
  renderKeyValues,
  renderObject,
  renderResults,
  renderTable,
  type View,
} from "../../src/cli/output.js";
import { CapsuleError, ErrorCode } from "../../src/errors.js";

interface Row {
  n: string;
  v: string | number | null;
  w: string;
}
const COLS: Column<Row>[] = [
  { header: "name", get: (r) => r.n },
  { header: "VALUE", get: (r) => r.v },
  { header: "EXTRA", get: (r) => r.w, wide: true },
];
const VIEW: View<{ items: Row[] }, Row> = { rows: (v) => v.items, columns: COLS };

t.test("a table is kubectl-like: uppercase headers, aligned, no borders, <none> for empty", async (t) => {
  const rows: Row[] = [
    { n: "a", v: 1, w: "x" },
    { n: "bbbb", v: null, w: "y\nz" },
  ];
  t.equal(renderTable(rows, COLS), ["NAME   VALUE", "a      1", "bbbb   <none>", ""].join("\n"));
  t.equal(
    renderTable(rows, COLS, { wide: true }),
    ["NAME   VALUE    EXTRA", "a      1        x", "bbbb   <none>   y z", ""].join("\n"),
  );
  t.equal(renderTable([], COLS), "NAME   VALUE\n", "no rows prints the header alone");
});

type R = FanOutResult<{ name: string }, { items: Row[] }>;
const ok = (name: string, items: Row[]): R => ({ target: { name }, ok: true, value: { items } });
const unreachable = new CapsuleError(ErrorCode.Unreachable, "b2: unreachable (connection refused)", {
  hint: "check that capsuled runs there",
});
const MULTI: R[] = [
  ok("box1", [{ n: "a", v: "1", w: "x" }]),
  { target: { name: "b2" }, ok: false, error: unreachable },
  ok("box3", [
    { n: "c", v: "22", w: "y" },
    { n: "d", v: "3", w: "z" },
  ]),
];

t.test("several targets: a CAPSULE column, the failed one as an error row, exit 1", async (t) => {
  const r = renderResults(MULTI, VIEW, "table", { multi: true });
  t.equal(
    r.stdout,
    [
      "CAPSULE   NAME   VALUE",
      "box1      a      1",
      "b2        error: b2: unreachable (connection refused)",
      "box3      c      22",
      "box3      d      3",
      "",
    ].join("\n"),
  );
  t.equal(r.stderr, "hint: check that capsuled runs there\n");
  t.equal(r.exitCode, 1);
});

t.test("several targets, wide, all fine: exit 0 and the wide column", async (t) => {
  const r = renderResults([MULTI[0]!, MULTI[2]!], VIEW, "wide", { multi: true });
  t.equal(
    r.stdout,
    [
      "CAPSULE   NAME   VALUE   EXTRA",
      "box1      a      1       x",
      "box3      c      22      y",
      "box3      d      3       z",
      "",
    ].join("\n"),
  );
  t.equal(r.stderr, "");
  t.equal(r.exitCode, 0);
});

t.test("several targets as JSON and YAML: a list of {capsule, ...} and {capsule, error}", async (t) => {
  const want = [
    { capsule: "box1", items: [{ n: "a", v: "1", w: "x" }] },
    {
      capsule: "b2",
      error: {
        code: "CAPSULE_UNREACHABLE",
        message: "b2: unreachable (connection refused)",
        hint: "check that capsuled runs there",
      },
    },
    {
      capsule: "box3",
      items: [
        { n: "c", v: "22", w: "y" },
        { n: "d", v: "3", w: "z" },
      ],
    },
  ];
  const j = renderResults(MULTI, VIEW, "json", { multi: true });
  t.same(JSON.parse(j.stdout), want);
  t.equal(j.exitCode, 1);
  const y = renderResults(MULTI, VIEW, "yaml", { multi: true });
  t.same(parseYaml(y.stdout), want);
  t.equal(y.exitCode, 1);
});

t.test("one target: no CAPSULE column; the raw object for json/yaml", async (t) => {
  const single = [MULTI[0]!];
  t.equal(renderResults(single, VIEW, "table", { multi: false }).stdout, "NAME   VALUE\na      1\n");
  t.same(JSON.parse(renderResults(single, VIEW, "json", { multi: false }).stdout), {
    items: [{ n: "a", v: "1", w: "x" }],
  });
  t.equal(
    renderResults(single, VIEW, "yaml", { multi: false }).stdout,
    'items:\n  - n: a\n    v: "1"\n    w: x\n',
  );
});

t.test("one target failing: nothing on stdout, error and hint on stderr, exit 1", async (t) => {
  for (const f of ["table", "json"] as const) {
    const r = renderResults([MULTI[1]!], VIEW, f, { multi: false });
    t.equal(r.stdout, "");
    t.equal(r.stderr, "error: b2: unreachable (connection refused)\nhint: check that capsuled runs there\n");
    t.equal(r.exitCode, 1);
  }
});

t.test("the same hint for several failures is printed once", async (t) => {
  const e2 = new CapsuleError(ErrorCode.Unreachable, "b3: unreachable", { hint: unreachable.hint });
  const r = renderResults([MULTI[1]!, { target: { name: "b3" }, ok: false, error: e2 }], VIEW, "table", {
    multi: true,
  });
  t.equal(r.stderr, "hint: check that capsuled runs there\n");
  t.equal(
    r.stdout,
    "CAPSULE   NAME   VALUE\nb2        error: b2: unreachable (connection refused)\nb3        error: b3: unreachable\n",
  );
});

t.test("objects and key/value lines", async (t) => {
  t.equal(renderObject({ a: 1 }, "json"), '{\n  "a": 1\n}\n');
  t.equal(renderObject({ pem: "l1\nl2\n" }, "yaml"), "pem: |\n  l1\n  l2\n");
  t.equal(
    renderKeyValues([
      ["Name", "box1"],
      ["Capsule ID", ""],
    ]),
    "Name:         box1\nCapsule ID:   <none>\n",
  );
});

t.test("durations: parse what users type, show two units", async (t) => {
  t.equal(parseDuration("10s"), 10_000);
  t.equal(parseDuration("500ms"), 500);
  t.equal(parseDuration("1m30s"), 90_000);
  t.equal(parseDuration("1.5h"), 5_400_000);
  t.equal(parseDuration("7"), 7000);
  for (const bad of ["", "0s", "10 s", "s", "-1s", "1y"]) {
    t.throws(() => parseDuration(bad, "--timeout"), { code: ErrorCode.InvalidArgument }, JSON.stringify(bad));
  }
  t.equal(humanDuration(0), "0s");
  t.equal(humanDuration(59.9), "59s");
  t.equal(humanDuration(250), "4m10s");
  t.equal(humanDuration(7200), "2h");
  t.equal(humanDuration(5 * 3600 + 12 * 60 + 7), "5h12m");
  t.equal(humanDuration(3 * 86400 + 4 * 3600 + 5), "3d4h");
  t.equal(humanDuration(-3), "0s");
  t.equal(humanDuration(Number.NaN), "0s");
});
