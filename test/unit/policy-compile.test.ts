// The policy compiler: golden nft text, input checks, the IR, and the property that the IR
// (read the way the nft rules read it) decides every packet exactly as the direct evaluator.
import fc from "fast-check";
import t from "tap";
import {
  compilePolicy,
  counterName,
  decideCompiled,
  POLICY_TABLE,
  type PolicyCompileInput,
  UNKNOWN_COUNTER,
} from "../../src/fabric/policy/compile.js";
import { decide } from "../../src/fabric/policy/evaluate.js";
import type { Mesh, Policy, PortRange } from "../../src/fabric/policy/model.js";
import { caseArb } from "../helpers/policy-arb.js";

const MESH: Mesh = {
  self: "home",
  capsules: [
    { name: "home", address: "100.64.1.1", edge: false },
    { name: "away", address: "100.64.2.1", edge: false },
    { name: "edge1", address: "100.64.3.1", edge: true },
  ],
  workloads: [
    { name: "web", address: "100.64.1.2", labels: { app: "web" }, capsule: "home" },
    { name: "db", address: "100.64.1.3", labels: { app: "db" }, capsule: "home" },
    { name: "metrics-db", address: "100.64.1.10", labels: { app: "db" }, capsule: "home" },
    { name: "api", address: "100.64.2.2", labels: { app: "api" }, capsule: "away" },
  ],
};
const tcp = (from: number, to = from): PortRange => ({ proto: "tcp", from, to });
const icmp: PortRange = { proto: "icmp", from: 0, to: 0 };
const POLICIES: Policy[] = [
  {
    name: "web-db",
    allow: [
      { from: { workload: "web" }, to: { labels: { app: "db" } }, ports: [tcp(5432)] },
      { from: { capsule: "away" }, to: { workload: "db" }, ports: [tcp(5432), tcp(5433, 5440), icmp] },
    ],
    tests: [],
  },
  {
    name: "dns",
    allow: [
      {
        from: { labels: { app: "api" } },
        to: { workload: "web" },
        ports: [{ proto: "udp", from: 53, to: 53 }],
      },
    ],
    tests: [],
  },
];
const INPUT: PolicyCompileInput = {
  policies: POLICIES,
  implicit: [
    {
      origin: "expose web --edge edge1",
      rule: { from: { edge: "edge1" }, to: { workload: "web" }, ports: [tcp(8080)] },
    },
  ],
  mesh: MESH,
  fabricIface: "capsule0",
  fabricCidr: "100.64.0.0/10",
};

const GOLDEN = `table inet capsule_policy {
}
delete table inet capsule_policy
table inet capsule_policy {
	counter wl_db {
		packets 0 bytes 0
	}

	counter wl_metrics_db {
		packets 0 bytes 0
	}

	counter wl_web {
		packets 0 bytes 0
	}

	counter unknown_dst {
		packets 0 bytes 0
	}

	set allow_tcp {
		type ipv4_addr . ipv4_addr . inet_service
		flags interval
		elements = { 100.64.1.2 . 100.64.1.3 . 5432, 100.64.1.2 . 100.64.1.10 . 5432, 100.64.2.1 . 100.64.1.3 . 5432-5440, 100.64.2.2 . 100.64.1.3 . 5432-5440, 100.64.3.1 . 100.64.1.2 . 8080 }
	}

	set allow_udp {
		type ipv4_addr . ipv4_addr . inet_service
		flags interval
		elements = { 100.64.2.2 . 100.64.1.2 . 53 }
	}

	set allow_icmp {
		type ipv4_addr . ipv4_addr
		elements = { 100.64.2.1 . 100.64.1.3, 100.64.2.2 . 100.64.1.3 }
	}

	set allow_visitors_tcp {
		type ipv4_addr . inet_service
		flags interval
	}

	map drop_counters {
		type ipv4_addr : counter
		elements = { 100.64.1.2 : "wl_web", 100.64.1.3 : "wl_db", 100.64.1.10 : "wl_metrics_db" }
	}

	chain forward {
		type filter hook forward priority filter; policy accept;
		meta nfproto != ipv4 accept
		ip daddr != 100.64.0.0/10 accept
		oifname "capsule0" accept
		ct direction reply accept
		ct state related meta l4proto icmp accept
		ct status dnat accept
		ip saddr . ip daddr . tcp dport @allow_tcp accept
		iifname "capsule0" ip saddr != 100.64.0.0/10 ip daddr . tcp dport @allow_visitors_tcp accept
		ip saddr . ip daddr . udp dport @allow_udp accept
		meta l4proto icmp ip saddr . ip daddr @allow_icmp accept
		counter name ip daddr map @drop_counters drop
		counter name "unknown_dst" drop
	}
}
`;

t.test("compilePolicy golden: a small mesh, two policies and an implicit rule", async (t) => {
  const out = compilePolicy(INPUT);
  t.equal(out.script, GOLDEN);
  t.equal(POLICY_TABLE, "capsule_policy");
  t.same(out.warnings, []);
  t.same(out.ir.self, { name: "home", address: "100.64.1.1" });
  t.same(out.ir.local, [
    { name: "web", address: "100.64.1.2", counter: "wl_web" },
    { name: "db", address: "100.64.1.3", counter: "wl_db" },
    { name: "metrics-db", address: "100.64.1.10", counter: "wl_metrics_db" },
  ]);
  t.same(out.ir.icmp, [
    { src: "100.64.2.1", dst: "100.64.1.3" },
    { src: "100.64.2.2", dst: "100.64.1.3" },
  ]);
  t.equal(
    compilePolicy({ ...INPUT, policies: [...POLICIES].reverse() }).script,
    GOLDEN,
    "input order is irrelevant",
  );
});

t.test("compilePolicy: no policy, no workloads: empty sets, everything to the fabric dropped", async (t) => {
  const out = compilePolicy({
    policies: [],
    implicit: [],
    mesh: { self: "home", capsules: [MESH.capsules[0]!], workloads: [] },
    fabricIface: "wg-fab",
    fabricCidr: "100.64.0.0/10",
  });
  t.match(
    out.script,
    "\tset allow_tcp {\n\t\ttype ipv4_addr . ipv4_addr . inet_service\n\t\tflags interval\n\t}\n",
  );
  t.match(out.script, "\tmap drop_counters {\n\t\ttype ipv4_addr : counter\n\t}\n");
  t.match(out.script, '\t\toifname "wg-fab" accept\n');
  t.same(out.ir, {
    self: { name: "home", address: "100.64.1.1" },
    fabricIface: "wg-fab",
    fabricCidr: "100.64.0.0/10",
    tcp: [],
    udp: [],
    icmp: [],
    visitorsTcp: [],
    local: [],
  });
  t.same(
    decideCompiled(out.ir, { src: "100.64.2.2", dst: "100.64.1.7", proto: "tcp", port: 80, oif: "local" }),
    {
      allowed: false,
      judged: true,
      counter: UNKNOWN_COUNTER,
    },
    "a workload not in the inventory yet is denied",
  );
});

t.test("compilePolicy: port ranges merge where they overlap or touch (nft refuses overlaps)", async (t) => {
  const p: Policy = {
    name: "p",
    allow: [
      {
        from: { workload: "api" },
        to: { workload: "web" },
        ports: [tcp(10, 20), tcp(15, 30), tcp(31), tcp(40, 41)],
      },
      { from: { labels: { app: "api" } }, to: { workload: "web" }, ports: [tcp(41, 45), tcp(1, 65535)] },
      { from: { workload: "api" }, to: { workload: "db" }, ports: [tcp(41, 45), tcp(20), icmp, icmp] },
    ],
    tests: [],
  };
  const { ir } = compilePolicy({ ...INPUT, policies: [p], implicit: [] });
  t.same(ir.tcp, [
    { src: "100.64.2.2", dst: "100.64.1.2", from: 1, to: 65535 },
    { src: "100.64.2.2", dst: "100.64.1.3", from: 20, to: 20 },
    { src: "100.64.2.2", dst: "100.64.1.3", from: 41, to: 45 },
  ]);
  t.same(ir.icmp, [{ src: "100.64.2.2", dst: "100.64.1.3" }]);
  const q: Policy = {
    name: "q",
    allow: [
      {
        from: { workload: "api" },
        to: { workload: "web" },
        ports: [tcp(10, 20), tcp(15, 30), tcp(31), tcp(40, 41)],
      },
    ],
    tests: [],
  };
  t.same(
    compilePolicy({ ...INPUT, policies: [q], implicit: [] }).ir.tcp.map((e) => [e.from, e.to]),
    [
      [10, 31],
      [40, 41],
    ],
  );
});

t.test("compilePolicy: only local destinations; no entry from a workload to itself", async (t) => {
  const p: Policy = {
    name: "p",
    allow: [
      { from: { capsule: "home" }, to: { capsule: "home" }, ports: [tcp(80)] },
      { from: { workload: "web" }, to: { workload: "api" }, ports: [tcp(80)] },
    ],
    tests: [],
  };
  const { ir } = compilePolicy({ ...INPUT, policies: [p], implicit: [] });
  t.same(
    ir.tcp.map((e) => `${e.src}>${e.dst}`),
    [
      "100.64.1.1>100.64.1.2",
      "100.64.1.1>100.64.1.3",
      "100.64.1.1>100.64.1.10",
      "100.64.1.2>100.64.1.3",
      "100.64.1.2>100.64.1.10",
      "100.64.1.3>100.64.1.2",
      "100.64.1.3>100.64.1.10",
      "100.64.1.10>100.64.1.2",
      "100.64.1.10>100.64.1.3",
    ],
    "api runs on away: its capsule compiles that rule",
  );
  const away = compilePolicy({ ...INPUT, policies: [p], implicit: [], mesh: { ...MESH, self: "away" } }).ir;
  t.same(away.tcp, [{ src: "100.64.1.2", dst: "100.64.2.2", from: 80, to: 80 }]);
});

t.test("compilePolicy: warnings come from the evaluator", async (t) => {
  const p: Policy = {
    name: "p",
    allow: [{ from: { workload: "ghost" }, to: { workload: "web" }, ports: [tcp(1)] }],
    tests: [],
  };
  t.same(compilePolicy({ ...INPUT, policies: [p] }).warnings, [
    {
      policy: "p",
      index: 0,
      side: "from",
      message: "{workload: ghost} matches nothing: no workload named ghost in the mesh",
    },
  ]);
});

t.test("compilePolicy: bad inputs are refused naming the field", async (t) => {
  const bad = (over: Partial<PolicyCompileInput>, message: RegExp) =>
    t.throws(
      () => compilePolicy({ ...INPUT, ...over }),
      { code: "CAPSULE_INVALID_ARGUMENT", message },
      String(message),
    );
  bad({ fabricIface: "capsule0; flush ruleset" }, /^fabricIface: /);
  bad({ fabricIface: "a-very-long-interface" }, /^fabricIface: /);
  bad({ fabricCidr: "100.64.0.0" }, /^fabricCidr: .* is not an IPv4 CIDR/);
  bad({ fabricCidr: "100.64.0.1/10" }, /^fabricCidr: .* has host bits set/);
  bad({ fabricCidr: "100.64.0.0/33" }, /^fabricCidr: /);
  bad({ mesh: { ...MESH, self: "nobody" } }, /^mesh\.self: capsule nobody is not in mesh\.capsules/);
  const w = MESH.workloads;
  bad(
    {
      mesh: {
        ...MESH,
        workloads: [...w, { name: "x", address: "100.64.1.999", labels: {}, capsule: "away" }],
      },
    },
    /^mesh\.workloads\.x\.address: "100\.64\.1\.999" is not an IPv4 address/,
  );
  bad(
    {
      mesh: { ...MESH, workloads: [...w, { name: "x", address: "100.64.1.2", labels: {}, capsule: "home" }] },
    },
    /^mesh\.workloads\.x\.address: 100\.64\.1\.2 is both workload web's and workload x's/,
  );
  bad(
    {
      mesh: { ...MESH, workloads: [...w, { name: "x", address: "100.64.1.1", labels: {}, capsule: "home" }] },
    },
    /capsule home's and workload x's/,
  );
  bad(
    {
      mesh: {
        ...MESH,
        workloads: [...w, { name: "web", address: "100.64.1.50", labels: {}, capsule: "home" }],
      },
    },
    /workload web is listed twice/,
  );
  bad(
    {
      mesh: {
        ...MESH,
        workloads: [...w, { name: "Bad_Name", address: "100.64.1.50", labels: {}, capsule: "home" }],
      },
    },
    /"Bad_Name" is not a workload name/,
  );
  bad(
    {
      mesh: { ...MESH, workloads: [...w, { name: "out", address: "10.0.0.5", labels: {}, capsule: "home" }] },
    },
    /10\.0\.0\.5 is outside the fabric/,
  );
  bad(
    { mesh: { ...MESH, capsules: [...MESH.capsules, { name: "x", address: "100.64.1", edge: false }] } },
    /^mesh\.capsules\.x\.address: "100\.64\.1" is not an IPv4 address/,
  );
  bad(
    {
      policies: [
        {
          name: "p",
          allow: [{ from: { workload: "web" }, to: { workload: "db" }, ports: [tcp(9, 8)] }],
          tests: [],
        },
      ],
    },
    /^p: allow\.0\.ports\.0: /,
  );
  bad(
    {
      policies: [
        {
          name: "p",
          allow: [{ from: { workload: "web" }, to: { workload: "db" }, ports: [tcp(0)] }],
          tests: [],
        },
      ],
    },
    /^p: allow\.0\.ports\.0: /,
  );
  bad({ counters: { wl_db: { packets: -1, bytes: 0 } } }, /^counters\.wl_db: -1 is not a counter value/);
  // A workload elsewhere may have any name (only local names become counter names), and an
  // address may be listed by two capsules for a moment (a workload migrating).
  t.same(
    compilePolicy({
      ...INPUT,
      mesh: {
        ...MESH,
        workloads: [...w, { name: "web", address: "100.64.1.2", labels: {}, capsule: "away" }],
      },
    }).ir.local,
    compilePolicy(INPUT).ir.local,
  );
  t.doesNotThrow(() =>
    compilePolicy({
      ...INPUT,
      mesh: {
        ...MESH,
        workloads: [...w, { name: "Any_Name", address: "100.64.2.9", labels: {}, capsule: "away" }],
      },
    }),
  );
});

t.test("compilePolicy: counters keep their values across a replace when given", async (t) => {
  const out = compilePolicy({
    ...INPUT,
    counters: { wl_db: { packets: 7, bytes: 420 }, gone: { packets: 1, bytes: 1 } },
  });
  t.match(out.script, "\tcounter wl_db {\n\t\tpackets 7 bytes 420\n\t}\n");
  t.notMatch(out.script, "gone");
  t.same(out.ir, compilePolicy(INPUT).ir, "counters are not part of the IR");
});

t.test("counterName: nft identifiers, one-to-one on workload names", async (t) => {
  t.equal(counterName("web"), "wl_web");
  t.equal(counterName("metrics-db-2"), "wl_metrics_db_2");
  t.equal(counterName("0a"), "wl_0a");
  t.not(counterName("unknown"), UNKNOWN_COUNTER);
  for (const bad of ["", "Web", "a_b", "-a", "a b", "x".repeat(64)])
    t.throws(() => counterName(bad), { code: "CAPSULE_INVALID_ARGUMENT" }, JSON.stringify(bad));
  fc.assert(
    fc.property(
      fc.stringMatching(/^[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?$/),
      fc.stringMatching(/^[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?$/),
      (a, b) => {
        const ca = counterName(a);
        t.ok(/^[A-Za-z_][A-Za-z0-9_]*$/.test(ca));
        return a === b || ca !== counterName(b);
      },
    ),
    { numRuns: 300 },
  );
});

t.test("decideCompiled: what never reaches the set lookups passes", async (t) => {
  const { ir } = compilePolicy(INPUT);
  const p = { src: "100.64.2.2", dst: "100.64.1.2", proto: "tcp" as const, port: 80 };
  t.same(decideCompiled(ir, p), { allowed: false, judged: true, counter: "wl_web" });
  t.same(decideCompiled(ir, { ...p, reply: true }), { allowed: true, judged: false }, "reply direction");
  t.same(decideCompiled(ir, { ...p, dnat: true }), { allowed: true, judged: false }, "hostPort publish");
  t.same(
    decideCompiled(ir, { ...p, oif: "fabric" }),
    { allowed: true, judged: false },
    "leaving through the fabric",
  );
  t.same(
    decideCompiled(ir, { ...p, dst: "100.64.2.3" }),
    { allowed: true, judged: false },
    "not local: routed to the fabric",
  );
  t.same(decideCompiled(ir, { ...p, dst: "8.8.8.8" }), { allowed: true, judged: false }, "not the fabric");
  t.same(
    decideCompiled(ir, { ...p, src: "100.64.1.1" }),
    { allowed: true, judged: false },
    "from the capsule itself",
  );
  t.same(
    decideCompiled(ir, { ...p, dst: "100.64.1.1" }),
    { allowed: true, judged: false },
    "to the capsule itself",
  );
  t.same(
    decideCompiled(ir, { ...p, src: "100.64.1.2" }),
    { allowed: true, judged: false },
    "to its own address",
  );
  t.same(decideCompiled(ir, { ...p, proto: "udp", port: 53 }), { allowed: true, judged: true });
  t.same(decideCompiled(ir, { ...p, dst: "100.64.1.3", proto: "icmp", port: 0 }), {
    allowed: true,
    judged: true,
  });
  t.same(decideCompiled(ir, { ...p, dst: "100.64.1.3", port: 5441 }), {
    allowed: false,
    judged: true,
    counter: "wl_db",
  });
});

t.test("property: the compiled IR decides every packet as the direct evaluator does", async (t) => {
  let judged = 0;
  let allowed = 0;
  fc.assert(
    fc.property(caseArb, ({ mesh, policies, implicit, tuples }) => {
      const irs = new Map(
        mesh.capsules.map((c) => [
          c.name,
          compilePolicy({
            policies,
            implicit,
            mesh: { ...mesh, self: c.name },
            fabricIface: "capsule0",
            fabricCidr: "100.64.0.0/10",
          }).ir,
        ]),
      );
      for (const tuple of tuples) {
        const v = decide(policies, implicit, mesh, tuple);
        for (const [name, ir] of irs) {
          const ctx = `${JSON.stringify(tuple)} at ${name}: ${JSON.stringify(v)}`;
          if (v.judge === name) {
            const c = decideCompiled(ir, tuple);
            if (c.allowed !== v.allowed || !c.judged)
              throw new Error(`judged: ${ctx} vs ${JSON.stringify(c)}`);
            judged++;
            if (v.allowed) allowed++;
          } else if (v.reason === "no-rule" && v.judge === undefined) {
            // A fabric address the inventory does not know, routed to a local veth (a workload
            // created a moment ago): dropped, unless the capsule itself sends it (never forwarded).
            const c = decideCompiled(ir, { ...tuple, oif: "local" });
            const want =
              tuple.src === ir.self.address
                ? { allowed: true, judged: false }
                : { allowed: false, judged: true, counter: "unknown_dst" };
            if (JSON.stringify(c) !== JSON.stringify(want))
              throw new Error(`unknown: ${ctx} vs ${JSON.stringify(c)}`);
          } else {
            const c = decideCompiled(ir, tuple);
            if (!c.allowed || c.judged) throw new Error(`elsewhere: ${ctx} vs ${JSON.stringify(c)}`);
          }
        }
      }
    }),
    { numRuns: 1000 },
  );
  t.ok(judged > 1000, `${judged} judged packets compared`);
  t.ok(allowed > 100, `${allowed} of them allowed`);
});
