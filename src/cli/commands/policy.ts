/**
 * `capsulectl policy apply -f FILE|DIR | test -f FILE | show | explain SRC DST PORT/PROTO |
 * list | delete NAME`. Each command is one Policies RPC per selected capsule plus output;
 * manifests are validated here first so a bad file sends nothing. Every capsule stores and
 * enforces its own policies (a packet is judged where it arrives): apply to each capsule whose
 * workloads a policy protects, or to all of them with `--all`.
 */
import type { Manifest } from "../../api/manifest.js";
import { invalidArgument } from "../../errors.js";
import type { ApplyPoliciesResponse__Output } from "../../gen/capsule/v1/ApplyPoliciesResponse.js";
import type { DeletePolicyResponse__Output } from "../../gen/capsule/v1/DeletePolicyResponse.js";
import type { EffectiveRule__Output } from "../../gen/capsule/v1/EffectiveRule.js";
import type { ExplainResponse__Output } from "../../gen/capsule/v1/ExplainResponse.js";
import type { ListPoliciesResponse__Output } from "../../gen/capsule/v1/ListPoliciesResponse.js";
import type { PolicyApplyResult__Output } from "../../gen/capsule/v1/PolicyApplyResult.js";
import type { PolicySummary__Output } from "../../gen/capsule/v1/PolicySummary.js";
import type { PolicyTestResult__Output } from "../../gen/capsule/v1/PolicyTestResult.js";
import type { PolicyWarning__Output } from "../../gen/capsule/v1/PolicyWarning.js";
import type { ShowPoliciesResponse__Output } from "../../gen/capsule/v1/ShowPoliciesResponse.js";
import type { TestPoliciesResponse__Output } from "../../gen/capsule/v1/TestPoliciesResponse.js";
import type { FanOutResult } from "../fanout.js";
import type { View } from "../output.js";
import type { Session } from "../session.js";
import type { Target } from "../targets.js";
import { showLines } from "./lines.js";
import { loadManifests, readManifestFiles } from "./workload.js";

/** PORT_SPEC is what `policy explain` accepts as its port: `5432/tcp`, `53/udp`, `icmp`. */
const PORT_SPEC = /^(\d{1,5}\/(tcp|udp)|icmp)$/;

/** isPolicy reports whether a validated manifest is a `kind: Policy` document. Pure. */
export function isPolicy(m: Manifest): boolean {
  return (m as { kind: string }).kind === "Policy";
}

/**
 * loadPolicyManifests reads FILE or DIR (see readManifestFiles) and returns its Policy documents
 * as the JSON the capsule takes; any other kind is refused, naming it (use `capsulectl apply`).
 */
export async function loadPolicyManifests(file: string): Promise<string[]> {
  const manifests = loadManifests(await readManifestFiles(file));
  const other = manifests.find((m) => !isPolicy(m));
  if (other) {
    throw invalidArgument(
      `-f: ${other.name}`,
      `is a ${other.kind}, not a Policy`,
      `capsulectl apply -f ${file} applies workloads and policies together`,
    );
  }
  return manifests.map((m) => JSON.stringify(m));
}

/** warningText renders a selector warning: `policy web-db rule 2 to: matches nothing ...`. Pure. */
export function warningText(w: PolicyWarning__Output): string {
  return `policy ${w.policy} rule ${w.index} ${w.side}: ${w.message}`;
}

function printWarnings(
  s: Session,
  results: readonly FanOutResult<Target, { warnings: PolicyWarning__Output[] }>[],
  multi: boolean,
): void {
  for (const r of results) {
    if (!r.ok) continue;
    for (const w of r.value.warnings)
      s.err(`warning: ${multi ? `${r.target.name}: ` : ""}${warningText(w)}\n`);
  }
}

/** POLICY_APPLY_VIEW is `policy apply` for several capsules: one row per policy and capsule. */
export const POLICY_APPLY_VIEW: View<ApplyPoliciesResponse__Output, PolicyApplyResult__Output> = {
  rows: (v) => v.results,
  columns: [
    { header: "RESOURCE", get: (r) => `policy/${r.name}` },
    { header: "RESULT", get: (r) => r.action },
  ],
};

/** PolicyApplyOptions: `file` required; `dryRun` validates and tests on the capsule, changing nothing. */
export interface PolicyApplyOptions {
  file: string;
  dryRun?: boolean;
}

/**
 * policyApply sends every Policy document of FILE|DIR in one Policies/Apply to each selected
 * capsule and prints `policy/NAME created|configured|unchanged`. The capsule runs every test
 * first and refuses the whole request on a failing one, naming it; nothing changes then.
 * Idempotent. Warnings (selectors that match nothing) go to stderr.
 */
export async function policyApply(s: Session, opts: PolicyApplyOptions): Promise<void> {
  const manifestsJson = await loadPolicyManifests(opts.file);
  const { results, multi } = await s.rpc<ApplyPoliciesResponse__Output>("Policies/Apply", () => ({
    manifestsJson,
    dryRun: opts.dryRun === true,
  }));
  const suffix = opts.dryRun ? " (dry run)" : "";
  showLines(s, results, multi, POLICY_APPLY_VIEW, (v) =>
    v.results.map((r) => `policy/${r.name} ${r.action}${suffix}\n`).join(""),
  );
  printWarnings(s, results, multi);
  printSkipped(s, results, multi);
  for (const r of results)
    if (r.ok && !r.value.enforced)
      s.err(`note: ${r.target.name} has no fabric: its policies are stored, not enforced\n`);
}

/** testResult is a test's outcome word: pass, FAIL, or skip (an endpoint is not in the mesh). Pure. */
export function testResult(r: PolicyTestResult__Output): string {
  return r.skipped ? "skip" : r.passed ? "pass" : "FAIL";
}

/** printSkipped notes on stderr the tests that could not run (an endpoint the mesh does not know). */
function printSkipped(
  s: Session,
  results: readonly FanOutResult<Target, { tests: PolicyTestResult__Output[] }>[],
  multi: boolean,
): void {
  for (const r of results) {
    if (!r.ok) continue;
    for (const x of r.value.tests)
      if (x.skipped)
        s.err(
          `note: ${multi ? `${r.target.name}: ` : ""}policy ${x.policy} test ${x.index} skipped: ${x.message}\n`,
        );
  }
}

/** TEST_VIEW is `policy test`: one row per test. */
export const TEST_VIEW: View<TestPoliciesResponse__Output, PolicyTestResult__Output> = {
  rows: (v) => v.tests,
  columns: [
    { header: "POLICY", get: (r) => r.policy },
    { header: "TEST", get: (r) => r.index },
    { header: "FROM", get: (r) => r.from },
    { header: "TO", get: (r) => r.to },
    { header: "PORT", get: (r) => r.port },
    { header: "EXPECT", get: (r) => r.expect },
    { header: "GOT", get: (r) => r.got },
    { header: "RESULT", get: (r) => testResult(r) },
    { header: "RULE", get: (r) => r.rule, wide: true },
  ],
};

/**
 * policyTest runs the tests of FILE's policies, and of every policy stored on each selected
 * capsule, against their union on that capsule's mesh. Stores nothing. Exit 1 when a test fails.
 */
export async function policyTest(s: Session, file: string): Promise<void> {
  const manifestsJson = await loadPolicyManifests(file);
  const { results, multi } = await s.rpc<TestPoliciesResponse__Output>("Policies/Test", () => ({
    manifestsJson,
  }));
  s.show(results, TEST_VIEW, multi);
  printWarnings(s, results, multi);
  printSkipped(s, results, multi);
  if (results.some((r) => r.ok && !r.value.passed)) s.exitCode = 1;
}

/** ShowRow is one line of `policy show`: a local workload and one rule that lets traffic in (or none). */
export interface ShowRow {
  workload: string;
  address: string;
  rule: EffectiveRule__Output | undefined;
  drops: string;
}

/** SHOW_VIEW is `policy show`: per local workload, each allow rule in force; a workload without any is denied everything. */
export const SHOW_VIEW: View<ShowPoliciesResponse__Output, ShowRow> = {
  rows: (v) =>
    v.workloads.flatMap((w): ShowRow[] =>
      w.allow.length
        ? w.allow.map((rule) => ({ workload: w.name, address: w.address, rule, drops: w.drops }))
        : [{ workload: w.name, address: w.address, rule: undefined, drops: w.drops }],
    ),
  columns: [
    { header: "WORKLOAD", get: (r) => r.workload },
    { header: "ADDRESS", get: (r) => r.address },
    { header: "FROM", get: (r) => (r.rule ? r.rule.from : "(nothing: default deny)") },
    { header: "PORTS", get: (r) => r.rule?.ports.join(",") },
    { header: "ORIGIN", get: (r) => r.rule?.origin },
    { header: "SOURCES", get: (r) => r.rule?.sources.join(","), wide: true },
    { header: "DROPS", get: (r) => r.drops, wide: true },
  ],
};

/** policyShow prints, for each selected capsule's workloads, the allow rules in force; warnings on stderr. Read-only. */
export async function policyShow(s: Session): Promise<void> {
  const { results, multi } = await s.rpc<ShowPoliciesResponse__Output>("Policies/Show", () => ({}));
  s.show(results, SHOW_VIEW, multi);
  printWarnings(s, results, multi);
  for (const r of results)
    if (r.ok && !r.value.enforced)
      s.err(`note: ${r.target.name} has no fabric: its policies are stored, not enforced\n`);
}

/** explainLine renders the verdict line: `allow web (100.64.1.2) -> db (100.64.1.3) 5432/tcp`. Pure. */
export function explainLine(src: string, dst: string, port: string, v: ExplainResponse__Output): string {
  const end = (name: string, address: string) =>
    address && address !== name ? `${name} (${address})` : name;
  return `${v.allowed ? "allow" : "deny"} ${end(src, v.srcAddress)} -> ${end(dst, v.dstAddress)} ${port}`;
}

/**
 * policyExplain asks each selected capsule whether SRC reaches DST on PORT under its policies
 * and mesh, and by which rule. SRC and DST are workload names or fabric addresses; PORT is
 * `N/tcp`, `N/udp` or `icmp`. A packet is judged by DST's capsule: ask that one. Read-only.
 */
export async function policyExplain(s: Session, src: string, dst: string, port: string): Promise<void> {
  if (!PORT_SPEC.test(port))
    throw invalidArgument("PORT/PROTO", `"${port}" is not N/tcp, N/udp or icmp`, "for example 5432/tcp");
  const { results, multi } = await s.rpc<ExplainResponse__Output>("Policies/Explain", () => ({
    src,
    dst,
    port,
  }));
  const view: View<ExplainResponse__Output, ExplainResponse__Output> = {
    rows: (v) => [v],
    columns: [
      { header: "VERDICT", get: (v) => (v.allowed ? "allow" : "deny") },
      { header: "RULE", get: (v) => v.rule },
      { header: "SRC", get: (v) => v.srcAddress, wide: true },
      { header: "DST", get: (v) => v.dstAddress, wide: true },
    ],
  };
  showLines(
    s,
    results,
    multi,
    view,
    (v) => `${explainLine(src, dst, port, v)}\n${v.text ? `${v.text.trimEnd()}\n` : ""}`,
  );
}

/** LIST_VIEW is `policy list`. */
export const LIST_VIEW: View<ListPoliciesResponse__Output, PolicySummary__Output> = {
  rows: (v) => v.policies,
  columns: [
    { header: "NAME", get: (p) => p.name },
    { header: "RULES", get: (p) => p.rules },
    { header: "TESTS", get: (p) => p.tests },
    { header: "UPDATED", get: (p) => p.updatedAt },
  ],
};

/** policyList lists each selected capsule's stored policies. Read-only. */
export async function policyList(s: Session): Promise<void> {
  await s.rpcAndShow<ListPoliciesResponse__Output, PolicySummary__Output>(
    "Policies/List",
    () => ({}),
    LIST_VIEW,
  );
}

/** policyDelete deletes NAME on every selected capsule. Idempotent: a missing policy says "not found" and exits 0. */
export async function policyDelete(s: Session, name: string): Promise<void> {
  if (!name) throw invalidArgument("NAME", "is required");
  const { results, multi } = await s.rpc<DeletePolicyResponse__Output>("Policies/Delete", () => ({ name }));
  const said = (v: DeletePolicyResponse__Output) => (v.deleted ? "deleted" : "not found");
  const view: View<DeletePolicyResponse__Output, DeletePolicyResponse__Output> = {
    rows: (v) => [v],
    columns: [
      { header: "POLICY", get: () => name },
      { header: "RESULT", get: said },
    ],
  };
  showLines(s, results, multi, view, (v) => `policy/${name} ${said(v)}\n`);
}
