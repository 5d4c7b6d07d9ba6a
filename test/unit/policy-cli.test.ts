// capsulectl policy ... and `apply -f` with policies, in-process through run() with a fake dialer:
// what is sent, what is printed, the exit code.
import { writeFile } from "node:fs/promises";
import { join } from "node:path";
import t from "tap";
import { CapsuleError, ErrorCode } from "../../src/errors.js";
import { harness, steps } from "../helpers/cli-harness.js";

const POLICY = `kind: Policy
name: web-db
allow:
  - from: { workload: web }
    to: { labels: { app: db } }
    ports: ["5432/tcp"]
tests:
  - { from: web, to: db, port: 5432/tcp, expect: allow }
`;
const WORKLOAD = `kind: Workload
name: web
labels: { app: web }
container:
  image: demo/httpd:1
`;

async function file(root: string, name: string, text: string): Promise<string> {
  const p = join(root, name);
  await writeFile(p, text);
  return p;
}

const applyAnswer = (req: Record<string, unknown>, action = "created", enforced = true) => ({
  results: (req.manifestsJson as string[]).map((j) => ({
    name: (JSON.parse(j) as { name: string }).name,
    action,
  })),
  tests: [],
  warnings: [],
  enforced,
});

const SHOW = {
  workloads: [
    {
      name: "db",
      address: "100.64.2.3",
      drops: "12",
      allow: [
        {
          origin: "policy web-db",
          policy: "web-db",
          index: 1,
          from: "{workload: web}",
          sources: ["web (100.64.2.2)"],
          ports: ["5432/tcp"],
        },
      ],
    },
    { name: "web", address: "100.64.2.2", drops: "0", allow: [] },
  ],
  warnings: [
    {
      policy: "web-db",
      index: 2,
      side: "to",
      message: "{labels: {app: x}} matches nothing: no workload has labels {app: x}",
    },
  ],
  enforced: true,
  policies: 1,
};

t.test("policy apply -f: Policies/Apply with the validated documents; kubectl-style lines", async (t) => {
  const h = await harness(async (method, req) => {
    t.equal(method, "Policies/Apply");
    return applyAnswer(req);
  });
  const r = await h.cli(["policy", "apply", "-f", await file(h.root, "p.yaml", POLICY)]);
  t.equal(r.code, 0, r.err);
  t.equal(r.out, "policy/web-db created\n");
  const req = h.calls[0]?.req as { manifestsJson: string[]; dryRun: boolean };
  t.same(JSON.parse(req.manifestsJson[0] ?? ""), {
    kind: "Policy",
    name: "web-db",
    allow: [{ from: { workload: "web" }, to: { labels: { app: "db" } }, ports: ["5432/tcp"] }],
    tests: [{ from: "web", to: "db", port: "5432/tcp", expect: "allow" }],
  });
  t.equal(req.dryRun, false);
});

t.test("policy apply: --all fans out; a failing test on one capsule is reported, exit 1", async (t) => {
  const h = await harness(async (_m, req, label) => {
    if (label === "homeB")
      throw new CapsuleError(
        ErrorCode.FailedPrecondition,
        "policy web-db test 1 (web -> db 5432/tcp): expected allow, got deny; nothing changed",
        { hint: "fix the policy or its test" },
      );
    return applyAnswer(req, "unchanged");
  });
  const r = await h.cli(["--all", "policy", "apply", "-f", await file(h.root, "p.yaml", POLICY)]);
  t.equal(r.code, 1);
  t.match(
    r.out,
    /CAPSULE\s+RESOURCE\s+RESULT\nhomeA\s+policy\/web-db\s+unchanged\nhomeB\s+error: policy web-db test 1/,
  );
  t.match(r.err, /hint: fix the policy or its test/);
});

t.test("policy apply: a bad document sends nothing; a Workload is refused with the way out", async (t) => {
  const h = await harness(async () => ({}));
  const bad = await h.cli([
    "policy",
    "apply",
    "-f",
    await file(h.root, "bad.yaml", POLICY.replace('5432/tcp"]', '99999/tcp"]')),
  ]);
  t.equal(bad.code, 1);
  t.match(bad.err, /error: .*allow\.0\.ports\.0: 99999 is not a port/);
  const wl = await h.cli(["policy", "apply", "-f", await file(h.root, "w.yaml", WORKLOAD)]);
  t.equal(wl.code, 1);
  t.match(wl.err, /web: is a Workload, not a Policy\nhint: capsulectl apply -f /);
  t.same(h.calls, [], "nothing sent");
});

t.test("policy apply on a capsule without a fabric says it is not enforced", async (t) => {
  const h = await harness(async (_m, req) => applyAnswer(req, "created", false));
  const r = await h.cli(["policy", "apply", "-f", await file(h.root, "p.yaml", POLICY)]);
  t.equal(r.code, 0);
  t.match(r.err, /note: homeA has no fabric: its policies are stored, not enforced/);
});

t.test("apply -f: policies first (with the workloads for their tests), then workloads", async (t) => {
  const h = await harness(async (method, req) => {
    if (method === "Policies/Apply") return applyAnswer(req);
    return {
      results: (req.manifestsJson as string[]).map((j) => ({
        kind: "Workload",
        name: JSON.parse(j).name,
        action: "created",
      })),
    };
  });
  const r = await h.cli(["apply", "-f", await file(h.root, "all.yaml", `${WORKLOAD}---\n${POLICY}`)]);
  t.equal(r.code, 0, r.err);
  t.equal(r.out, "policy/web-db created\nworkload/web created\n");
  t.same(steps(h.calls), ["homeA Policies/Apply", "homeA Workloads/Apply"]);
  const preq = h.calls[0]?.req as { manifestsJson: string[]; workloadsJson: string[] };
  t.equal(preq.manifestsJson.length, 1);
  t.match(JSON.parse(preq.workloadsJson[0] ?? ""), { kind: "Workload", name: "web" });
  const wreq = h.calls[1]?.req as { manifestsJson: string[] };
  t.same(
    wreq.manifestsJson.map((j) => JSON.parse(j).kind),
    ["Workload"],
    "Workloads/Apply gets only workloads",
  );
});

t.test("apply -f: a refused policy keeps the workloads from being sent", async (t) => {
  const h = await harness(async (method) => {
    if (method === "Policies/Apply")
      throw new CapsuleError(
        ErrorCode.FailedPrecondition,
        "policy web-db test 1 (web -> db 5432/tcp): expected allow, got deny; nothing changed",
      );
    throw new Error("must not be called");
  });
  const r = await h.cli(["apply", "-f", await file(h.root, "all.yaml", `${WORKLOAD}---\n${POLICY}`)]);
  t.equal(r.code, 1);
  t.match(r.err, /error: policy web-db test 1/);
  t.same(steps(h.calls), ["homeA Policies/Apply"]);
});

t.test("apply -f: only workloads is one Workloads/Apply, as before", async (t) => {
  const h = await harness(async () => ({
    results: [{ kind: "Workload", name: "web", action: "unchanged" }],
  }));
  const r = await h.cli(["apply", "-f", await file(h.root, "w.yaml", WORKLOAD)]);
  t.equal(r.out, "workload/web unchanged\n");
  t.same(steps(h.calls), ["homeA Workloads/Apply"]);
});

t.test("policy show: one row per rule, default deny spelled out, warnings on stderr", async (t) => {
  const h = await harness(async (method) => {
    t.equal(method, "Policies/Show");
    return SHOW;
  });
  const r = await h.cli(["policy", "show"]);
  t.equal(r.code, 0, r.err);
  t.equal(
    r.out,
    [
      "WORKLOAD   ADDRESS      FROM                      PORTS      ORIGIN",
      "db         100.64.2.3   {workload: web}           5432/tcp   policy web-db",
      "web        100.64.2.2   (nothing: default deny)   <none>     <none>",
      "",
    ].join("\n"),
  );
  t.equal(
    r.err,
    "warning: policy web-db rule 2 to: {labels: {app: x}} matches nothing: no workload has labels {app: x}\n",
  );
  const wide = await h.cli(["policy", "show", "-o", "wide"]);
  t.match(wide.out, /SOURCES\s+DROPS\n.*web \(100\.64\.2\.2\)\s+12\n/);
  const js = await h.cli(["policy", "show", "-o", "json"]);
  t.same(JSON.parse(js.out), SHOW);
});

t.test("policy explain: the verdict line and the rule", async (t) => {
  const h = await harness(async (method, req) => {
    t.equal(method, "Policies/Explain");
    t.same(req, { src: "web", dst: "db", port: "5432/tcp" });
    return {
      allowed: true,
      rule: "policy web-db rule 1",
      text: "allowed by policy web-db rule 1: from {workload: web} to {labels: {app: db}} 5432/tcp",
      srcAddress: "100.64.2.2",
      dstAddress: "100.64.2.3",
    };
  });
  const r = await h.cli(["policy", "explain", "web", "db", "5432/tcp"]);
  t.equal(r.code, 0, r.err);
  t.equal(
    r.out,
    "allow web (100.64.2.2) -> db (100.64.2.3) 5432/tcp\nallowed by policy web-db rule 1: from {workload: web} to {labels: {app: db}} 5432/tcp\n",
  );
  const bad = await h.cli(["policy", "explain", "web", "db", "5432"]);
  t.equal(bad.code, 1);
  t.match(bad.err, /error: PORT\/PROTO: "5432" is not N\/tcp, N\/udp or icmp/);
});

t.test("policy test: a table of tests, exit 1 on a failure, skips noted", async (t) => {
  const test = (o: Record<string, unknown>) => ({
    policy: "web-db",
    index: 1,
    from: "web",
    to: "db",
    port: "5432/tcp",
    expect: "allow",
    got: "allow",
    rule: "policy web-db rule 1",
    passed: true,
    skipped: false,
    message: "",
    ...o,
  });
  const h = await harness(async (method) => {
    t.equal(method, "Policies/Test");
    return {
      tests: [
        test({}),
        test({ index: 2, expect: "deny", passed: false }),
        test({
          index: 3,
          to: "cache",
          got: "",
          rule: "",
          skipped: true,
          message: "web -> cache 5432/tcp: workload cache is not in the mesh inventory",
        }),
      ],
      warnings: [],
      passed: false,
    };
  });
  const r = await h.cli(["policy", "test", "-f", await file(h.root, "p.yaml", POLICY)]);
  t.equal(r.code, 1);
  t.match(
    r.out,
    /POLICY\s+TEST\s+FROM\s+TO\s+PORT\s+EXPECT\s+GOT\s+RESULT\nweb-db\s+1\s+web\s+db\s+5432\/tcp\s+allow\s+allow\s+pass\nweb-db\s+2\s+.*deny\s+allow\s+FAIL\nweb-db\s+3\s+web\s+cache\s+.*skip\n/,
  );
  t.match(
    r.err,
    /note: policy web-db test 3 skipped: web -> cache 5432\/tcp: workload cache is not in the mesh inventory/,
  );
});

t.test("policy list and delete", async (t) => {
  const h = await harness(async (method, req) => {
    if (method === "Policies/List")
      return {
        policies: [
          { name: "web-db", rules: 2, tests: 4, updatedAt: "2026-11-23T11:00:00.000Z", docJson: "{}" },
        ],
      };
    t.equal(method, "Policies/Delete");
    return { deleted: req.name === "web-db" };
  });
  const l = await h.cli(["policy", "list"]);
  t.equal(l.out, "NAME     RULES   TESTS   UPDATED\nweb-db   2       4       2026-11-23T11:00:00.000Z\n");
  t.equal((await h.cli(["policy", "delete", "web-db"])).out, "policy/web-db deleted\n");
  const again = await h.cli(["policy", "delete", "nope"]);
  t.equal(again.out, "policy/nope not found\n");
  t.equal(again.code, 0);
});
