/**
 * fast-check generators for the policy compiler's property tests (unit and root): small random
 * meshes, policies and packets, with names, labels and ports drawn from small alphabets so
 * that selectors hit, overlap and miss often.
 */
import fc from "fast-check";
import type { ImplicitRule, Mesh, Policy, PortRange, Rule, Selector } from "../../src/fabric/policy/model.js";
import { type PacketTuple, resolveSelector } from "../../src/fabric/policy/evaluate.js";

const CAPSULES = ["c0", "c1", "c2", "c3"];
const NAMES = ["a", "b", "c", "d", "e-f", "g"];
const LABEL_KEYS = ["app", "tier"];
const LABEL_VALUES = ["x", "y"];

/** capsuleAddr is capsule i's own address: pool i+1, host 1. */
export const capsuleAddr = (i: number) => `100.64.${i + 1}.1`;

/** UNKNOWN_FABRIC is a fabric address no generated mesh uses; OUTSIDE is not in the fabric. */
export const UNKNOWN_FABRIC = "100.64.1.200";
export const OUTSIDE = "192.0.2.1";

const labels = fc.dictionary(fc.constantFrom(...LABEL_KEYS), fc.constantFrom(...LABEL_VALUES), {
  maxKeys: 2,
});

/** meshArb: 1-4 capsules (some edges), 0-8 workloads (a name may run on two capsules), random labels. */
export const meshArb: fc.Arbitrary<Mesh> = fc
  .record({
    n: fc.integer({ min: 1, max: 4 }),
    edges: fc.array(fc.boolean(), { minLength: 4, maxLength: 4 }),
    workloads: fc.array(fc.record({ name: fc.constantFrom(...NAMES), capsule: fc.nat(3), labels }), {
      maxLength: 8,
    }),
    self: fc.nat(3),
  })
  .map(({ n, edges, workloads, self }) => {
    const seen = new Set<string>();
    const ws = workloads
      .map((w) => ({ ...w, capsule: w.capsule % n }))
      .filter((w) => {
        const k = `${w.capsule}/${w.name}`;
        if (seen.has(k)) return false;
        seen.add(k);
        return true;
      });
    return {
      self: CAPSULES[self % n]!,
      capsules: CAPSULES.slice(0, n).map((name, i) => ({ name, address: capsuleAddr(i), edge: edges[i]! })),
      workloads: ws.map((w, i) => ({
        name: w.name,
        address: `100.64.${w.capsule + 1}.${10 + i}`,
        labels: w.labels,
        capsule: CAPSULES[w.capsule]!,
      })),
    };
  });

const selectorArb: fc.Arbitrary<Selector> = fc.oneof(
  fc.constantFrom(...NAMES, "zz").map((workload) => ({ workload })),
  labels.map((l) => ({ labels: l })),
  fc.constantFrom(...CAPSULES, "c9").map((capsule) => ({ capsule })),
  fc.constantFrom(...CAPSULES, "c9").map((edge) => ({ edge })),
);

/** portArb: tcp/udp ranges in a small window (so they overlap and touch), the extremes, or icmp. */
export const portArb: fc.Arbitrary<PortRange> = fc.oneof(
  {
    weight: 4,
    arbitrary: fc
      .record({
        proto: fc.constantFrom("tcp" as const, "udp" as const),
        from: fc.integer({ min: 1, max: 20 }),
        len: fc.integer({ min: 0, max: 6 }),
      })
      .map(({ proto, from, len }) => ({ proto, from, to: from + len })),
  },
  {
    weight: 1,
    arbitrary: fc.constantFrom<PortRange>(
      { proto: "tcp", from: 1, to: 65535 },
      { proto: "udp", from: 65535, to: 65535 },
    ),
  },
  { weight: 1, arbitrary: fc.constant<PortRange>({ proto: "icmp", from: 0, to: 0 }) },
);

const ruleArb: fc.Arbitrary<Rule> = fc.record({
  from: selectorArb,
  to: selectorArb,
  ports: fc.array(portArb, { minLength: 1, maxLength: 3 }),
});

/** policiesArb: 0-4 policies with distinct names, 0-5 rules each, no tests. */
export const policiesArb: fc.Arbitrary<Policy[]> = fc
  .uniqueArray(
    fc.record({ name: fc.constantFrom("p0", "p1", "p2", "p3"), allow: fc.array(ruleArb, { maxLength: 5 }) }),
    {
      maxLength: 4,
      selector: (p) => p.name,
    },
  )
  .map((ps) => ps.map((p) => ({ ...p, tests: [] })));

/** implicitArb: 0-2 implicit rules. */
export const implicitArb: fc.Arbitrary<ImplicitRule[]> = fc
  .array(ruleArb, { maxLength: 2 })
  .map((rules) => rules.map((rule, i) => ({ origin: `implicit-${i}`, rule })));

/** addressPool is every address worth sending from or to in `mesh`: its workloads and capsules, an unknown fabric address, an outside one. */
export function addressPool(mesh: Mesh): string[] {
  return [
    ...mesh.workloads.map((w) => w.address),
    ...mesh.capsules.map((c) => c.address),
    UNKNOWN_FABRIC,
    OUTSIDE,
  ];
}

/** tuplesArb: up to `max` packets between addresses of `mesh` (see {@link addressPool}). */
export function tuplesArb(mesh: Mesh, max = 30): fc.Arbitrary<PacketTuple[]> {
  const pool = addressPool(mesh);
  return fc.array(
    fc.record({
      src: fc.constantFrom(...pool),
      dst: fc.constantFrom(...pool),
      proto: fc.constantFrom("tcp" as const, "udp" as const, "icmp" as const),
      port: fc.oneof(fc.integer({ min: 1, max: 28 }), fc.constant(65535)),
    }),
    { minLength: 1, maxLength: max },
  );
}

/**
 * aimedTuplesArb: packets aimed at the rules, so that many are allowed: a rule's source and
 * destination (any address its selectors resolve to) on a port at, inside or just past one of
 * its ranges.
 */
export function aimedTuplesArb(mesh: Mesh, rules: readonly Rule[], max = 20): fc.Arbitrary<PacketTuple[]> {
  if (rules.length === 0) return fc.constant([]);
  return fc
    .array(fc.tuple(fc.nat(), fc.nat(), fc.nat(), fc.nat(), fc.integer({ min: -1, max: 1 }), fc.boolean()), {
      maxLength: max,
    })
    .map((picks) =>
      picks.flatMap(([r, s, d, p, nudge, end]) => {
        const rule = rules[r % rules.length]!;
        const srcs = resolveSelector(rule.from, mesh);
        const dsts = resolveSelector(rule.to, mesh);
        const port = rule.ports[p % rule.ports.length]!;
        if (srcs.length === 0 || dsts.length === 0) return [];
        const n = (end ? port.to : port.from) + nudge;
        return [
          {
            src: srcs[s % srcs.length]!,
            dst: dsts[d % dsts.length]!,
            proto: port.proto,
            port: port.proto === "icmp" ? 0 : Math.min(65535, Math.max(1, n)),
          },
        ];
      }),
    );
}

/** caseArb: a mesh, policies, implicit rules and packets to judge (random ones and ones aimed at the rules). */
export const caseArb = meshArb.chain((mesh) =>
  fc.record({ policies: policiesArb, implicit: implicitArb }).chain(({ policies, implicit }) => {
    const rules = [...policies.flatMap((p) => p.allow), ...implicit.map((r) => r.rule)];
    return fc.record({
      mesh: fc.constant(mesh),
      policies: fc.constant(policies),
      implicit: fc.constant(implicit),
      tuples: fc
        .tuple(tuplesArb(mesh, 15), aimedTuplesArb(mesh, rules))
        .map(([random, aimed]) => [...random, ...aimed]),
    });
  }),
);
