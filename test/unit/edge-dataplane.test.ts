// The edge data plane over fakes (runner, spawner, Caddy admin, HAProxy's sockets): start adopts
// or starts both and installs the hand-off; apply validates everything before any effect, then
// changes each component only when it differs (exact nft/haproxy command lines): Caddy's static
// config is loaded once (at start), HTTPS routes go to HAProxy's routes map through the runtime
// API (no reload), only passthrough changes reload HAProxy; a new HTTPS host gets a warm-up TLS
// handshake; a rejected HAProxy config changes nothing; stop leaves everything running;
// status() decides certificate and health states; the status helpers; and FakeEdgeDataPlane.
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { createServer as createTlsServer } from "node:tls";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { pino } from "pino";
import t, { type Test } from "tap";
import { caddyPaths, renderBootstrapConfig } from "../../src/edge/caddy.js";
import {
  ASK_BIND,
  type EdgeDesired,
  HostEdgeDataPlane,
  ROUTER_BIND,
  validateDesired,
} from "../../src/edge/dataplane.js";
import { FakeCaddyAdmin, FakeEdgeDataPlane } from "../../src/edge/fakes.js";
import { haproxyPaths } from "../../src/edge/haproxy.js";
import { planHaproxyConfig, planRoutesMap } from "../../src/edge/haproxy-plan.js";
import { planEdgeNft, renderEdgeTable } from "../../src/edge/nft-plan.js";
import { canonicalJson, planCaddyConfig } from "../../src/edge/plan.js";
import { certStatus, issuerKey, lastCertEvents, passthroughHealth } from "../../src/edge/status.js";
import type { Clock } from "../../src/node/host/clock.js";
import { FakeRunner } from "../../src/node/host/runner.js";
import { FakeSpawner } from "../../src/node/host/spawner.js";
import { selfSigned } from "../helpers/edge-ns.js";

class InstantClock implements Clock {
  t = Date.UTC(2026, 0, 1);
  now() {
    return this.t;
  }
  async sleep(ms: number) {
    this.t += ms;
    await new Promise((r) => setImmediate(r));
  }
}

const DESIRED: EdgeDesired = {
  http: [{ host: "App.example.com", upstream: "100.64.1.1:8080", workload: "app", capsule: "home" }],
  passthrough: [
    { host: "vault.example.com", upstream: "100.64.1.2:8443", workload: "vault", capsule: "home" },
  ],
  tcp: [{ publicPort: 2222, upstream: "100.64.1.3:22", workload: "ssh", capsule: "home" }],
};

/** A fake world: Caddy and HAProxy "start" when spawned; HAProxy's master counts SIGUSR2s. */
function setup(
  t: Test,
  opts: {
    caddyUp?: boolean;
    haproxyUp?: boolean;
    liveNft?: string;
    alive?: number[];
    dir?: string;
    httpsPort?: number;
  } = {},
) {
  const dir = opts.dir ?? mkdtempSync(join(tmpdir(), "capsule-edge-dp-"));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const cp = caddyPaths(dir);
  const hp = haproxyPaths(dir);
  const admin = new FakeCaddyAdmin();
  admin.up = opts.caddyUp ?? false;
  if (admin.up) admin.current = renderBootstrapConfig(cp);
  const mapFile = join(hp.dir, "routes.map");
  /** readMap is what a starting or reloading HAProxy loads: the map file's `key value` lines. */
  const readMap = () =>
    existsSync(mapFile) ? readFileSync(mapFile, "utf8").split("\n").filter(Boolean) : undefined;
  const hap = {
    up: opts.haproxyUp ?? false,
    reloads: 0,
    failNext: false,
    checkFails: "",
    /** map is the live routes map (undefined: HAProxy did not load one). */
    map: (opts.haproxyUp ? readMap() : undefined) as string[] | undefined,
    /** cli are the stats socket commands but `show stat`, in order. */
    cli: [] as string[],
    /** ignoreCommit makes `commit map` answer but change nothing. */
    ignoreCommit: false,
  };
  const versions = new Map<number, string[]>();
  let nextVersion = 1;
  let liveNft = opts.liveNft;
  const spawner = new FakeSpawner();
  const alive = new Set(opts.alive ?? []);
  const isAlive = spawner.isAlive.bind(spawner);
  spawner.isAlive = async (pid) => alive.has(pid) || isAlive(pid);
  const runner = new FakeRunner().on((argv, input) => {
    if (argv[0] === "kill" && (argv[1] === "-TERM" || argv[1] === "-KILL")) {
      spawner.kill(Number(argv[2]));
      alive.delete(Number(argv[2]));
      return { exitCode: 0 };
    }
    if (argv[0] === "cat" && argv[1]?.startsWith("/proc/")) {
      const pid = Number(argv[1].split("/")[2]);
      return {
        stdout: (pid === 1000 || pid === 777
          ? ["caddy", "run", "--config", cp.bootstrap, ""]
          : ["haproxy", "-W", "-S", `${hp.masterSocket},mode,600`, "-f", hp.config, ""]
        ).join("\0"),
      };
    }
    if (argv[0] === "haproxy" && argv[1] === "-c")
      return hap.checkFails ? { exitCode: 1, stderr: hap.checkFails } : { exitCode: 0 };
    if (argv[0] === "kill" && argv[1] === "-USR2") {
      if (hap.failNext) hap.failNext = false;
      else {
        hap.reloads++;
        hap.map = readMap();
      }
      return { exitCode: 0 };
    }
    if (argv.join(" ") === "nft list table ip capsule_edge")
      return liveNft === undefined
        ? { exitCode: 1, stderr: "No such file or directory" }
        : { stdout: liveNft };
    if (argv.join(" ") === "nft -f -" && input)
      liveNft = input.slice(input.indexOf("table ip capsule_edge {\n\t"));
    if (argv.join(" ") === "ip -4 rule show priority 5160") return { stdout: "" };
    return undefined;
  });
  const spawn = spawner.spawnDetached.bind(spawner);
  spawner.spawnDetached = async (argv, o) => {
    const pid = await spawn(argv, o);
    if (argv[0] === "caddy") {
      admin.up = true;
      admin.current = renderBootstrapConfig(cp);
    } else {
      hap.up = true;
      hap.map = readMap();
    }
    return pid;
  };
  const command = async (path: string, cmd: string) => {
    if (!hap.up) throw new Error("connect ENOENT");
    if (path === hp.masterSocket && cmd === "show proc")
      return `#<PID> <type> <reloads>\n1001 master ${hap.reloads} [failed: 0] 0d\n# workers\n${2000 + hap.reloads} worker 0 0d\n`;
    if (path === hp.statsSocket && cmd === "show stat")
      return "# pxname,svname,status\npt_vault.example.com,upstream,UP\n";
    if (path !== hp.statsSocket) return "";
    hap.cli.push(cmd);
    let out = "";
    // The stats socket runs `a; b; c` one after the other (as HAProxy does).
    for (const one of cmd.split("; ")) {
      const w = one.split(" ");
      if (one === `show map ${mapFile}`) {
        if (!hap.map) return "Unknown map identifier. Please use #<id> or <file>.\n";
        out += hap.map.map((l, i) => `0x55d0${i} ${l}\n`).join("");
      } else if (one === `prepare map ${mapFile}`) {
        versions.set(nextVersion, []);
        out += `New version created: ${nextVersion++}\n`;
      } else if (w[0] === "add" && w[1] === "map" && w[3] === mapFile) {
        versions.get(Number(w[2]?.slice(1)))?.push(w.slice(4).join(" "));
      } else if (w[0] === "commit" && w[1] === "map" && w[3] === mapFile) {
        if (!hap.ignoreCommit) hap.map = versions.get(Number(w[2]?.slice(1)));
      } else out += "Unknown command.\n";
    }
    return out;
  };
  const probes: string[] = [];
  const dp = new HostEdgeDataPlane({
    stateDir: dir,
    runner,
    spawner,
    clock: new InstantClock(),
    log: pino({ level: "silent" }),
    publicAddress: "203.0.113.10",
    fabricIface: "capsule0",
    acmeCa: "internal",
    ...(opts.httpsPort ? { httpsPort: opts.httpsPort } : {}),
    timeoutMs: 1_000,
    watchIntervalMs: 60_000,
    caddyAdmin: () => admin,
    haproxyCommand: command,
    tcpProbe: async (ip, port) => {
      probes.push(`${ip}:${port}`);
      return port !== 22;
    },
  });
  t.teardown(() => dp.stop());
  return { dir, cp, hp, admin, hap, runner, spawner, dp, probes, mapFile, nft: () => liveNft };
}

/** CADDY_PLAN is the static Caddy config the data plane loads (defaults: ports 80/443, internal CA). */
const caddyPlan = (dir: string) =>
  planCaddyConfig({
    adminSocket: caddyPaths(dir).adminSocket,
    storageDir: caddyPaths(dir).storage,
    acmeCa: "internal",
    httpPort: 80,
    httpsPort: 443,
    httpsHost: "127.0.44.3",
    logFile: join(caddyPaths(dir).dir, "events.log"),
    router: { proxy: ROUTER_BIND, ask: `http://${ASK_BIND}/ask` },
  });

/** liveMap renders the fake HAProxy's live map as a map file. */
const liveMap = (hap: { map: string[] | undefined }) => (hap.map ?? []).map((l) => `${l}\n`).join("");

const runs = (r: FakeRunner, prefix: string) => r.commands.filter((c) => c.startsWith(prefix));

t.test(
  "start: starts Caddy and HAProxy detached, installs the hand-off, loads Caddy's static plan",
  async (t) => {
    const { dp, spawner, runner, hp, admin, hap, dir, mapFile } = setup(t);
    await dp.start();
    t.same(
      spawner.calls.map((c) => c.argv.slice(0, 2)),
      [
        ["caddy", "run"],
        ["haproxy", "-W"],
      ],
    );
    t.same(spawner.calls[1]?.argv, ["haproxy", "-W", "-S", `${hp.masterSocket},mode,600`, "-f", hp.config]);
    t.same(runs(runner, "ip -4 rule add"), ["ip -4 rule add priority 5160 from 127.0.44.3 lookup 5160"]);
    t.same(runs(runner, "ip -4 route replace"), ["ip -4 route replace local 0.0.0.0/0 dev lo table 5160"]);
    const cfg = readFileSync(hp.config, "utf8");
    t.match(cfg, /default_backend caddy/, "HAProxy starts on an empty config");
    t.match(cfg, /\nfrontend router\n\tmode http\n\tbind 127\.0\.44\.3:8081\n/, "with the router");
    t.match(cfg, /\nfrontend ask\n\tmode http\n\tbind 127\.0\.44\.3:8082\n/, "and the ask frontend");
    t.ok(cfg.includes(`map(${mapFile})`), "reading the routes map");
    t.equal(readFileSync(mapFile, "utf8"), "", "an empty routes map is written before HAProxy starts");
    t.same(hap.map, [], "HAProxy loaded it");
    t.equal(admin.loads.length, 1, "Caddy gets its static config at start, before any route");
    t.equal(canonicalJson(admin.current), canonicalJson(caddyPlan(dir)));
    t.same(dp.counters, { caddyLoads: 1, haproxyReloads: 0, routerCommits: 0, nftApplies: 0 });
    t.same(await dp.pids(), { caddy: 1000, haproxy: 1001 });

    // start again: idempotent, nothing loaded.
    await dp.start();
    t.equal(admin.attempts, 1);
    t.equal(spawner.calls.length, 2);
  },
);

t.test("start adopts running components; Caddy already on the plan is not reloaded", async (t) => {
  const { dp, spawner, hp, dir, admin, mapFile } = setup(t, {
    caddyUp: true,
    haproxyUp: true,
    alive: [777, 1001],
  });
  mkdirSync(hp.dir, { recursive: true });
  mkdirSync(join(dir, "caddy"), { recursive: true });
  writeFileSync(join(dir, "caddy", "caddy.pid"), "777\n");
  writeFileSync(hp.pidFile, "1001\n");
  writeFileSync(mapFile, "a.example.com 100.64.1.1:80\n");
  admin.current = caddyPlan(dir);
  await dp.start();
  t.equal(spawner.calls.length, 0, "nothing spawned");
  t.equal(admin.attempts, 0, "Caddy untouched");
  t.equal(readFileSync(mapFile, "utf8"), "a.example.com 100.64.1.1:80\n", "an existing map file is kept");
  t.same(await dp.pids(), { caddy: 777, haproxy: 1001 });
});

t.test("start: an adopted Caddy back on its bootstrap config gets the plan", async (t) => {
  const { dp, spawner, dir, admin } = setup(t, { caddyUp: true, alive: [777] });
  mkdirSync(join(dir, "caddy"), { recursive: true });
  writeFileSync(join(dir, "caddy", "caddy.pid"), "777\n");
  await dp.start();
  t.same(
    spawner.calls.map((c) => c.argv[0]),
    ["haproxy"],
    "Caddy adopted",
  );
  t.equal(admin.loads.length, 1);
  t.equal(canonicalJson(admin.current), canonicalJson(caddyPlan(dir)));
  t.equal(dp.counters.caddyLoads, 1);
});

t.test("apply: each component once, then nothing on the same state", async (t) => {
  const { dp, runner, admin, hap, hp, nft, dir, mapFile } = setup(t);
  await dp.start();
  const cliBefore = hap.cli.length;
  await dp.apply(DESIRED);
  t.equal(admin.loads.length, 1, "Caddy not loaded again: its config does not depend on the routes");
  const caddy = JSON.stringify(admin.current);
  t.match(caddy, /"listen":\["127\.0\.44\.3:443"\]/, "Caddy behind HAProxy");
  t.match(caddy, /"dial":"127\.0\.44\.3:8081"/, "Caddy proxies to HAProxy's router");
  t.match(caddy, /"on_demand":\{"ask":"http:\/\/127\.0\.44\.3:8082\/ask"\}/, "on-demand TLS asks the router");
  t.notMatch(caddy, /example\.com|100\.64/, "no route in Caddy's config");
  t.equal(readFileSync(mapFile, "utf8"), "app.example.com 100.64.1.1:8080\n", "http hosts in the map file");
  t.equal(readFileSync(mapFile, "utf8"), planRoutesMap(validateDesired(DESIRED, 80, 443).http));
  t.equal(liveMap(hap), "app.example.com 100.64.1.1:8080\n", "and in the live map");
  t.notMatch(liveMap(hap), /vault/, "no passthrough host in the map (no certificate for it)");
  t.same(
    hap.cli.slice(cliBefore).map((c) => c.replace(/@\d+/g, "@V")),
    [
      `show map ${mapFile}`,
      `prepare map ${mapFile}`,
      `add map @V ${mapFile} app.example.com 100.64.1.1:8080; commit map @V ${mapFile}`,
      `show map ${mapFile}`,
    ],
    "map updated through the runtime API in one commit",
  );
  t.equal(hap.reloads, 1, "HAProxy reloaded once (the passthrough host)");
  t.equal(
    readFileSync(hp.config, "utf8"),
    planHaproxyConfig({
      statsSocket: hp.statsSocket,
      publicAddress: "203.0.113.10",
      httpsPort: 443,
      caddy: "127.0.44.3:443",
      passthrough: DESIRED.passthrough,
      router: { bind: ROUTER_BIND, askBind: ASK_BIND, map: mapFile },
    }),
  );
  const nftPlan = planEdgeNft({
    publicAddress: "203.0.113.10",
    fabricIface: "capsule0",
    tcp: DESIRED.tcp,
  });
  t.same(runs(runner, "nft"), ["nft list table ip capsule_edge", "nft --check -f -", "nft -f -"]);
  t.equal(runner.inputs[runner.commands.lastIndexOf("nft -f -")], nftPlan, "one nft -f transaction");
  t.same(
    runs(runner, "haproxy -c"),
    [`haproxy -c -q -f ${hp.next}`],
    "HAProxy config checked before the swap",
  );
  t.same(dp.counters, { caddyLoads: 1, haproxyReloads: 1, routerCommits: 1, nftApplies: 1 });

  const before = runner.commands.length;
  const cli = hap.cli.length;
  await dp.apply(structuredClone(DESIRED));
  t.same(
    dp.counters,
    { caddyLoads: 1, haproxyReloads: 1, routerCommits: 1, nftApplies: 1 },
    "unchanged: no load, commit, reload or nft",
  );
  t.same(
    runner.commands.slice(before).filter((c) => !c.startsWith("cat /proc/")),
    [],
    "and no command but the liveness check",
  );
  t.same(hap.cli.slice(cli), [`show map ${mapFile}`], "the live map only read");
  t.equal(admin.attempts, 1);
  t.equal(
    nft(),
    renderEdgeTable({ publicAddress: "203.0.113.10", fabricIface: "capsule0", tcp: DESIRED.tcp }),
  );

  // Only a TCP route changes: only nft runs.
  await dp.apply({ ...DESIRED, tcp: [] });
  t.same(dp.counters, { caddyLoads: 1, haproxyReloads: 1, routerCommits: 1, nftApplies: 2 });
  t.equal(canonicalJson(admin.current), canonicalJson(caddyPlan(dir)));
});

t.test("http route changes: a map commit only, no HAProxy reload, no Caddy load", async (t) => {
  const { dp, runner, admin, hap, mapFile } = setup(t);
  await dp.start();
  await dp.apply(DESIRED);
  const base = { ...dp.counters };
  const usr2 = () => runs(runner, "kill -USR2").length;
  const checks = () => runs(runner, "haproxy -c").length;
  const [u0, c0] = [usr2(), checks()];
  const cfg = readFileSync(join(dirname(mapFile), "haproxy.cfg"), "utf8");

  const two: EdgeDesired = {
    ...DESIRED,
    http: [
      ...DESIRED.http,
      { host: "B.example.com", upstream: "100.64.1.5:80", workload: "b", capsule: "home" },
    ],
  };
  await dp.apply(two);
  t.same(dp.counters, { ...base, routerCommits: base.routerCommits + 1 }, "added host: routerCommits+1 only");
  const want = "app.example.com 100.64.1.1:8080\nb.example.com 100.64.1.5:80\n";
  t.equal(readFileSync(mapFile, "utf8"), want);
  t.equal(liveMap(hap), want);
  t.equal(readFileSync(join(dirname(mapFile), "haproxy.cfg"), "utf8"), cfg, "haproxy.cfg untouched");

  // Another upstream for a host.
  await dp.apply({ ...two, http: [two.http[0]!, { ...two.http[1]!, upstream: "100.64.1.6:80" }] });
  t.equal(liveMap(hap), "app.example.com 100.64.1.1:8080\nb.example.com 100.64.1.6:80\n");
  t.equal(dp.counters.routerCommits, base.routerCommits + 2);

  // Every http host removed: an empty map, committed.
  await dp.apply({ ...DESIRED, http: [] });
  t.equal(liveMap(hap), "");
  t.same(hap.map, []);
  t.equal(readFileSync(mapFile, "utf8"), "");
  t.same(dp.counters, { ...base, routerCommits: base.routerCommits + 3 });

  t.equal(usr2(), u0, "no reload signal");
  t.equal(checks(), c0, "no haproxy -c");
  t.equal(admin.attempts, 1, "Caddy loaded only at start");
  t.equal(dp.counters.caddyLoads, 1);
  t.equal(dp.counters.haproxyReloads, base.haproxyReloads);
});

t.test("passthrough changes reload HAProxy and leave the map and Caddy alone", async (t) => {
  const { dp, admin, hap } = setup(t);
  await dp.start();
  await dp.apply(DESIRED);
  const base = { ...dp.counters };
  const map = liveMap(hap);
  await dp.apply({
    ...DESIRED,
    passthrough: [...DESIRED.passthrough, { ...DESIRED.passthrough[0]!, host: "git.example.com" }],
  });
  t.same(dp.counters, { ...base, haproxyReloads: base.haproxyReloads + 1 });
  t.equal(liveMap(hap), map);
  t.equal(hap.reloads, 2);
  t.equal(admin.attempts, 1);
});

t.test("a live map that differs from the file (e.g. changed by hand) is committed again", async (t) => {
  const { dp, hap, mapFile } = setup(t);
  await dp.start();
  await dp.apply(DESIRED);
  hap.map = ["evil.example.com 100.64.9.9:80"];
  await dp.apply(DESIRED);
  t.equal(liveMap(hap), readFileSync(mapFile, "utf8"));
  t.equal(liveMap(hap), "app.example.com 100.64.1.1:8080\n");
  t.equal(dp.counters.routerCommits, 2);
  t.equal(dp.counters.haproxyReloads, 1);
});

t.test("a map commit HAProxy does not take fails the apply", async (t) => {
  const { dp, hap } = setup(t);
  await dp.start();
  hap.ignoreCommit = true;
  await t.rejects(dp.apply(DESIRED), {
    code: "CAPSULE_COMMAND_FAILED",
    message: /did not take the new routes/,
  });
  t.same(hap.map, [], "live map unchanged");
  t.equal(dp.counters.routerCommits, 0);
  hap.ignoreCommit = false;
  await dp.apply(DESIRED);
  t.equal(liveMap(hap), "app.example.com 100.64.1.1:8080\n", "the next apply commits");
  t.equal(dp.counters.routerCommits, 1);
});

t.test("new http hosts get a warm-up TLS handshake to Caddy (SNI = host), once", async (t) => {
  const seen: string[] = [];
  const server = createTlsServer({
    SNICallback: (name, cb) => {
      seen.push(name);
      cb(new Error("no certificate in this test"));
    },
  });
  server.on("tlsClientError", () => undefined);
  await new Promise<void>((resolve) => server.listen(18443, "127.0.44.3", resolve));
  t.teardown(() => new Promise<void>((resolve) => server.close(() => resolve())));
  const { dp } = setup(t, { httpsPort: 18443 });
  await dp.start();
  const waitFor = async (n: number) => {
    for (let i = 0; i < 200 && seen.length < n; i++) await new Promise((r) => setTimeout(r, 10));
  };
  await dp.apply(DESIRED);
  await waitFor(1);
  t.same(seen, ["app.example.com"], "the new http host, lowercased; not the passthrough host");
  await dp.apply(DESIRED);
  await dp.apply({
    ...DESIRED,
    http: [
      ...DESIRED.http,
      { host: "new.example.com", upstream: "100.64.1.4:80", workload: "n", capsule: "home" },
    ],
  });
  await waitFor(2);
  await new Promise((r) => setTimeout(r, 100));
  t.same(seen, ["app.example.com", "new.example.com"], "only hosts new to the edge");
});

t.test("a new data plane object on the same state dir adopts and changes nothing", async (t) => {
  const w = setup(t);
  await w.dp.start();
  await w.dp.apply(DESIRED);
  const liveNft = w.nft();
  await w.dp.stop();
  // Same state dir, same running processes, Caddy config and live map; a fresh object and fresh fakes.
  const again = setup(t, { caddyUp: true, haproxyUp: true, liveNft, alive: [1000, 1001], dir: w.dir });
  again.admin.current = w.admin.current;
  again.hap.reloads = w.hap.reloads;
  await again.dp.start();
  await again.dp.apply(DESIRED);
  t.equal(again.spawner.calls.length, 0, "adopted both");
  t.equal(liveMap(again.hap), "app.example.com 100.64.1.1:8080\n");
  t.same(
    again.dp.counters,
    { caddyLoads: 0, haproxyReloads: 0, routerCommits: 0, nftApplies: 0 },
    "live state already matched",
  );
  t.equal(again.admin.attempts, 0);
});

t.test("validation first: a bad state changes nothing and names the field", async (t) => {
  const { dp, runner, admin, hap } = setup(t);
  await dp.start();
  const before = runner.commands.length;
  const attempts = admin.attempts;
  const cli = hap.cli.length;
  const cases: [string, EdgeDesired, string][] = [
    ["host", { ...DESIRED, http: [{ ...DESIRED.http[0]!, host: "nope" }] }, "http.host"],
    [
      "host in both lists",
      { ...DESIRED, passthrough: [{ ...DESIRED.passthrough[0]!, host: "app.EXAMPLE.com" }] },
      "passthrough.host",
    ],
    [
      "upstream off the fabric",
      { ...DESIRED, http: [{ ...DESIRED.http[0]!, upstream: "192.168.1.1:80" }] },
      "http.upstream",
    ],
    [
      "tcp upstream off the fabric",
      { ...DESIRED, tcp: [{ ...DESIRED.tcp[0]!, upstream: "10.0.0.1:22" }] },
      "tcp.upstream",
    ],
    [
      "tcp on the https port",
      { ...DESIRED, tcp: [{ ...DESIRED.tcp[0]!, publicPort: 443 }] },
      "tcp.publicPort",
    ],
    ["tcp on the http port", { ...DESIRED, tcp: [{ ...DESIRED.tcp[0]!, publicPort: 80 }] }, "tcp.publicPort"],
    ["tcp twice", { ...DESIRED, tcp: [DESIRED.tcp[0]!, DESIRED.tcp[0]!] }, "tcp.publicPort"],
    [
      "workload",
      { ...DESIRED, passthrough: [{ ...DESIRED.passthrough[0]!, workload: "" }] },
      "passthrough.workload",
    ],
    ["capsule", { ...DESIRED, tcp: [{ ...DESIRED.tcp[0]!, capsule: "a b" }] }, "tcp.capsule"],
    ["missing list", { http: [], passthrough: [] } as unknown as EdgeDesired, "tcp"],
  ];
  for (const [name, d, field] of cases) {
    await t.rejects(dp.apply(d), { code: "CAPSULE_INVALID_ARGUMENT", details: { field } }, name);
  }
  t.equal(runner.commands.length, before, "no command ran");
  t.equal(admin.attempts, attempts, "Caddy untouched");
  t.equal(hap.cli.length, cli, "HAProxy's map untouched");
});

t.test("apply before start is refused", async (t) => {
  const { dp } = setup(t);
  await t.rejects(dp.apply(DESIRED), { code: "CAPSULE_FAILED_PRECONDITION" });
});

t.test("a config HAProxy rejects leaves the running one", async (t) => {
  const { dp, hap, hp } = setup(t);
  await dp.start();
  await dp.apply(DESIRED);
  const running = readFileSync(hp.config, "utf8");
  hap.checkFails = "[ALERT] parsing [haproxy.cfg.new:3]: unknown keyword";
  await t.rejects(dp.apply({ ...DESIRED, passthrough: [] }), {
    code: "CAPSULE_INVALID_CONFIG",
    message: /haproxy rejected the config: .*unknown keyword/,
  });
  t.equal(readFileSync(hp.config, "utf8"), running, "haproxy.cfg unchanged");
  t.equal(hap.reloads, 1, "no reload");
});

t.test("a reload the master does not confirm times out and restores the file", async (t) => {
  const { dp, hap, hp } = setup(t);
  await dp.start();
  const running = readFileSync(hp.config, "utf8");
  hap.failNext = true;
  await t.rejects(dp.apply(DESIRED), { code: "CAPSULE_TIMEOUT" });
  t.equal(readFileSync(hp.config, "utf8"), running, "file says what HAProxy runs");
});

t.test("stop leaves Caddy, HAProxy and the rules alone; shutdown removes them", async (t) => {
  const { dp, runner } = setup(t);
  await dp.start();
  await dp.apply(DESIRED);
  const before = runner.commands.length;
  await dp.stop();
  t.same(runner.commands.slice(before), [], "stop ran nothing");
  await dp.shutdown();
  const after = runner.commands.slice(before);
  t.ok(after.includes("kill -TERM 1000") && after.includes("kill -TERM 1001"), "shutdown stops both");
  t.ok(after.includes("nft -f -"), "deletes the table");
  t.ok(after.includes("ip -4 rule del priority 5160"), "removes the hand-off rule");
});

t.test("status: certificates, health of each kind", async (t) => {
  const { dp, admin, cp, probes } = setup(t);
  t.same(await dp.status(), [], "nothing applied yet");
  await dp.start();
  await dp.apply({
    ...DESIRED,
    http: [
      ...DESIRED.http,
      { host: "new.example.com", upstream: "100.64.1.4:22", workload: "n", capsule: "home" },
    ],
  });
  const crtDir = join(cp.storage, "certificates", "local", "app.example.com");
  mkdirSync(crtDir, { recursive: true });
  selfSigned(crtDir, "app.example.com", "DNS:app.example.com", "/CN=Test Issuer");
  writeFileSync(
    join(cp.dir, "events.log"),
    `${JSON.stringify({ level: "error", ts: 1, logger: "tls.obtain", msg: "could not get certificate from issuer", identifier: "new.example.com", error: "HTTP 400 urn:ietf:params:acme:error:connection" })}\n`,
  );
  const s = await dp.status();
  t.same(
    s.map((x) => [x.kind, x.key, x.cert, x.health]),
    [
      ["http", "app.example.com", "valid", "healthy"],
      ["http", "new.example.com", "failed", "unhealthy"],
      ["passthrough", "vault.example.com", "none", "healthy"],
      ["tcp", "2222", "none", "unhealthy"],
    ],
  );
  t.match(s[0]?.certDetail, /^expires 20\d\d-\d\d-\d\dT.*Z \(issuer Test Issuer\)$/);
  t.equal(
    s[1]?.certDetail,
    "could not get certificate from issuer: HTTP 400 urn:ietf:params:acme:error:connection",
  );
  t.ok(probes.includes("100.64.1.3:22"), "tcp route probed");
  t.ok(probes.includes("100.64.1.1:8080") && probes.includes("100.64.1.4:22"), "http upstreams probed");
  // http health is the TCP probe of the upstream only: Caddy's admin API is not asked.
  admin.up = false;
  t.same(
    (await dp.status()).filter((x) => x.kind === "http").map((x) => x.health),
    ["healthy", "unhealthy"],
    "Caddy's admin not answering changes nothing",
  );
});

t.test("status helpers", async (t) => {
  t.equal(issuerKey("internal"), "local");
  t.equal(
    issuerKey("https://acme-v02.api.letsencrypt.org/directory"),
    "acme-v02.api.letsencrypt.org-directory",
  );
  t.equal(issuerKey("https://198.51.100.2:14000/dir"), "198.51.100.2-14000-dir");

  const log = [
    "not json",
    JSON.stringify({ level: "info", ts: 1, msg: "obtaining certificate", identifier: "a.example.com" }),
    JSON.stringify({
      level: "error",
      ts: 2,
      msg: "challenge failed",
      identifier: "a.example.com",
      error: "x",
    }),
    JSON.stringify({ level: "error", ts: 3, msg: "will retry", error: "[b.example.com] Obtain: boom" }),
    JSON.stringify({
      level: "info",
      ts: 4,
      msg: "certificate obtained successfully",
      identifier: "a.example.com",
    }),
    JSON.stringify({
      level: "warn",
      ts: 5,
      msg: "stapling OCSP",
      error: "no OCSP",
      identifiers: ["a.example.com"],
    }),
    '{"level":"error","ts":6,"msg":"trunc',
  ].join("\n");
  const ev = lastCertEvents(log);
  t.same(ev.get("a.example.com"), { ok: true, error: "", ts: 4 });
  t.same(ev.get("b.example.com"), { ok: false, error: "will retry: [b.example.com] Obtain: boom", ts: 3 });

  t.same(certStatus(undefined, undefined, 0), { cert: "pending", certDetail: "" });
  t.same(certStatus(undefined, { ok: false, error: "boom", ts: 1 }, 0), {
    cert: "failed",
    certDetail: "boom",
  });
  t.same(certStatus("garbage", { ok: true, error: "", ts: 1 }, 0), { cert: "pending", certDetail: "" });

  const rows = [
    { proxy: "pt_a.example.com", server: "upstream", status: "UP 1/3" },
    { proxy: "pt_b.example.com", server: "upstream", status: "DOWN" },
    { proxy: "pt_c.example.com", server: "upstream", status: "no check" },
  ];
  t.equal(passthroughHealth("a.example.com", rows), "healthy");
  t.equal(passthroughHealth("b.example.com", rows), "unhealthy");
  t.equal(passthroughHealth("c.example.com", rows), "unknown");
  t.equal(passthroughHealth("d.example.com", rows), "unknown");
});

t.test("validateDesired lowercases hosts and copies", async (t) => {
  const v = validateDesired(DESIRED, 80, 443);
  t.equal(v.http[0]?.host, "app.example.com");
  t.not(v.http, DESIRED.http);
});

t.test("FakeEdgeDataPlane records states and fails on demand", async (t) => {
  const f = new FakeEdgeDataPlane();
  await f.start();
  await f.apply(DESIRED);
  t.same(f.current, DESIRED);
  f.failNext("boom");
  await t.rejects(f.apply({ http: [], passthrough: [], tcp: [] }), {
    code: "CAPSULE_COMMAND_FAILED",
    message: "boom",
  });
  t.equal(f.applied.length, 1, "the failed apply was not recorded");
  await f.apply({ http: [], passthrough: [], tcp: [] });
  t.equal(f.applied.length, 2);
  f.statuses = [{ kind: "tcp", key: "22", cert: "none", certDetail: "", health: "healthy" }];
  t.same(await f.status(), f.statuses);
  await f.stop();
  t.ok(f.stopped);
});

t.test(
  "certificate status: obtaining steps show as pending with what Caddy is doing; failed stays failed",
  async (t) => {
    const line = (o: object) => JSON.stringify(o);
    const log = [
      line({
        level: "info",
        ts: 100,
        logger: "tls.obtain",
        msg: "obtaining certificate",
        identifier: "a.example.com",
      }),
      line({
        level: "info",
        ts: 101,
        msg: "trying to solve challenge",
        identifier: "a.example.com",
        challenge_type: "http-01",
      }),
      line({
        level: "error",
        ts: 102,
        msg: "could not get certificate from issuer",
        identifier: "b.example.com",
        error: "boom",
      }),
      line({
        level: "info",
        ts: 103,
        msg: "trying to solve challenge",
        identifier: "b.example.com",
        challenge_type: "tls-alpn-01",
      }),
    ].join("\n");
    const ev = lastCertEvents(log);
    const a = certStatus(undefined, ev.get("a.example.com"), 0);
    t.same(a, {
      cert: "pending",
      certDetail: "trying to solve challenge (http-01) since 1970-01-01T00:01:40.000Z",
    });
    t.same(certStatus(undefined, ev.get("b.example.com"), 0), {
      cert: "failed",
      certDetail: "could not get certificate from issuer: boom",
    });
  },
);
