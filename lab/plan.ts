/**
 * The lab planner: a pure function from {@link LabOptions} to a {@link LabPlan} that names every
 * namespace, veth, bridge, address, route, sysctl and nftables ruleset of a multi-capsule network
 * on one machine, plus each capsule's directories and daemon argv. It never imports the runner;
 * `apply.ts` turns a plan into commands.
 *
 * Addressing (documentation ranges only, and only inside namespaces the lab creates):
 * - "internet" 192.0.2.0/24: a bridge in `<p>-inet`; edge 192.0.2.10, home router i WAN
 *   192.0.2.(101+i), internet client 192.0.2.200, the lab CA and DNS (`<p>-ca`) 192.0.2.53;
 *   192.0.2.11 is left free for tests (names under acme-test.capsule.test point there).
 * - home i LAN 198.51.100.(32i)/27: router .32i+1, capsule j .32i+10+j (up to 8 homes).
 * - operator links 203.0.113.(4k)/30, one per capsule in slot k (see {@link mgmtSlot}): operator
 *   side .4k+1, capsule side .4k+2.
 */
import { DAEMON_NODE_FLAGS } from "../src/node/node-flags.js";
import { createHash } from "node:crypto";
import { join } from "node:path";
import { invalidArgument } from "../src/errors.js";
import { CA_ADDRESS, type CaPlan, DNS_ADDRESS, planCa, resolvConf } from "./ca.js";
import { resolvFilePath } from "./resolvers.js";

/** LabDaemon picks the process each capsule runs: the real `capsuled`, or a TCP stand-in that only listens. */
export type LabDaemon = "capsuled" | "stand-in";

/** PortForward is a DNAT rule on a home router: WAN `proto/port` to a capsule on that home's LAN. */
export interface PortForward {
  /** home is the home network's name, e.g. "homeA" (required). */
  home: string;
  /** proto is "tcp" or "udp" (required). */
  proto: "tcp" | "udp";
  /** port is the port on the router's WAN address (required). */
  port: number;
  /** to is the capsule that receives the traffic (optional; default the home's first capsule). */
  to?: string;
  /** toPort is the port on the capsule (optional; default `port`). */
  toPort?: number;
}

/** LabOptions configures a lab. Every field is optional; unset fields take the documented default. */
export interface LabOptions {
  /** prefix of every namespace name, lowercase letters and digits, 1-8 chars, starting with a letter (default "cl"). */
  prefix?: string;
  /** homes is the number of home networks behind NAT, 0-8 (default 2). */
  homes?: number;
  /** capsulesPerHome is the number of capsules on each home LAN, 1-7 (default 1). */
  capsulesPerHome?: number;
  /** edge adds the internet-facing edge capsule (default true). */
  edge?: boolean;
  /**
   * ca adds `<p>-ca`: the lab DNS (dnsmasq, zone capsule.test) and an ACME CA (Caddy
   * `acme_server`) the edge gets its certificates from; every namespace with an internet route
   * resolves through it (default: the same as `edge`).
   */
  ca?: boolean;
  /** portForwards adds DNAT rules to home routers (default none: inbound is blocked). */
  portForwards?: PortForward[];
  /** labDir holds state, logs, run dirs and the operator config (default `/tmp/capsule-lab-<prefix>`). */
  labDir?: string;
  /** repoDir is the checkout whose `dist/` holds capsuled and capsulectl (default: this file's checkout). */
  repoDir?: string;
  /** nodeBin is the node executable used for capsuled and capsulectl (default: the running node). */
  nodeBin?: string;
  /** daemon picks what each capsule runs (default "capsuled"). */
  daemon?: LabDaemon;
  /** apiPort is capsuled's API port on its management address (default 50000). */
  apiPort?: number;
  /** fabricPort is capsuled's WireGuard port (default 51820). */
  fabricPort?: number;
}

/** NodeRole says what a lab namespace plays. */
export type NodeRole = "inet" | "edge" | "home" | "router" | "client" | "op" | "ca";

/** NetNode is one network namespace and everything the lab owns inside it. */
export interface NetNode {
  /** short is the name without prefix ("homeA-rtr"); `lab exec` accepts it. */
  short: string;
  /** ns is the namespace name (`<prefix>-<short>`). */
  ns: string;
  role: NodeRole;
  /** bridges created in this namespace. */
  bridges: string[];
  /** addresses: interface and CIDR, e.g. { ifname: "lan0", cidr: "198.51.100.1/27" }. */
  addresses: { ifname: string; cidr: string }[];
  /** routes the lab owns here (only `default via` routes are needed). */
  routes: { dst: string; via: string }[];
  /** sysctls the lab owns here; keys the lab does not list are left to whoever runs inside. */
  sysctls: Record<string, string>;
  /** ruleset is this namespace's nftables table (whole-table replace), or undefined for none. */
  ruleset: NftRuleset | undefined;
  /** resolvConf is the content of `/etc/netns/<ns>/resolv.conf` (the lab DNS), or undefined for none. */
  resolvConf: string | undefined;
}

/** NftRuleset is one nftables table applied whole with `nft -f`; `hash` is kept as the table comment. */
export interface NftRuleset {
  family: "ip" | "inet";
  table: string;
  /** hash is a short digest of the body; a table whose comment carries it is already current. */
  hash: string;
  /** text is the full `table ... { ... }` definition, comment included. */
  text: string;
}

/** VethEnd is one side of a veth pair. */
export interface VethEnd {
  ns: string;
  ifname: string;
}

/** Veth is a veth pair created directly between two lab namespaces (never in the root namespace). */
export interface Veth {
  a: VethEnd;
  b: VethEnd;
  /** master, when set, is the bridge in `a.ns` that side a joins. */
  master?: string;
}

/** CapsulePlan is one capsule: its namespace, addresses, directories and daemon argv. */
export interface CapsulePlan {
  name: string;
  role: "edge" | "home";
  /** home is the home network's name (home capsules only). */
  home: string | undefined;
  ns: string;
  /** mgmtAddress is where capsuled listens (capsule side of the operator /30). */
  mgmtAddress: string;
  /** opAddress is the operator side of that /30. */
  opAddress: string;
  /** api is `mgmtAddress:apiPort`, the address the operator adopts. */
  api: string;
  /** lanAddress is the home LAN address (home capsules). */
  lanAddress: string | undefined;
  /** wanAddress is the internet address (the edge). */
  wanAddress: string | undefined;
  /** dir is `<labDir>/<name>`; run, state, log, pid file live below it. */
  dir: string;
  runDir: string;
  stateDir: string;
  logFile: string;
  pidFile: string;
  /** mntns is the file the capsule's persistent mount namespace is bound to. */
  mntns: string;
  /** resolvFile is bound over /etc/resolv.conf in the capsule's mount namespace (undefined: the host's). */
  resolvFile: string | undefined;
  /** argv starts the capsule's process inside its namespaces. */
  argv: string[];
}

/** HomePlan is one home network: its router and LAN. */
export interface HomePlan {
  name: string;
  routerNs: string;
  lanCidr: string;
  routerLan: string;
  routerWan: string;
  capsules: string[];
  portForwards: PortForward[];
}

/** LabPlan is the complete desired state of a lab. Pure data; two equal options give equal plans. */
export interface LabPlan {
  prefix: string;
  labDir: string;
  repoDir: string;
  nodeBin: string;
  daemon: LabDaemon;
  apiPort: number;
  fabricPort: number;
  /** mntDir is the private bind mount that holds the capsules' mount namespace files. */
  mntDir: string;
  /** stateFile is the JSON record `down` reads. */
  stateFile: string;
  /** operatorDir is the operator's capsulectl config dir. */
  operatorDir: string;
  /** nodes in creation order. */
  nodes: NetNode[];
  veths: Veth[];
  capsules: CapsulePlan[];
  homes: HomePlan[];
  /** ca is the lab CA and DNS namespace, undefined when the lab has none. */
  ca: CaPlan | undefined;
  /** options as given, kept so `status` and `down` can re-plan from the state file. */
  options: LabOptions;
}

/** DEFAULT_PREFIX is the lab prefix when none is given. */
export const DEFAULT_PREFIX = "cl";
/** INET_PREFIX is the lab's "internet". */
export const INET_PREFIX = "192.0.2";
/** LAN_PREFIX is carved into /27 home LANs. */
export const LAN_PREFIX = "198.51.100";
/** MGMT_PREFIX is carved into operator /30 links. */
export const MGMT_PREFIX = "203.0.113";
/** EDGE_ADDRESS is the edge capsule's internet address. */
export const EDGE_ADDRESS = `${INET_PREFIX}.10`;
/** CLIENT_ADDRESS is the internet client's address. */
export const CLIENT_ADDRESS = `${INET_PREFIX}.200`;
/** NFT_TABLE is the one table the lab owns in each namespace that has rules. */
export const NFT_TABLE = "capsule_lab";

const MAX_HOMES = 8;
// 1 edge + 8 homes x 7 capsules = 57 stable /30 slots in 203.0.113.0/24 (see mgmtSlot).
const MAX_PER_HOME = 7;
const PREFIX_RE = /^[a-z][a-z0-9]{0,7}$/;

/**
 * mgmtSlot is the operator /30 a capsule gets: 0 for the edge, 1 + 7*home + index for home
 * capsules. A fixed slot per capsule name keeps every management address (and so every operator
 * context) stable when a lab is re-planned with more or fewer homes or capsules.
 */
export function mgmtSlot(home: { home: number; index: number } | undefined): number {
  return home === undefined ? 0 : 1 + MAX_PER_HOME * home.home + home.index;
}

/** homeName returns the name of home i (0-based): "homeA", "homeB", ... */
export function homeName(i: number): string {
  return `home${String.fromCharCode(65 + i)}`;
}

/** defaultLabDir is `/tmp/capsule-lab-<prefix>`. */
export function defaultLabDir(prefix: string): string {
  return `/tmp/capsule-lab-${prefix}`;
}

/** validatePrefix throws an InvalidArgument error unless `prefix` is a valid lab prefix. */
export function validatePrefix(prefix: string): void {
  if (!PREFIX_RE.test(prefix)) {
    throw invalidArgument(
      "prefix",
      `"${prefix}" is not a valid lab prefix`,
      "use 1-8 lowercase letters and digits, starting with a letter (no dashes: they separate the prefix)",
    );
  }
}

function checkInt(field: string, v: number, min: number, max: number): void {
  if (!Number.isInteger(v) || v < min || v > max)
    throw invalidArgument(field, `${v} is out of range`, `use ${min}-${max}`);
}

function hash(text: string): string {
  return createHash("sha256").update(text).digest("hex").slice(0, 16);
}

function ruleset(family: "ip" | "inet", chains: string[]): NftRuleset {
  // Chains separated by a blank line, as `nft list table` prints them.
  const body = chains.join("\n");
  const h = hash(body);
  const text = `table ${family} ${NFT_TABLE} {\n\tcomment "lab:${h}"\n${body}}\n`;
  return { family, table: NFT_TABLE, hash: h, text };
}

/** chain renders one nftables chain in `nft list` layout (tab indents), so listings diff cleanly. */
function chain(name: string, hook: string, rules: string[]): string {
  return `\tchain ${name} {\n\t\t${hook}\n${rules.map((r) => `\t\t${r}\n`).join("")}\t}\n`;
}

/** routerRuleset renders a home router's NAT: masquerade out of wan0, drop unsolicited inbound, optional DNAT. Pure. */
export function routerRuleset(
  lanCidr: string,
  forwards: { proto: string; port: number; to: string }[],
): NftRuleset {
  return ruleset("ip", [
    chain(
      "prerouting",
      "type nat hook prerouting priority dstnat; policy accept;",
      forwards.map((f) => `iifname "wan0" ${f.proto} dport ${f.port} dnat to ${f.to}`),
    ),
    chain("postrouting", "type nat hook postrouting priority srcnat; policy accept;", [
      `oifname "wan0" ip saddr ${lanCidr} masquerade`,
    ]),
    chain("forward", "type filter hook forward priority filter; policy drop;", [
      "ct state established,related accept",
      "ct state invalid drop",
      'iifname "lan0" oifname "wan0" accept',
      // Only what a port forward let in; everything else from the internet stops here.
      'iifname "wan0" oifname "lan0" ct status dnat accept',
    ]),
    chain("input", "type filter hook input priority filter; policy accept;", [
      'iifname "wan0" ct state established,related accept',
      'iifname "wan0" icmp type echo-request accept',
      'iifname "wan0" drop',
    ]),
  ]);
}

/** opRuleset renders the operator namespace's table: it never forwards, so capsules cannot meet through it. Pure. */
export function opRuleset(): NftRuleset {
  return ruleset("ip", [chain("forward", "type filter hook forward priority filter; policy drop;", [])]);
}

const NO_IPV6 = { "net.ipv6.conf.all.disable_ipv6": "1", "net.ipv6.conf.default.disable_ipv6": "1" };

function node(
  prefix: string,
  short: string,
  role: NodeRole,
  sysctls: Record<string, string> = NO_IPV6,
): NetNode {
  return {
    short,
    ns: `${prefix}-${short}`,
    role,
    bridges: [],
    addresses: [],
    routes: [],
    sysctls: { ...sysctls },
    ruleset: undefined,
    resolvConf: undefined,
  };
}

/**
 * planLab computes the lab's complete desired state. Pure: no I/O, no clock. Throws an
 * InvalidArgument error (naming the field) for any option out of range; nothing has happened yet then.
 * Unset options take the defaults documented on {@link LabOptions}, except `repoDir` and
 * `nodeBin`, which the caller resolves (see `resolveLabOptions` in lab.ts) so the plan stays pure.
 */
export function planLab(options: LabOptions & { repoDir: string; nodeBin: string }): LabPlan {
  const prefix = options.prefix ?? DEFAULT_PREFIX;
  validatePrefix(prefix);
  const homes = options.homes ?? 2;
  checkInt("homes", homes, 0, MAX_HOMES);
  const perHome = options.capsulesPerHome ?? 1;
  checkInt("capsulesPerHome", perHome, 1, MAX_PER_HOME);
  const withEdge = options.edge ?? true;
  const withCa = options.ca ?? withEdge;
  const apiPort = options.apiPort ?? 50000;
  checkInt("apiPort", apiPort, 1, 65535);
  const fabricPort = options.fabricPort ?? 51820;
  checkInt("fabricPort", fabricPort, 1, 65535);
  const daemon = options.daemon ?? "capsuled";
  if (daemon !== "capsuled" && daemon !== "stand-in")
    throw invalidArgument("daemon", `"${daemon}"`, "use capsuled or stand-in");
  const total = (withEdge ? 1 : 0) + homes * perHome;
  if (total === 0) throw invalidArgument("homes", "a lab needs at least one capsule", "set edge or homes");
  const labDir = options.labDir ?? defaultLabDir(prefix);
  if (!labDir.startsWith("/") || labDir === "/" || labDir.includes("\n")) {
    throw invalidArgument("labDir", `"${labDir}" must be an absolute path below /`);
  }
  const { repoDir, nodeBin } = options;
  const mntDir = join(labDir, "mnt");

  const inet = node(prefix, "inet", "inet", { ...NO_IPV6, "net.ipv4.ip_forward": "0" });
  inet.bridges.push("br0");
  const op = node(prefix, "op", "op", { ...NO_IPV6, "net.ipv4.ip_forward": "0" });
  op.ruleset = opRuleset();
  const client = node(prefix, "client", "client");
  const nodes: NetNode[] = [inet, op, client];
  const ca = withCa ? planCa(prefix, labDir, withEdge ? EDGE_ADDRESS : undefined) : undefined;
  const veths: Veth[] = [];
  const capsules: CapsulePlan[] = [];
  const homePlans: HomePlan[] = [];

  const attachInet = (n: NetNode, address: string) => {
    veths.push({ a: { ns: inet.ns, ifname: n.short }, b: { ns: n.ns, ifname: "wan0" }, master: "br0" });
    n.addresses.push({ ifname: "wan0", cidr: `${address}/24` });
  };

  const addCapsule = (
    n: NetNode,
    k: number,
    c: Omit<
      CapsulePlan,
      | "mgmtAddress"
      | "opAddress"
      | "api"
      | "dir"
      | "runDir"
      | "stateDir"
      | "logFile"
      | "pidFile"
      | "mntns"
      | "resolvFile"
      | "argv"
      | "ns"
    >,
  ) => {
    const opAddress = `${MGMT_PREFIX}.${4 * k + 1}`;
    const mgmtAddress = `${MGMT_PREFIX}.${4 * k + 2}`;
    veths.push({ a: { ns: op.ns, ifname: c.name }, b: { ns: n.ns, ifname: "mgmt0" } });
    op.addresses.push({ ifname: c.name, cidr: `${opAddress}/30` });
    n.addresses.push({ ifname: "mgmt0", cidr: `${mgmtAddress}/30` });
    const dir = join(labDir, c.name);
    const stateDir = join(dir, "state");
    const api = `${mgmtAddress}:${apiPort}`;
    const argv =
      daemon === "capsuled"
        ? [
            nodeBin,
            ...DAEMON_NODE_FLAGS,
            join(repoDir, "dist/src/node/main.js"),
            "--name",
            c.name,
            "--state-dir",
            stateDir,
            "--listen",
            api,
            "--fabric-iface",
            "capsule0",
            "--fabric-port",
            String(fabricPort),
            ...(c.role === "edge"
              ? ["--endpoint", `${c.wanAddress}:${fabricPort}`, ...edgeFlags(c.wanAddress)]
              : []),
          ]
        : [
            nodeBin,
            "-e",
            // A stand-in that only accepts TCP: enough to build and test the topology without capsuled.
            'const [h,p]=process.argv[1].split(":");require("node:net").createServer((s)=>s.end()).listen(+p,h)',
            api,
            "--state-dir",
            stateDir,
          ];
    capsules.push({
      ...c,
      ns: n.ns,
      mgmtAddress,
      opAddress,
      api,
      dir,
      runDir: join(dir, "run"),
      stateDir,
      logFile: join(dir, "capsuled.log"),
      pidFile: join(dir, "capsuled.pid"),
      mntns: join(mntDir, `${c.name}.mnt`),
      resolvFile: ca ? resolvFilePath(n.ns) : undefined,
      argv,
    });
  };

  // The edge's ACME settings: the lab CA when there is one, else Caddy's internal issuer.
  const edgeFlags = (publicAddress: string | undefined): string[] =>
    ca
      ? [
          "--edge",
          "--acme-ca",
          ca.directory,
          "--acme-ca-root",
          ca.rootFile,
          ...(publicAddress ? ["--public-address", publicAddress] : []),
        ]
      : ["--edge", "--acme-ca", "internal"];

  if (ca) {
    const n = node(prefix, "ca", "ca");
    nodes.push(n);
    attachInet(n, CA_ADDRESS);
  }

  if (withEdge) {
    const edge = node(prefix, "edge", "edge");
    nodes.push(edge);
    attachInet(edge, EDGE_ADDRESS);
    addCapsule(edge, mgmtSlot(undefined), {
      name: "edge",
      role: "edge",
      home: undefined,
      lanAddress: undefined,
      wanAddress: EDGE_ADDRESS,
    });
  }

  const forwards = options.portForwards ?? [];
  for (const f of forwards) {
    if (!/^home[A-H]$/.test(f.home) || f.home.charCodeAt(4) - 65 >= homes) {
      throw invalidArgument("portForwards.home", `"${f.home}" is not a home of this lab`);
    }
    if (f.proto !== "tcp" && f.proto !== "udp")
      throw invalidArgument("portForwards.proto", `"${f.proto}"`, "use tcp or udp");
    checkInt("portForwards.port", f.port, 1, 65535);
    if (f.toPort !== undefined) checkInt("portForwards.toPort", f.toPort, 1, 65535);
  }

  for (let i = 0; i < homes; i++) {
    const name = homeName(i);
    const base = 32 * i;
    const lanCidr = `${LAN_PREFIX}.${base}/27`;
    const routerLan = `${LAN_PREFIX}.${base + 1}`;
    const routerWan = `${INET_PREFIX}.${101 + i}`;
    const rtr = node(prefix, `${name}-rtr`, "router", { ...NO_IPV6, "net.ipv4.ip_forward": "1" });
    rtr.bridges.push("lan0");
    rtr.addresses.push({ ifname: "lan0", cidr: `${routerLan}/27` });
    nodes.push(rtr);
    attachInet(rtr, routerWan);
    const names: string[] = [];
    for (let j = 0; j < perHome; j++) {
      const cname = j === 0 ? name : `${name}${j + 1}`;
      const lan = `${LAN_PREFIX}.${base + 10 + j}`;
      const n = node(prefix, cname, "home");
      n.addresses.push({ ifname: "lan0", cidr: `${lan}/27` });
      n.routes.push({ dst: "default", via: routerLan });
      nodes.push(n);
      veths.push({ a: { ns: rtr.ns, ifname: cname }, b: { ns: n.ns, ifname: "lan0" }, master: "lan0" });
      addCapsule(n, mgmtSlot({ home: i, index: j }), {
        name: cname,
        role: "home",
        home: name,
        lanAddress: lan,
        wanAddress: undefined,
      });
      names.push(cname);
    }
    const mine = forwards.filter((f) => f.home === name);
    const dnat = mine.map((f) => {
      const target = capsules.find((c) => c.name === (f.to ?? name));
      if (!target || target.home !== name) {
        throw invalidArgument(
          "portForwards.to",
          `"${f.to}" is not a capsule in ${name}`,
          `use one of ${names.join(", ")}`,
        );
      }
      return { proto: f.proto, port: f.port, to: `${target.lanAddress}:${f.toPort ?? f.port}` };
    });
    rtr.ruleset = routerRuleset(lanCidr, dnat);
    homePlans.push({
      name,
      routerNs: rtr.ns,
      lanCidr,
      routerLan,
      routerWan,
      capsules: names,
      portForwards: mine,
    });
  }

  client.addresses.push({ ifname: "wan0", cidr: `${CLIENT_ADDRESS}/24` });
  veths.push({ a: { ns: inet.ns, ifname: "client" }, b: { ns: client.ns, ifname: "wan0" }, master: "br0" });

  // Every namespace with a way to the internet resolves through the lab DNS; inet (no address)
  // and op (no route out) keep the host's file, which they cannot use anyway.
  if (ca) {
    for (const n of nodes)
      if (n.role !== "inet" && n.role !== "op") n.resolvConf = resolvConf(prefix, DNS_ADDRESS);
  }

  for (const n of nodes) {
    if (n.ns.length > 64) throw invalidArgument("prefix", `namespace name ${n.ns} is too long`);
  }
  for (const v of veths) {
    for (const end of [v.a, v.b]) {
      if (end.ifname.length > 15)
        throw invalidArgument("interface", `${end.ifname} in ${end.ns} exceeds 15 characters`);
    }
  }

  return {
    prefix,
    labDir,
    repoDir,
    nodeBin,
    daemon,
    apiPort,
    fabricPort,
    mntDir,
    stateFile: join(labDir, "lab.json"),
    operatorDir: join(labDir, "operator"),
    nodes,
    veths,
    capsules,
    homes: homePlans,
    ca,
    options: { ...options },
  };
}

/** findNode resolves a lab node by short name ("homeA-rtr"), capsule name or full namespace name. */
export function findNode(plan: LabPlan, name: string): NetNode | undefined {
  return plan.nodes.find((n) => n.short === name || n.ns === name);
}

/** parsePortForward reads HOME:PROTO:PORT[:CAPSULE[:TOPORT]] (e.g. homeA:tcp:8080:homeA:80) and appends it to `acc`. Pure. */
export function parsePortForward(spec: string, acc: PortForward[] = []): PortForward[] {
  const [home, proto, port, to, toPort] = spec.split(":");
  if (!home || (proto !== "tcp" && proto !== "udp") || !port) {
    throw invalidArgument("--port-forward", `"${spec}"`, "use HOME:tcp|udp:PORT[:CAPSULE[:TOPORT]]");
  }
  const pf: PortForward = { home, proto, port: Number(port) };
  if (to) pf.to = to;
  if (toPort) pf.toPort = Number(toPort);
  return [...acc, pf];
}
