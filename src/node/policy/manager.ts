/**
 * The node side of policy: {@link Policies} holds this capsule's stored policies, builds the
 * mesh from the fabric's inventories, compiles (src/fabric/policy/compile.ts) and enforces
 * through a {@link PolicyApplier}, and answers show, explain and test.
 *
 * Every change of the ruleset goes through one queue, so applies never interleave, and is
 * all-or-nothing: validate → test → compile → `nft --check` → store → `nft -f`; a failure at
 * any step leaves both the store and the live table as they were (a failed `nft -f` rolls the
 * store back). Fabric and inventory changes recompile after a short debounce.
 */
import type { Logger } from "pino";
import { type PolicyManifest, parsePolicyPort, validateManifest } from "../../api/manifest.js";
import { CapsuleError, ErrorCode, invalidArgument, isCapsuleError, toCapsuleError } from "../../errors.js";
import { FABRIC_CIDR, intToIp, ipToInt } from "../../fabric/ipam.js";
import { type CompiledPolicy, compilePolicy, counterName } from "../../fabric/policy/compile.js";
import {
  decide,
  endpointAddress,
  explainVerdict,
  formatPort,
  formatRuleRef,
  formatSelector,
  rankedRules,
  resolveSelector,
  runTests,
  type TestResult,
  warnings,
} from "../../fabric/policy/evaluate.js";
import type { ImplicitRule, Mesh, Policy, Warning } from "../../fabric/policy/model.js";
import { toPolicy } from "../../fabric/policy/parse.js";
import type { Clock } from "../host/clock.js";
import type { Metrics } from "../metrics.js";
import type { PolicyApplier } from "./applier.js";
import type { PolicyRepo, PolicyRow } from "./repo.js";

/** DEBOUNCE_MS is how long a burst of inventory changes is gathered before one recompile. */
export const DEBOUNCE_MS = 20;

/** PoliciesOptions wires the manager. Required unless marked optional. */
export interface PoliciesOptions {
  repo: PolicyRepo;
  /** applier enforces the ruleset; unset = policies are stored and evaluated, not enforced (--no-fabric). */
  applier?: PolicyApplier;
  /** mesh returns the current mesh (this capsule's inventory and its peers'), persisted state only. */
  mesh: () => Mesh;
  /** implicit returns rules not written in a Policy (e.g. from `expose`); unset = none. */
  implicit?: () => ImplicitRule[];
  /** fabricIface is the WireGuard interface name. */
  fabricIface: string;
  /** fabricCidr: unset = 100.64.0.0/10. */
  fabricCidr?: string;
  clock: Clock;
  log: Logger;
  /** metrics records apply durations; optional. */
  metrics?: Metrics;
  /** debounceMs: unset = {@link DEBOUNCE_MS}. */
  debounceMs?: number;
}

/** ApplyAction is what an apply did to one policy. */
export type ApplyAction = "created" | "configured" | "unchanged";

/** TestView is one test outcome as the API reports it (index 1-based). */
export interface TestView {
  policy: string;
  index: number;
  from: string;
  to: string;
  port: string;
  expect: string;
  got: string;
  rule: string;
  passed: boolean;
  skipped: boolean;
  message: string;
}

/** WarningView is a selector that matches nothing (index 1-based). */
export interface WarningView {
  policy: string;
  index: number;
  side: string;
  message: string;
}

/** ApplyOutcome is the answer of {@link Policies.apply}. */
export interface ApplyOutcome {
  results: { name: string; action: ApplyAction }[];
  tests: TestView[];
  warnings: WarningView[];
  enforced: boolean;
}

/** EffectiveRuleView is one rule that lets traffic into a local workload. */
export interface EffectiveRuleView {
  origin: string;
  policy: string;
  index: number;
  from: string;
  sources: string[];
  ports: string[];
}

/** ShowView is the answer of {@link Policies.show}. */
export interface ShowView {
  workloads: { name: string; address: string; allow: EffectiveRuleView[]; drops: string }[];
  warnings: WarningView[];
  enforced: boolean;
  policies: number;
}

/** ExplainView is the answer of {@link Policies.explain}. */
export interface ExplainView {
  allowed: boolean;
  rule: string;
  text: string;
  srcAddress: string;
  dstAddress: string;
}

/** PolicySummaryView is one row of {@link Policies.list}. */
export interface PolicySummaryView {
  name: string;
  rules: number;
  tests: number;
  updatedAt: string;
  docJson: string;
}

interface Stored {
  policy: Policy;
  doc: string;
  updatedAt: string;
}

interface Given {
  policy: Policy;
  doc: string;
}

/** PendingWorkload is a workload about to be applied with policies: tests may name it. */
interface PendingWorkload {
  name: string;
  labels: Record<string, string>;
}

const byName = (a: string, b: string) => (a < b ? -1 : a > b ? 1 : 0);

/**
 * Policies is the policy manager. `apply`, `delete` and `reconcile` are serialized; `changed`
 * schedules a debounced `reconcile`. Read methods (`list`, `show`, `explain`, `test`) change
 * nothing. Construct one per capsule (the composition root does).
 */
export class Policies {
  private readonly o: PoliciesOptions;
  private readonly cidr: string;
  private stored = new Map<string, Stored>();
  private queue: Promise<unknown> = Promise.resolve();
  private timer: NodeJS.Timeout | undefined;
  private pending = false;
  private stopped = false;

  constructor(o: PoliciesOptions) {
    this.o = o;
    this.cidr = o.fabricCidr ?? FABRIC_CIDR;
    this.load();
  }

  /** enforced says whether this capsule enforces its policies (it has a fabric and an applier). */
  get enforced(): boolean {
    return this.o.applier !== undefined;
  }

  /** load reads the stored policies; one that no longer parses is skipped with an error log (it allows nothing). */
  private load(): void {
    const next = new Map<string, Stored>();
    for (const row of this.o.repo.list()) {
      try {
        next.set(row.name, {
          ...this.parseDoc(JSON.parse(row.doc), `${row.name}: `),
          updatedAt: row.updatedAt,
        });
      } catch (e) {
        this.o.log.error(
          { policy: row.name, err: (e as Error).message },
          "stored policy does not parse; ignored",
        );
      }
    }
    this.stored = next;
  }

  private parseDoc(doc: unknown, source: string): Given {
    const m: PolicyManifest = validateManifest(doc, source, "Policy");
    return { policy: toPolicy(m, source), doc: JSON.stringify(m) };
  }

  private policies(): Policy[] {
    return [...this.stored.values()].map((s) => s.policy);
  }

  private implicit(): ImplicitRule[] {
    return this.o.implicit?.() ?? [];
  }

  /** serial runs `fn` after every queued change. */
  private serial<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.queue.then(fn);
    this.queue = run.catch(() => undefined);
    return run;
  }

  private compile(policies: readonly Policy[], mesh: Mesh): CompiledPolicy {
    try {
      return compilePolicy({
        policies,
        implicit: this.implicit(),
        mesh,
        fabricIface: this.o.fabricIface,
        fabricCidr: this.cidr,
      });
    } catch (e) {
      // The policies were validated: what the compiler refuses is the inventory.
      throw new CapsuleError(
        ErrorCode.FailedPrecondition,
        `cannot compile the policy ruleset: ${toCapsuleError(e).message}`,
        { hint: "see `capsulectl fabric inventory` for the addresses this capsule knows", cause: e },
      );
    }
  }

  /** enforce checks and applies a compiled ruleset, timing it. */
  private async enforce(script: string, before?: () => void): Promise<void> {
    const a = this.o.applier;
    if (!a) {
      before?.();
      return;
    }
    const t0 = process.hrtime.bigint();
    let outcome = "error";
    try {
      await a.check(script).catch((e: unknown) => {
        throw nftRefused(e);
      });
      before?.();
      outcome = (await a.apply(script)) ? "ok" : "unchanged";
    } finally {
      this.o.metrics?.policyApplyDuration.observe({ outcome }, Number(process.hrtime.bigint() - t0) / 1e9);
    }
  }

  /**
   * reconcile compiles the stored policies against the current mesh and applies the result
   * (a no-op when it equals the live ruleset). Serialized. With no policies this is default
   * deny. Throws what the compiler or nft refused; the live ruleset is then unchanged.
   */
  reconcile(): Promise<void> {
    return this.serial(async () => {
      this.pending = false;
      if (!this.o.applier) return;
      const compiled = this.compile(this.policies(), this.o.mesh());
      await this.enforce(compiled.script);
    });
  }

  /**
   * changed schedules a {@link reconcile} after the debounce (inventory or peer changes);
   * several calls in the window make one. Failures are logged; the next change retries.
   */
  changed(): void {
    if (this.stopped || !this.o.applier || this.timer || this.pending) return;
    this.timer = setTimeout(() => {
      this.timer = undefined;
      this.pending = true;
      this.reconcile().catch((e: unknown) =>
        this.o.log.error(
          { err: (e as Error).message },
          "policy recompile failed; the previous ruleset stays",
        ),
      );
    }, this.o.debounceMs ?? DEBOUNCE_MS);
    this.timer.unref();
  }

  /** stop cancels a scheduled recompile and waits for a running change to end (the live ruleset stays). */
  async stop(): Promise<void> {
    this.stopped = true;
    if (this.timer) clearTimeout(this.timer);
    this.timer = undefined;
    await this.queue;
  }

  /** parseGiven validates the request's documents; the first problem throws, naming the field. */
  private parseGiven(manifestsJson: readonly string[], field = "manifests_json"): Map<string, Given> {
    const out = new Map<string, Given>();
    manifestsJson.forEach((text, i) => {
      let doc: unknown;
      try {
        doc = JSON.parse(text);
      } catch (e) {
        throw invalidArgument(`${field}.${i}`, `is not JSON: ${(e as Error).message}`);
      }
      const name = (doc as { name?: unknown } | null)?.name;
      const g = this.parseDoc(doc, typeof name === "string" && name ? `${name}: ` : `${field}.${i}: `);
      if (out.has(g.policy.name))
        throw invalidArgument(`${field}.${i}`, `policy ${g.policy.name} is given twice`);
      out.set(g.policy.name, g);
    });
    return out;
  }

  /** parsePending reads the Workload documents sent along (only name and labels matter to tests). */
  private parsePending(workloadsJson: readonly string[]): PendingWorkload[] {
    return workloadsJson.map((text, i) => {
      let doc: unknown;
      try {
        doc = JSON.parse(text);
      } catch (e) {
        throw invalidArgument(`workloads_json.${i}`, `is not JSON: ${(e as Error).message}`);
      }
      const name = (doc as { name?: unknown } | null)?.name;
      const m = validateManifest(
        doc,
        typeof name === "string" && name ? `${name}: ` : `workloads_json.${i}: `,
        "Workload",
      );
      return { name: m.name, labels: { ...m.labels } };
    });
  }

  /**
   * testMesh is the mesh tests run against: the current one, plus the workloads applied along
   * with the policies on this capsule (at a placeholder address when they do not exist yet,
   * with their new labels when they do). Placeholders are never compiled into the ruleset.
   */
  private testMesh(mesh: Mesh, pending: readonly PendingWorkload[]): Mesh {
    if (pending.length === 0) return mesh;
    const used = new Set([...mesh.capsules.map((c) => c.address), ...mesh.workloads.map((w) => w.address)]);
    let next = ipToInt("100.127.255.254");
    const placeholder = () => {
      while (used.has(intToIp(next))) next--;
      const a = intToIp(next);
      used.add(a);
      return a;
    };
    const workloads = mesh.workloads.filter(
      (w) => !(w.capsule === mesh.self && pending.some((p) => p.name === w.name)),
    );
    for (const p of pending) {
      const have = mesh.workloads.find((w) => w.capsule === mesh.self && w.name === p.name);
      workloads.push({
        name: p.name,
        labels: p.labels,
        capsule: mesh.self,
        address: have?.address ?? placeholder(),
      });
    }
    return { ...mesh, workloads };
  }

  /** runAll runs every test of `policies` against them all, plus the selector warnings. */
  private runAll(policies: readonly Policy[], mesh: Mesh): { tests: TestView[]; warnings: WarningView[] } {
    const implicit = this.implicit();
    return {
      tests: runTests(policies, implicit, mesh, this.cidr).map(testView),
      warnings: warnings(policies, mesh).map(warningView),
    };
  }

  /**
   * apply creates or replaces the given policies (JSON of `kind: Policy` documents). All-or-
   * nothing: every document is validated (CAPSULE_INVALID_ARGUMENT naming the field), then every
   * test of every stored and given policy runs against their union (a failing one refuses with
   * CAPSULE_FAILED_PRECONDITION naming it), then the ruleset is compiled, checked by nft, stored
   * and applied; if nft refuses, the store is rolled back. A test naming a workload the mesh
   * does not know is skipped, not failed (a policy may precede its workloads); `workloadsJson`
   * (Workload documents applied along) makes such tests run. Idempotent: unchanged documents
   * report "unchanged". `dryRun` stops after the tests.
   */
  async apply(
    manifestsJson: readonly string[],
    dryRun = false,
    workloadsJson: readonly string[] = [],
  ): Promise<ApplyOutcome> {
    if (manifestsJson.length === 0)
      throw invalidArgument("manifests_json", "is empty", "send at least one kind: Policy document");
    const given = this.parseGiven(manifestsJson);
    const pending = this.parsePending(workloadsJson);
    return this.serial(async () => {
      const union = new Map([...this.stored].map(([n, s]) => [n, s.policy]));
      for (const [n, g] of given) union.set(n, g.policy);
      const next = [...union.values()];
      const mesh = this.o.mesh();
      const checked = this.runAll(next, this.testMesh(mesh, pending));
      const failed = checked.tests.find((t) => !t.passed);
      if (failed) {
        throw new CapsuleError(
          ErrorCode.FailedPrecondition,
          `${testTitle(failed)}: ${failedText(failed)}; nothing changed`,
          {
            hint: `fix the policy or its test; capsulectl policy explain ${failed.from} ${failed.to} ${failed.port} shows what decides`,
            details: { policy: failed.policy, test: failed.index },
          },
        );
      }
      const results = [...given.values()]
        .map((g) => {
          const prev = this.stored.get(g.policy.name);
          const action: ApplyAction = !prev ? "created" : prev.doc === g.doc ? "unchanged" : "configured";
          return { name: g.policy.name, action, doc: g.doc };
        })
        .sort((a, b) => byName(a.name, b.name));
      const outcome: ApplyOutcome = {
        results: results.map(({ name, action }) => ({ name, action })),
        ...checked,
        // Warnings are about the real mesh, not the one with placeholders.
        warnings: warnings(next, mesh).map(warningView),
        enforced: this.enforced,
      };
      if (dryRun) return outcome;

      const changed = results.filter((r) => r.action !== "unchanged");
      const compiled = this.o.applier ? this.compile(next, mesh) : undefined;
      const now = new Date(this.o.clock.now()).toISOString();
      const previous = changed.map((r) => ({ name: r.name, row: this.o.repo.get(r.name) }));
      let stored = false;
      const store = () => {
        this.o.repo.store.tx(() => {
          for (const r of changed) this.o.repo.put({ name: r.name, doc: r.doc, updatedAt: now });
        });
        stored = true;
      };
      try {
        if (compiled) await this.enforce(compiled.script, store);
        else store();
      } catch (e) {
        if (stored) this.restore(previous);
        throw e;
      }
      for (const r of changed)
        this.stored.set(r.name, { policy: union.get(r.name)!, doc: r.doc, updatedAt: now });
      this.o.log.info(
        { policies: outcome.results.map((r) => `${r.name} ${r.action}`), enforced: this.enforced },
        "policies applied",
      );
      return outcome;
    });
  }

  /** restore puts the rows back as they were before a change nft refused. */
  private restore(previous: readonly { name: string; row: PolicyRow | undefined }[]): void {
    this.o.repo.store.tx(() => {
      for (const p of previous) {
        if (p.row) this.o.repo.put(p.row);
        else this.o.repo.delete(p.name);
      }
    });
  }

  /**
   * delete removes a policy and applies the ruleset without it (what it allowed is denied
   * again). Idempotent: an unknown name returns false and changes nothing. All-or-nothing like
   * {@link apply}.
   */
  delete(name: string): Promise<boolean> {
    if (!name) throw invalidArgument("name", "is required");
    return this.serial(async () => {
      const prev = this.o.repo.get(name);
      if (!prev && !this.stored.has(name)) return false;
      const next = this.policies().filter((p) => p.name !== name);
      const compiled = this.o.applier ? this.compile(next, this.o.mesh()) : undefined;
      let removed = false;
      const remove = () => {
        this.o.repo.store.tx(() => this.o.repo.delete(name));
        removed = true;
      };
      try {
        if (compiled) await this.enforce(compiled.script, remove);
        else remove();
      } catch (e) {
        if (removed && prev) this.restore([{ name, row: prev }]);
        throw e;
      }
      this.stored.delete(name);
      this.o.log.info({ policy: name }, "policy deleted");
      return true;
    });
  }

  /** list returns the stored policies by name. Read-only. */
  list(): PolicySummaryView[] {
    return [...this.stored.entries()]
      .sort(([a], [b]) => byName(a, b))
      .map(([name, s]) => ({
        name,
        rules: s.policy.allow.length,
        tests: s.policy.tests.length,
        updatedAt: s.updatedAt,
        docJson: s.doc,
      }));
  }

  /** ruleCount is the number of allow rules in force (written and implicit). */
  ruleCount(): number {
    return this.policies().reduce((n, p) => n + p.allow.length, 0) + this.implicit().length;
  }

  /**
   * drops returns the packets dropped by policy per local workload since this capsuled started
   * (monotonic; see NftPolicyApplier.dropCounters). Empty when not enforced.
   */
  async drops(): Promise<Map<string, bigint>> {
    const out = new Map<string, bigint>();
    if (!this.o.applier) return out;
    const local = new Map<string, string>();
    const mesh = this.o.mesh();
    for (const w of mesh.workloads)
      if (w.capsule === mesh.self) {
        try {
          local.set(counterName(w.name), w.name);
        } catch {
          // not a name the compiler gives a counter
        }
      }
    for (const [counter, n] of await this.o.applier.dropCounters()) {
      // A workload deleted since keeps its count: counterName maps dashes to underscores and
      // workload names have none, so the name comes back.
      const name =
        local.get(counter) ?? (counter.startsWith("wl_") ? counter.slice(3).replace(/_/g, "-") : undefined);
      if (name !== undefined) out.set(name, n);
    }
    return out;
  }

  /**
   * show lists, per workload on this capsule (by name), every rule that lets traffic in: its
   * origin, its `from` selector as written, what that resolves to now and its ports. A workload
   * with none is denied everything but its own capsule. Plus the selectors that match nothing.
   * Read-only.
   */
  async show(): Promise<ShowView> {
    const mesh = this.o.mesh();
    const policies = this.policies();
    const ranked = rankedRules(policies, this.implicit());
    const drops = await this.drops().catch(() => new Map<string, bigint>());
    const names = new Map<string, string>();
    for (const c of mesh.capsules) names.set(c.address, `capsule ${c.name}`);
    for (const w of mesh.workloads)
      names.set(w.address, w.capsule === mesh.self ? w.name : `${w.name}@${w.capsule}`);
    const local = mesh.workloads
      .filter((w) => w.capsule === mesh.self)
      .sort((a, b) => byName(a.name, b.name));
    return {
      workloads: local.map((w) => ({
        name: w.name,
        address: w.address,
        allow: ranked
          .filter((r) => resolveSelector(r.rule.to, mesh).includes(w.address))
          .map((r) => ({
            origin: "policy" in r.ref ? `policy ${r.ref.policy}` : `implicit ${r.ref.origin}`,
            policy: "policy" in r.ref ? r.ref.policy : "",
            index: "policy" in r.ref ? r.ref.index + 1 : 0,
            from: formatSelector(r.rule.from),
            sources: resolveSelector(r.rule.from, mesh)
              .filter((a) => a !== w.address)
              .map((a) => `${names.get(a) ?? "?"} (${a})`),
            ports: r.rule.ports.map(formatPort),
          })),
        drops: String(drops.get(w.name) ?? 0n),
      })),
      warnings: warnings(policies, mesh).map(warningView),
      enforced: this.enforced,
      policies: policies.length,
    };
  }

  /**
   * explain decides whether `src` reaches `dst` on `port` ("5432/tcp", "53/udp", "icmp") under
   * the stored policies and this capsule's view of the mesh. `src` and `dst` are workload names,
   * capsule names or fabric addresses. Read-only; CAPSULE_INVALID_ARGUMENT names a bad argument.
   */
  explain(src: string, dst: string, port: string): ExplainView {
    if (!src) throw invalidArgument("src", "is required", "a workload name or fabric address");
    if (!dst) throw invalidArgument("dst", "is required", "a workload name or fabric address");
    const p = parsePolicyPort(port, "port", true);
    const mesh = this.o.mesh();
    const tuple = {
      src: endpointAddress(mesh, src, "src"),
      dst: endpointAddress(mesh, dst, "dst"),
      proto: p.proto,
      port: p.from,
    };
    const policies = this.policies();
    const implicit = this.implicit();
    const v = decide(policies, implicit, mesh, tuple, this.cidr);
    let text = explainVerdict(v, tuple, policies, implicit, mesh);
    if (v.judge !== undefined && v.judge !== mesh.self)
      text += `\njudged by capsule ${v.judge}, with its own policies: ask it with capsulectl --capsule ${v.judge} policy explain ${src} ${dst} ${port}`;
    return {
      allowed: v.allowed,
      rule: v.rule ? formatRuleRef(v.rule) : "",
      text,
      srcAddress: tuple.src,
      dstAddress: tuple.dst,
    };
  }

  /**
   * test runs the tests of the given policies and of every stored one against their union (the
   * given ones replace stored ones of the same name), storing nothing. Read-only.
   */
  test(
    manifestsJson: readonly string[],
    workloadsJson: readonly string[] = [],
  ): { tests: TestView[]; warnings: WarningView[]; passed: boolean } {
    const given = this.parseGiven(manifestsJson);
    const pending = this.parsePending(workloadsJson);
    const union = new Map([...this.stored].map(([n, s]) => [n, s.policy]));
    for (const [n, g] of given) union.set(n, g.policy);
    const mesh = this.o.mesh();
    const r = this.runAll([...union.values()], this.testMesh(mesh, pending));
    return {
      tests: r.tests,
      warnings: warnings([...union.values()], mesh).map(warningView),
      passed: r.tests.every((t) => t.passed),
    };
  }
}

/** nftRefused wraps nft's refusal of a compiled ruleset (a bug, or a kernel without a feature). */
function nftRefused(e: unknown): CapsuleError {
  const ce = toCapsuleError(e);
  return new CapsuleError(
    isCapsuleError(e) ? ce.code : ErrorCode.Internal,
    `nft refused the policy ruleset; nothing changed: ${ce.message}`,
    { hint: "the previous ruleset stays in force; see capsuled's log", cause: e },
  );
}

function testView(r: TestResult): TestView {
  const skipped = r.verdict === undefined;
  return {
    policy: r.policy,
    index: r.index + 1,
    from: r.test.from,
    to: r.test.to,
    port: formatPort(r.test.port),
    expect: r.test.expect,
    got: r.verdict ? (r.verdict.allowed ? "allow" : "deny") : "",
    rule: r.verdict?.rule ? formatRuleRef(r.verdict.rule) : "",
    passed: r.passed || skipped,
    skipped,
    message: r.message,
  };
}

function warningView(w: Warning): WarningView {
  return { policy: w.policy, index: w.index + 1, side: w.side, message: w.message };
}

/** testTitle names a test: `policy web-db test 2 (db -> web 8080/tcp)`. */
function testTitle(t: TestView): string {
  return `policy ${t.policy} test ${t.index} (${t.from} -> ${t.to} ${t.port})`;
}

/** failedText says how a test failed: `expected deny, got allow by policy x rule 1`. */
function failedText(t: TestView): string {
  const how = t.rule
    ? ` by ${t.rule}`
    : t.got === "allow"
      ? ` (${t.message.replace(/^.*got allowed: /, "")})`
      : "";
  return `expected ${t.expect}, got ${t.got}${how}`;
}
