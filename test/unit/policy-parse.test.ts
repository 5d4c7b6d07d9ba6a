// The policy language: ports, selectors, tests, `kind: Policy` through the manifest validator
// (what the CLI runs) and through parse.ts (what the node runs). Every error names the field.
import { readdirSync, readFileSync, statSync } from "node:fs";
import { join, relative } from "node:path";
import t from "tap";
import { parseManifests, validateManifest } from "../../src/api/manifest.js";
import {
  parsePolicy,
  parsePort,
  parseRule,
  parseSelector,
  parseTest,
  parseTestPort,
  toPolicy,
} from "../../src/fabric/policy/parse.js";
import { REPO } from "../helpers/capsuled.js";

const BAD = { code: "CAPSULE_INVALID_ARGUMENT" };

t.test("parsePort: tcp, udp, ranges, icmp", async (t) => {
  t.same(parsePort("5432/tcp", "f"), { proto: "tcp", from: 5432, to: 5432 });
  t.same(parsePort("8000-8100/udp", "f"), { proto: "udp", from: 8000, to: 8100 });
  t.same(parsePort("1-65535/tcp", "f"), { proto: "tcp", from: 1, to: 65535 });
  t.same(parsePort("7-7/udp", "f"), { proto: "udp", from: 7, to: 7 });
  t.same(parsePort("icmp", "f"), { proto: "icmp", from: 0, to: 0 });
  t.same(parseTestPort("53/udp", "f"), { proto: "udp", from: 53, to: 53 });
});

t.test("parsePort: each bad port names the field and says what is wrong", async (t) => {
  const f = "policies/web-db.yaml: allow.0.ports.1";
  const cases: [unknown, RegExp][] = [
    ["0/tcp", /: 0 is not a port \(1-65535\)$/],
    ["65536/tcp", /: 65536 is not a port/],
    ["10-70000/udp", /: 70000 is not a port/],
    ["8100-8000/udp", /: 8100-8000 is an empty range$/],
    ["53/sctp", /: "sctp" is not a protocol$/],
    ["53/TCP", /: "TCP" is not a protocol$/],
    ["5432", /: "5432" is not a port$/],
    ["05432/tcp", /: "05432\/tcp" is not a port$/],
    ["tcp/5432", /is not a port/],
    ["icmp/1", /is not a port/],
    ["", /is not a port/],
    [5432, /: must be a string$/],
  ];
  for (const [text, msg] of cases) {
    t.throws(() => parsePort(text, f), { ...BAD, message: msg }, JSON.stringify(text));
    t.throws(() => parsePort(text, f), { message: new RegExp(`^${f.replace(/\./g, "\\.")}: `) });
  }
  t.throws(() => parseTestPort("8000-8100/tcp", "tests.0.port"), {
    ...BAD,
    message: 'tests.0.port: "8000-8100/tcp" is a range',
  });
});

t.test("parseSelector: exactly one known key", async (t) => {
  t.same(parseSelector({ workload: "web" }, "s"), { workload: "web" });
  t.same(parseSelector({ labels: { app: "db", "k8s.io/tier": "x" } }, "s"), {
    labels: { app: "db", "k8s.io/tier": "x" },
  });
  t.same(parseSelector({ labels: {} }, "s"), { labels: {} }, "an empty map is valid (matches nothing)");
  t.same(parseSelector({ capsule: "home" }, "s"), { capsule: "home" });
  t.same(parseSelector({ edge: "edge1" }, "s"), { edge: "edge1" });
  t.throws(() => parseSelector({}, "allow.0.from"), {
    ...BAD,
    message: "allow.0.from: is an empty selector",
  });
  t.throws(() => parseSelector({ workload: "web", capsule: "home" }, "allow.0.from"), {
    ...BAD,
    message: "allow.0.from: has 2 keys (workload, capsule); a selector has exactly one",
  });
  t.throws(() => parseSelector({ wrkload: "web" }, "allow.0.to"), {
    ...BAD,
    message: "allow.0.to.wrkload: is not a known field",
  });
  t.throws(() => parseSelector("web", "allow.0.to"), { message: "allow.0.to: is not a mapping" });
  t.throws(() => parseSelector({ workload: "Web" }, "allow.0.to"), {
    message: 'allow.0.to.workload: "Web" is not a workload name',
  });
  t.throws(() => parseSelector({ edge: 3 }, "allow.0.to"), {
    message: "allow.0.to.edge: 3 is not a capsule name",
  });
  t.throws(() => parseSelector({ labels: ["app"] }, "x"), { message: "x.labels: is not a mapping" });
  t.throws(() => parseSelector({ labels: { app: 1 } }, "x"), {
    message: /^x\.labels\.app: must be a string/,
  });
  t.throws(() => parseSelector({ labels: { "-bad": "1" } }, "x"), {
    message: 'x.labels: "-bad" is not a label key',
  });
});

t.test("parseRule and parseTest", async (t) => {
  t.same(
    parseRule({ from: { workload: "web" }, to: { labels: { app: "db" } }, ports: ["5432/tcp", "icmp"] }, "r"),
    {
      from: { workload: "web" },
      to: { labels: { app: "db" } },
      ports: [
        { proto: "tcp", from: 5432, to: 5432 },
        { proto: "icmp", from: 0, to: 0 },
      ],
    },
  );
  t.throws(() => parseRule({ from: { workload: "web" }, to: { workload: "db" } }, "allow.2"), {
    message: "allow.2.ports: is required",
  });
  t.throws(() => parseRule({ from: { workload: "web" }, to: { workload: "db" }, ports: [] }, "allow.2"), {
    message: "allow.2.ports: must be a non-empty list",
  });
  t.throws(
    () => parseRule({ from: { workload: "web" }, to: { workload: "db" }, ports: ["1/tcp", "0/udp"] }, "a.0"),
    {
      message: "a.0.ports.1: 0 is not a port (1-65535)",
    },
  );
  t.throws(() => parseRule({ from: { workload: "web" }, to: { workload: "db" }, port: ["1/tcp"] }, "a.0"), {
    message: "a.0.port: is not a known field",
  });
  t.same(parseTest({ from: "web", to: "db", port: "5432/tcp", expect: "allow" }, "t"), {
    from: "web",
    to: "db",
    port: { proto: "tcp", from: 5432, to: 5432 },
    expect: "allow",
  });
  t.throws(() => parseTest({ from: "web", to: "db", port: "5432/tcp", expect: "maybe" }, "tests.1"), {
    message: 'tests.1.expect: "maybe" is not allow or deny',
  });
  t.throws(() => parseTest({ from: "web", to: "db", port: "5432/tcp" }, "tests.1"), {
    message: "tests.1.expect: is required",
  });
  t.throws(() => parseTest({ from: "web", to: "db", port: "1-2/tcp", expect: "deny" }, "tests.1"), {
    message: 'tests.1.port: "1-2/tcp" is a range',
  });
});

const WEB_DB = `kind: Policy
name: web-db
allow:
  - from: { workload: web }
    to: { labels: { app: db } }
    ports: ["5432/tcp"]
tests:
  - { from: web, to: db, port: 5432/tcp, expect: allow }
  - { from: db,  to: web, port: 8080/tcp, expect: deny }
`;

t.test("parseManifests: the contract's example Policy, with workloads in the same file", async (t) => {
  const docs = parseManifests(`kind: Workload\nname: web\ncontainer: { image: x }\n---\n${WEB_DB}`, "p.yaml");
  t.equal(docs.length, 2);
  t.match(docs[0], { kind: "Workload", name: "web", restartPolicy: "Always" });
  t.same(docs[1], {
    kind: "Policy",
    name: "web-db",
    allow: [{ from: { workload: "web" }, to: { labels: { app: "db" } }, ports: ["5432/tcp"] }],
    tests: [
      { from: "web", to: "db", port: "5432/tcp", expect: "allow" },
      { from: "db", to: "web", port: "8080/tcp", expect: "deny" },
    ],
  });
  const p = docs[1]!.kind === "Policy" ? toPolicy(docs[1]!) : undefined;
  t.same(p, {
    name: "web-db",
    allow: [
      {
        from: { workload: "web" },
        to: { labels: { app: "db" } },
        ports: [{ proto: "tcp", from: 5432, to: 5432 }],
      },
    ],
    tests: [
      { from: "web", to: "db", port: { proto: "tcp", from: 5432, to: 5432 }, expect: "allow" },
      { from: "db", to: "web", port: { proto: "tcp", from: 8080, to: 8080 }, expect: "deny" },
    ],
  });
  t.same(parseManifests("kind: Policy\nname: none\n", "d.yaml"), [
    { kind: "Policy", name: "none", allow: [], tests: [] },
  ]);
  t.throws(() => parseManifests(`${WEB_DB}---\n${WEB_DB}`, "two.yaml"), {
    message: "two.yaml: web-db: Policy web-db appears twice",
  });
});

t.test("validateManifest(Policy): every error names file, document and field", async (t) => {
  const bad = (body: string) => () =>
    parseManifests(`kind: Policy\nname: web-db\n${body}`, "policies/web-db.yaml");
  const f = "policies/web-db.yaml: web-db: ";
  const rule = (ports: string, extra = "") =>
    `allow:\n  - from: { workload: web }\n    to: { workload: db }\n    ports: ${ports}\n${extra}`;
  const cases: [string, string][] = [
    [rule('["5432/tcp", "0/tcp"]'), "allow.0.ports.1: 0 is not a port (1-65535)"],
    [rule('["99999/udp"]'), "allow.0.ports.0: 99999 is not a port (1-65535)"],
    [rule('["8100-8000/tcp"]'), "allow.0.ports.0: 8100-8000 is an empty range"],
    [rule('["53/sctp"]'), 'allow.0.ports.0: "sctp" is not a protocol'],
    [rule('["http"]'), 'allow.0.ports.0: "http" is not a port'],
    [rule("[5432]"), "allow.0.ports.0: must be a string"],
    [rule("[]"), "allow.0.ports: must NOT have fewer than 1 items"],
    [rule('["1/tcp"]', "    extra: 1\n"), "allow.0.extra: is not a known field"],
    [
      "allow:\n  - from: {}\n    to: { workload: db }\n    ports: [icmp]\n",
      "allow.0.from: is an empty selector",
    ],
    [
      "allow:\n  - from: { workload: web, edge: e }\n    to: { workload: db }\n    ports: [icmp]\n",
      "allow.0.from: has 2 keys (workload, edge); a selector has exactly one",
    ],
    [
      "allow:\n  - from: { wl: web }\n    to: { workload: db }\n    ports: [icmp]\n",
      "allow.0.from.wl: is not a known field",
    ],
    ["allow:\n  - to: { workload: db }\n    ports: [icmp]\n", "allow.0.from: is required"],
    ["alow: []\n", "alow: is not a known field"],
    ["allow: {}\n", "allow: must be array"],
    [
      "tests:\n  - { from: web, to: db, port: 1-2/tcp, expect: allow }\n",
      'tests.0.port: "1-2/tcp" is a range',
    ],
    [
      "tests:\n  - { from: web, to: db, port: 0/tcp, expect: allow }\n",
      "tests.0.port: 0 is not a port (1-65535)",
    ],
    [
      "tests:\n  - { from: web, to: db, port: 1/tcp, expect: yes }\n",
      "tests.0.expect: must be one of: allow, deny",
    ],
    ["tests:\n  - { from: web, to: db, port: 1/tcp }\n", "tests.0.expect: is required"],
    ["tests:\n  - { from: web, too: db, port: 1/tcp, expect: deny }\n", "tests.0.too: is not a known field"],
  ];
  for (const [body, msg] of cases) t.throws(bad(body), { ...BAD, message: `${f}${msg}` }, msg);
});

t.test("validateManifest: kinds; Workload behaviour unchanged", async (t) => {
  t.throws(() => validateManifest({ kind: "Polcy", name: "x" }), {
    ...BAD,
    message: 'x: kind: "Polcy" is not a known kind',
    hint: "known kinds: Workload, Policy",
  });
  t.throws(() => validateManifest({ kind: "Policy", name: "x" }, "", "Workload"), {
    ...BAD,
    message: "x: kind: a Policy is not accepted here",
  });
  const w = validateManifest({ kind: "Workload", name: "web", container: { image: "x" } }, "", "Workload");
  t.same(w, {
    kind: "Workload",
    name: "web",
    container: { image: "x" },
    labels: {},
    ports: [],
    volumes: [],
    restartPolicy: "Always",
  });
  t.throws(() => validateManifest({ kind: "Workload", name: "api", container: { command: ["x"] } }), {
    message: "api: container.image: is required",
  });
  t.throws(() => validateManifest({ kind: "Workload", name: "web", container: { image: "x" }, prots: [] }), {
    message: "web: prots: is not a known field",
  });
  t.throws(() => validateManifest({ kind: "Workload", name: "web" }), {
    message: "web: container: is required",
  });
  t.throws(
    () => validateManifest({ kind: "Workload", name: "web", container: { image: "x" }, microvm: {} }),
    {
      message: "web: (document): needs exactly one of container or microvm",
    },
  );
  t.throws(
    () =>
      validateManifest({ kind: "Workload", name: "web", container: { image: "x" }, ports: [{ port: 0 }] }),
    {
      message: "web: ports.0.port: must be >= 1",
    },
  );
  t.throws(
    () => validateManifest({ kind: "Workload", name: "web", container: { image: "x" }, restartPolicy: "No" }),
    {
      message: "web: restartPolicy: must be equal to one of the allowed values",
    },
  );
  const p = validateManifest({ kind: "Policy", name: "p" });
  t.same(p, { kind: "Policy", name: "p", allow: [], tests: [] }, "no Workload defaults leak into a Policy");
});

t.test("parsePolicy: a document straight to the model; other kinds refused", async (t) => {
  const p = parsePolicy({
    kind: "Policy",
    name: "edge-web",
    allow: [{ from: { edge: "edge1" }, to: { workload: "web" }, ports: ["8080/tcp", "8443-8444/tcp"] }],
  });
  t.same(p, {
    name: "edge-web",
    allow: [
      {
        from: { edge: "edge1" },
        to: { workload: "web" },
        ports: [
          { proto: "tcp", from: 8080, to: 8080 },
          { proto: "tcp", from: 8443, to: 8444 },
        ],
      },
    ],
    tests: [],
  });
  t.throws(() => parsePolicy({ kind: "Workload", name: "w", container: { image: "x" } }), {
    message: "w: kind: a Workload is not accepted here",
  });
  t.throws(
    () =>
      parsePolicy({
        kind: "Policy",
        name: "p",
        allow: [{ from: { workload: "a" }, to: { workload: "b" }, ports: ["2-1/tcp"] }],
      }),
    {
      message: "p: allow.0.ports.0: 2-1 is an empty range",
    },
  );
  // toPolicy checks a manifest built in code (not through the schema) the same way.
  t.throws(
    () =>
      toPolicy({
        kind: "Policy",
        name: "p",
        allow: [{ from: { workload: "a" }, to: { workload: "b" }, ports: ["0/tcp"] }],
        tests: [],
      }),
    { message: "p: allow.0.ports.0: 0 is not a port (1-65535)" },
  );
});

t.test("every file under policies/ is valid: parseManifests and parse.ts agree", async (t) => {
  const dir = join(REPO, "policies");
  const walk = (d: string): string[] =>
    readdirSync(d).flatMap((f) => {
      const p = join(d, f);
      return statSync(p).isDirectory() ? walk(p) : /\.ya?ml$/.test(f) ? [p] : [];
    });
  const files = walk(dir);
  t.ok(files.length >= 3, `found ${files.map((f) => relative(REPO, f)).join(", ")}`);
  let policies = 0;
  for (const f of files) {
    const docs = parseManifests(readFileSync(f, "utf8"), relative(REPO, f));
    t.ok(docs.length > 0, `${relative(REPO, f)} has documents`);
    for (const d of docs)
      if (d.kind === "Policy") {
        t.equal(toPolicy(d).name, d.name);
        policies++;
      }
  }
  t.ok(policies >= 3, "the examples include policies");
});

t.test("the schema is valid draft-07 and describes every Policy field for editors", async (t) => {
  const schema = JSON.parse(readFileSync(join(REPO, "policies", "capsule.schema.json"), "utf8"));
  const defs = schema.definitions;
  t.same(schema.oneOf, [{ $ref: "#/definitions/Workload" }, { $ref: "#/definitions/Policy" }]);
  t.equal(defs.Policy.additionalProperties, false);
  t.equal(defs.selector.additionalProperties, false);
  t.same(Object.keys(defs.selector.properties), ["workload", "labels", "capsule", "edge"]);
  for (const k of Object.keys(defs.selector.properties)) t.ok(defs.selector.properties[k].description, k);
  const port = new RegExp(defs.policyPort.pattern);
  for (const ok of ["1/tcp", "65535/udp", "8000-8100/udp", "icmp"]) t.ok(port.test(ok), ok);
  for (const no of ["0/tcp", "65536/tcp", "1/sctp", "01/tcp", "icmp/1", "1-2-3/tcp"])
    t.notOk(port.test(no), no);
  const one = new RegExp(defs.policyTestPort.pattern);
  t.ok(one.test("5432/tcp"));
  t.notOk(one.test("1-2/tcp"));
});

t.test(
  "capsule and edge selectors keep the case of capsule names; workload names stay lowercase",
  async (t) => {
    t.same(parseSelector({ capsule: "homeB" }, "s"), { capsule: "homeB" });
    t.same(parseSelector({ edge: "Edge-1" }, "s"), { edge: "Edge-1" });
    t.throws(() => parseSelector({ workload: "Web" }, "s"), /s\.workload: "Web" is not a workload name/);
    t.throws(() => parseSelector({ capsule: "home_b" }, "s"), /s\.capsule: "home_b" is not a capsule name/);
    const doc = {
      kind: "Policy",
      name: "p",
      allow: [{ from: { capsule: "homeB" }, to: { workload: "cache" }, ports: ["6379/tcp"] }],
    };
    t.match(validateManifest(doc), { kind: "Policy" }, "the schema accepts a mixed-case capsule name");
  },
);
