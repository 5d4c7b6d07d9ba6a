// The edge's nft table: golden text for routes (sorted), no routes, the one-transaction replace,
// validation errors naming the field, and normalization of nft's listing quirks.
import t from "tap";
import {
  EDGE_TABLE,
  deleteEdgeNft,
  normalizeNft,
  planEdgeNft,
  renderEdgeTable,
} from "../../src/edge/nft-plan.js";
import { isCapsuleError } from "../../src/errors.js";

const BASE = { publicAddress: "203.0.113.10", fabricIface: "capsule0" };

const table = (elements: string) =>
  [
    "table ip capsule_edge {",
    "\tmap tcp_routes {",
    "\t\ttype inet_service : ipv4_addr . inet_service",
    ...(elements ? [`\t\telements = { ${elements} }`] : []),
    "\t}",
    "",
    "\tchain prerouting {",
    "\t\ttype nat hook prerouting priority dstnat; policy accept;",
    "\t\tip daddr 203.0.113.10 dnat ip to tcp dport map @tcp_routes",
    "\t}",
    "",
    "\tchain forward {",
    "\t\ttype filter hook forward priority filter; policy accept;",
    "\t\tct state established,related accept",
    '\t\tiifname != "capsule0" oifname "capsule0" ct status dnat accept',
    '\t\tiifname != "capsule0" iifname != "cw*" oifname "capsule0" drop',
    "\t}",
    "}",
    "",
  ].join("\n");

t.test(
  "routes sorted by public port, DNAT keeps the source, forward only DNATed into the fabric",
  async (t) => {
    const text = renderEdgeTable({
      ...BASE,
      tcp: [
        { publicPort: 5432, upstream: "100.64.2.9:5432" },
        { publicPort: 2222, upstream: "100.64.1.1:22" },
      ],
    });
    t.equal(text, table("2222 : 100.64.1.1 . 22, 5432 : 100.64.2.9 . 5432"));
    t.notMatch(text, /masquerade|snat/, "no source NAT");
  },
);

t.test("no routes: same chains, empty map", async (t) => {
  t.equal(renderEdgeTable({ ...BASE, tcp: [] }), table(""));
});

t.test("planEdgeNft replaces the whole table in one transaction", async (t) => {
  const plan = planEdgeNft({ ...BASE, tcp: [] });
  t.ok(
    plan.startsWith(`table ip ${EDGE_TABLE} {\n}\ndelete table ip ${EDGE_TABLE}\ntable ip ${EDGE_TABLE} {\n`),
  );
  t.equal(plan.split("delete table").length, 2, "one delete");
  t.equal(deleteEdgeNft(), "table ip capsule_edge {\n}\ndelete table ip capsule_edge\n");
});

t.test("deterministic: order of routes does not matter", async (t) => {
  const a = [
    { publicPort: 1, upstream: "100.64.0.1:1" },
    { publicPort: 2, upstream: "100.64.0.2:2" },
  ];
  t.equal(renderEdgeTable({ ...BASE, tcp: a }), renderEdgeTable({ ...BASE, tcp: [...a].reverse() }));
});

t.test("normalizeNft: wrapped and reordered element lists compare equal", async (t) => {
  const ours = renderEdgeTable({
    ...BASE,
    tcp: [
      { publicPort: 2222, upstream: "100.64.1.1:22" },
      { publicPort: 3000, upstream: "100.64.1.2:80" },
    ],
  });
  const listed = ours.replace(
    "elements = { 2222 : 100.64.1.1 . 22, 3000 : 100.64.1.2 . 80 }",
    "elements = { 3000 : 100.64.1.2 . 80,\n\t\t\t     2222 : 100.64.1.1 . 22 }",
  );
  t.not(listed, ours);
  t.equal(normalizeNft(listed), normalizeNft(ours));
  t.not(normalizeNft(ours), normalizeNft(ours.replace("2222", "2223")), "a real change stays a change");
});

t.test("validation names the field", async (t) => {
  const cases: [string, Parameters<typeof renderEdgeTable>[0], string][] = [
    ["public address", { ...BASE, publicAddress: "example.com", tcp: [] }, "publicAddress"],
    ["interface", { ...BASE, fabricIface: "a very long interface", tcp: [] }, "fabricIface"],
    ["port 0", { ...BASE, tcp: [{ publicPort: 0, upstream: "100.64.0.1:1" }] }, "tcp.publicPort"],
    ["port float", { ...BASE, tcp: [{ publicPort: 22.5, upstream: "100.64.0.1:1" }] }, "tcp.publicPort"],
    ["upstream no port", { ...BASE, tcp: [{ publicPort: 22, upstream: "100.64.0.1" }] }, "tcp.upstream"],
    ["upstream port 0", { ...BASE, tcp: [{ publicPort: 22, upstream: "100.64.0.1:0" }] }, "tcp.upstream"],
    [
      "duplicate port",
      {
        ...BASE,
        tcp: [
          { publicPort: 22, upstream: "100.64.0.1:1" },
          { publicPort: 22, upstream: "100.64.0.2:1" },
        ],
      },
      "tcp.publicPort",
    ],
  ];
  for (const [name, o, field] of cases) {
    try {
      renderEdgeTable(o);
      t.fail(`${name}: accepted`);
    } catch (e) {
      t.ok(isCapsuleError(e, "CAPSULE_INVALID_ARGUMENT"), `${name}: invalid argument`);
      t.equal((e as { details?: { field?: string } }).details?.field, field, `${name}: names ${field}`);
    }
  }
});
