import { mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import t, { type Test } from "tap";
import { generateWgKey, wgPublicKey } from "../../src/fabric/keys.js";
import type { WgPeer } from "../../src/fabric/peers.js";
import { diffConfig, WgClient, type WgClientOptions } from "../../src/fabric/wg.js";
import { renderWgConfig, type WgInterfaceConfig } from "../../src/fabric/wgconf.js";
import type { Clock } from "../../src/node/host/clock.js";
import { NsRunner, NsSpawner, nsenterArgv } from "../../src/node/host/ns-runner.js";
import { FakeRunner, type RunResult } from "../../src/node/host/runner.js";
import { DetachedSpawner, FakeSpawner } from "../../src/node/host/spawner.js";

const KEY = generateWgKey();
const B = generateWgKey().publicKey;
const C = generateWgKey().publicKey;
const IFACE = "capsule0";

/** InstantClock: every sleep returns at once and moves time forward, so bounded waits run out quickly. */
class InstantClock implements Clock {
  t = 0;
  now() {
    return this.t;
  }
  async sleep(ms: number) {
    this.t += ms;
  }
}

const NO_DEVICE = { exitCode: 1, stderr: 'Device "capsule0" does not exist.\n' };
const NO_WG = { exitCode: 1, stderr: "Unable to access interface: Protocol not supported\n" };
const linkJson = (kind: string, up: boolean) =>
  JSON.stringify([
    {
      ifindex: 2,
      ifname: IFACE,
      flags: ["POINTOPOINT", "MULTICAST", "NOARP", ...(up ? ["UP", "LOWER_UP"] : [])],
      linkinfo: { info_kind: kind },
    },
  ]);
const head = (priv: string, pub: string, port: number) => `${priv}\t${pub}\t${port}\toff\n`;
const peerRow = (pub: string, endpoint: string, ips: string, hs = 0, ka = "off") =>
  `${pub}\t(none)\t${endpoint}\t${ips}\t${hs}\t100\t200\t${ka}\n`;

/** setup makes a state dir with a key file and a client over fakes; `state` drives the fake answers. */
function setup(t: Test, opts: Partial<WgClientOptions> = {}) {
  const dir = mkdtempSync(join(tmpdir(), "wg-unit-"));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const keyFile = join(dir, "wg.key");
  writeFileSync(keyFile, `${KEY.privateKey}\n`, { mode: 0o600 });
  const runner = new FakeRunner();
  const spawner = new FakeSpawner();
  const clock = new InstantClock();
  const wg = new WgClient({ iface: IFACE, stateDir: dir, runner, spawner, clock, ...opts });
  const ensureOpts = { listenPort: 51820, privateKeyFile: keyFile, logFile: join(dir, "wg.log") };
  return { dir, keyFile, runner, spawner, clock, wg, ensureOpts };
}

/** on answers commands that start with `prefix` (space-joined argv). */
const on =
  (prefix: string, res: Partial<RunResult> | (() => Partial<RunResult> | undefined)) =>
  (argv: readonly string[]) =>
    argv.join(" ").startsWith(prefix) ? (typeof res === "function" ? res() : res) : undefined;

t.test("create: no kernel module -> wireguard-go, detached, then key, port and up", async (t) => {
  const { runner, spawner, wg, ensureOpts, keyFile, dir } = setup(t);
  let spawned = false;
  runner
    .on(on("ip -d -json link show", NO_DEVICE))
    .on(on("ip link add", { exitCode: 2, stderr: "Error: Unknown device type.\n" }))
    .on(on("wg show", () => (spawned ? { stdout: head("(none)", "(none)", 54812) } : NO_WG)));
  const orig = spawner.spawnDetached.bind(spawner);
  spawner.spawnDetached = async (argv, o) => {
    spawned = true;
    return orig(argv, o);
  };
  t.same(await wg.ensureInterface(ensureOpts), { mode: "userspace", adopted: false });
  t.same(runner.commands, [
    "ip -d -json link show dev capsule0",
    "ip link add dev capsule0 type wireguard",
    "rm -f /var/run/wireguard/capsule0.sock",
    "wg show capsule0 dump",
    `wg set capsule0 listen-port 51820 private-key ${keyFile}`,
    "ip link set dev capsule0 up",
  ]);
  t.same(spawner.lines, ["spawn LOG_LEVEL=error WG_PROCESS_FOREGROUND=1 wireguard-go -f capsule0"]);
  t.equal(spawner.calls[0]?.logFile, join(dir, "wg.log"));
  t.equal(wg.mode, "userspace");

  // After a removal the next create goes straight to wireguard-go: the kernel probe is remembered.
  runner.commands.length = 0;
  spawned = false;
  await wg.ensureInterface(ensureOpts);
  t.notOk(runner.commands.includes("ip link add dev capsule0 type wireguard"), "kernel not probed twice");
});

t.test("create: kernel module present -> ip link add, no process", async (t) => {
  const { runner, spawner, wg, ensureOpts, keyFile } = setup(t);
  runner.on(on("ip -d -json link show", NO_DEVICE));
  t.same(await wg.ensureInterface({ ...ensureOpts, iface: IFACE }), { mode: "kernel", adopted: false });
  t.same(runner.commands, [
    "ip -d -json link show dev capsule0",
    "ip link add dev capsule0 type wireguard",
    `wg set capsule0 listen-port 51820 private-key ${keyFile}`,
    "ip link set dev capsule0 up",
  ]);
  t.same(spawner.calls, []);
});

t.test("create: backend choices", async (t) => {
  const u = setup(t, { backend: "userspace", wireguardGo: "/opt/wg/wireguard-go" });
  u.runner.on(on("ip -d -json link show", NO_DEVICE));
  t.same(await u.wg.ensureInterface(u.ensureOpts), { mode: "userspace", adopted: false });
  t.notOk(
    u.runner.commands.some((c) => c.startsWith("ip link add")),
    "userspace never probes the kernel",
  );
  t.same(u.spawner.calls[0]?.argv, ["/opt/wg/wireguard-go", "-f", "capsule0"]);

  const k = setup(t, { backend: "kernel" });
  k.runner
    .on(on("ip -d -json link show", NO_DEVICE))
    .on(on("ip link add", { exitCode: 2, stderr: "Error: Unknown device type.\n" }));
  await t.rejects(k.wg.ensureInterface(k.ensureOpts), { code: "CAPSULE_UNSUPPORTED" });
  t.same(k.spawner.calls, [], "no fallback when the kernel is forced");

  const other = setup(t);
  other.runner
    .on(on("ip -d -json link show", NO_DEVICE))
    .on(on("ip link add", { exitCode: 2, stderr: "RTNETLINK answers: Operation not permitted\n" }));
  await t.rejects(other.wg.ensureInterface(other.ensureOpts), {
    code: "CAPSULE_COMMAND_FAILED",
    message: /Operation not permitted/,
  });
});

t.test("adopt: a working device is kept, nothing changes (no restart, no key reset)", async (t) => {
  for (const [kind, mode] of [
    ["tun", "userspace"],
    ["wireguard", "kernel"],
  ] as const) {
    const { runner, spawner, wg, ensureOpts } = setup(t);
    runner.on(on("ip -d -json link show", { stdout: linkJson(kind, true) })).on(
      on("wg show", {
        stdout:
          head(KEY.privateKey, KEY.publicKey, 51820) + peerRow(B, "192.0.2.2:51820", "100.64.2.1/32", 1700),
      }),
    );
    t.same(await wg.ensureInterface(ensureOpts), { mode, adopted: true }, kind);
    t.same(
      runner.commands,
      ["ip -d -json link show dev capsule0", "wg show capsule0 dump"],
      `${kind}: only reads`,
    );
    t.same(spawner.calls, []);
  }
});

t.test("adopt: a different port or key is set in place, a down link brought up", async (t) => {
  const { runner, wg, ensureOpts, keyFile } = setup(t);
  const old = generateWgKey();
  runner
    .on(on("ip -d -json link show", { stdout: linkJson("tun", false) }))
    .on(on("wg show", { stdout: head(old.privateKey, old.publicKey, 51999) }));
  t.same(await wg.ensureInterface(ensureOpts), { mode: "userspace", adopted: true });
  t.same(runner.commands, [
    "ip -d -json link show dev capsule0",
    "wg show capsule0 dump",
    `wg set capsule0 listen-port 51820 private-key ${keyFile}`,
    "ip link set dev capsule0 up",
  ]);
});

t.test("stale: a tun nobody answers for is deleted and wireguard-go started anew", async (t) => {
  const { runner, spawner, wg, ensureOpts } = setup(t);
  let deleted = false;
  runner
    .on(on("ip -d -json link show", () => (deleted ? NO_DEVICE : { stdout: linkJson("tun", true) })))
    .on(
      on("ip link del", () => {
        deleted = true;
        return {};
      }),
    )
    .on(on("ip link add", { exitCode: 2, stderr: "Error: Unknown device type.\n" }))
    .on(
      on("wg show", () =>
        spawner.calls.length
          ? { stdout: head("(none)", "(none)", 1) }
          : { exitCode: 1, stderr: "Unable to access interface: Connection refused\n" },
      ),
    );
  t.same(await wg.ensureInterface(ensureOpts), { mode: "userspace", adopted: false });
  t.same(runner.commands.slice(0, 5), [
    "ip -d -json link show dev capsule0",
    "wg show capsule0 dump",
    "ip link del dev capsule0",
    "ip link add dev capsule0 type wireguard",
    "rm -f /var/run/wireguard/capsule0.sock",
  ]);
  t.equal(spawner.calls.length, 1);
});

t.test("refuses an interface that is not WireGuard, before changing anything", async (t) => {
  const { runner, wg, ensureOpts } = setup(t);
  runner.on(on("ip -d -json link show", { stdout: linkJson("veth", true) })).on(on("wg show", NO_WG));
  await t.rejects(wg.ensureInterface(ensureOpts), {
    code: "CAPSULE_FAILED_PRECONDITION",
    message: /capsule0 exists and is not a WireGuard device \(veth\)/,
  });
  t.same(runner.commands, ["ip -d -json link show dev capsule0", "wg show capsule0 dump"]);
});

t.test("wireguard-go that dies at start or never answers fails with the log", async (t) => {
  const died = setup(t);
  writeFileSync(died.ensureOpts.logFile, "ERROR: (capsule0) Failed to create TUN device: no such file\n");
  died.runner
    .on(on("ip -d -json link show", NO_DEVICE))
    .on(on("ip link add", { exitCode: 2, stderr: "Unknown device type" }))
    .on(on("wg show", NO_WG));
  const orig = died.spawner.spawnDetached.bind(died.spawner);
  died.spawner.spawnDetached = async (argv, o) => {
    const pid = await orig(argv, o);
    died.spawner.kill(pid);
    return pid;
  };
  await t.rejects(died.wg.ensureInterface(died.ensureOpts), {
    code: "CAPSULE_COMMAND_FAILED",
    message: "wireguard-go for capsule0 exited at start",
    hint: /Failed to create TUN device/,
  });

  const hung = setup(t, { timeoutMs: 1000 });
  hung.runner
    .on(on("ip -d -json link show", NO_DEVICE))
    .on(on("ip link add", { exitCode: 2, stderr: "Unknown device type" }))
    .on(on("wg show", NO_WG));
  await t.rejects(hung.wg.ensureInterface(hung.ensureOpts), { code: "CAPSULE_TIMEOUT" });
  t.ok(hung.clock.t >= 1000, "waited out the bound");
  t.ok(hung.runner.commands.filter((c) => c === "wg show capsule0 dump").length > 5, "polled meanwhile");
});

t.test("ensureInterface validates before any effect", async (t) => {
  const { runner, wg, ensureOpts, keyFile } = setup(t);
  await t.rejects(wg.ensureInterface({ ...ensureOpts, listenPort: 70000 }), {
    code: "CAPSULE_INVALID_ARGUMENT",
  });
  await t.rejects(wg.ensureInterface({ ...ensureOpts, iface: "capsule1" }), {
    code: "CAPSULE_INVALID_ARGUMENT",
    message: /manages capsule0, not capsule1/,
  });
  writeFileSync(keyFile, "not a key\n");
  await t.rejects(wg.ensureInterface(ensureOpts), { code: "CAPSULE_STATE_CORRUPT" });
  await t.rejects(wg.ensureInterface({ ...ensureOpts, privateKeyFile: "/nonexistent/wg.key" }), {
    code: "CAPSULE_STATE_CORRUPT",
  });
  t.same(runner.commands, []);
  t.throws(() => setup(t, { iface: "this-name-is-too-long" }), { code: "CAPSULE_INVALID_ARGUMENT" });
  t.throws(() => setup(t, { iface: "a/b" }), { code: "CAPSULE_INVALID_ARGUMENT" });
});

t.test("ensureInterface removes syncconf dirs a killed capsuled left behind", async (t) => {
  const { runner, dir, wg, ensureOpts } = setup(t);
  mkdirSync(join(dir, ".wg-sync-abc123"));
  writeFileSync(join(dir, ".wg-sync-abc123", "capsule0.conf"), "secret");
  runner.on(on("ip -d -json link show", NO_DEVICE));
  await wg.ensureInterface(ensureOpts);
  t.same(readdirSync(dir).sort(), ["wg.key"]);
});

const peer = (publicKey: string, allowedIps: string[], endpoint?: string, ka?: number): WgPeer => ({
  publicKey,
  endpoint,
  allowedIps,
  persistentKeepalive: ka,
});
const cfg = (peers: WgPeer[], port = 51820): WgInterfaceConfig => ({
  privateKey: KEY.privateKey,
  listenPort: port,
  peers,
});

t.test("sync: one wg syncconf with a private 0600 file, deleted after", async (t) => {
  const { runner, wg, dir } = setup(t);
  const want = cfg([
    peer(B, ["100.64.2.1/32"], "192.0.2.2:51820"),
    peer(C, ["100.64.3.1/32"], undefined, 25),
  ]);
  let seen: { text: string; mode: number; dirMode: number } | undefined;
  runner
    .on(
      on("wg show", {
        stdout: head(KEY.privateKey, KEY.publicKey, 51820) + peerRow(B, "192.0.2.2:51820", "100.64.2.1/32"),
      }),
    )
    .on((argv) => {
      if (argv[1] !== "syncconf") return undefined;
      const file = argv[3]!;
      seen = {
        text: readFileSync(file, "utf8"),
        mode: statSync(file).mode & 0o777,
        dirMode: statSync(join(file, "..")).mode & 0o777,
      };
      return {};
    });
  t.same(await wg.sync(want), { changed: true, added: [C], removed: [], updated: [] });
  t.equal(runner.commands.length, 2);
  t.equal(runner.commands[0], "wg show capsule0 dump");
  t.match(runner.commands[1], new RegExp(`^wg syncconf capsule0 ${dir}/\\.wg-sync-\\w+/capsule0\\.conf$`));
  t.same(seen, { text: renderWgConfig(want), mode: 0o600, dirMode: 0o700 });
  t.same(readdirSync(dir), ["wg.key"], "the file and its dir are gone");
});

t.test("sync: an unchanged configuration runs nothing but the read", async (t) => {
  const { runner, wg } = setup(t);
  runner.on(
    on("wg show", {
      stdout:
        head(KEY.privateKey, KEY.publicKey, 51820) +
        // The learned endpoint of a peer configured without one is not a difference.
        peerRow(C, "198.51.100.7:40000", "100.64.3.1/32", 1700, "25") +
        peerRow(B, "192.0.2.2:51820", "100.64.2.2/32,100.64.2.1/32", 1700),
    }),
  );
  const want = cfg([
    peer(B, ["100.64.2.1/32", "100.64.2.2"], "192.0.2.2:51820"),
    peer(C, ["100.64.3.1/32"], undefined, 25),
  ]);
  t.same(await wg.sync(want), { changed: false, added: [], removed: [], updated: [] });
  t.same(runner.commands, ["wg show capsule0 dump"]);
});

t.test("sync: a failing syncconf still removes the file", async (t) => {
  const { runner, wg, dir } = setup(t);
  runner
    .on(on("wg show", { stdout: head(KEY.privateKey, KEY.publicKey, 51820) }))
    .on(on("wg syncconf", { exitCode: 1, stderr: "Line unrecognized" }));
  await t.rejects(wg.sync(cfg([peer(B, ["100.64.2.1/32"])])), { code: "CAPSULE_COMMAND_FAILED" });
  t.same(readdirSync(dir), ["wg.key"]);
});

t.test("sync: validates before any effect; a missing device is CAPSULE_NOT_FOUND", async (t) => {
  const { runner, wg } = setup(t);
  await t.rejects(wg.sync({ ...cfg([]), privateKey: "nope" }), { code: "CAPSULE_INVALID_CONFIG" });
  await t.rejects(wg.sync(cfg([peer("nope", [])])), { code: "CAPSULE_INVALID_CONFIG" });
  await t.rejects(wg.sync(cfg([peer(B, ["100.64.2.1/32"]), peer(B, ["100.64.2.2/32"])])), {
    code: "CAPSULE_INVALID_CONFIG",
    message: /listed twice/,
  });
  await t.rejects(wg.sync(cfg([peer(KEY.publicKey, ["100.64.2.1/32"])])), {
    code: "CAPSULE_INVALID_CONFIG",
    message: /own key/,
  });
  await t.rejects(wg.sync(cfg([peer(B, ["100.64.2.1/32\nPrivateKey = x"])])), {
    code: "CAPSULE_INVALID_CONFIG",
  });
  await t.rejects(wg.sync(cfg([], 0)), { code: "CAPSULE_INVALID_CONFIG" });
  t.same(runner.commands, []);
  runner.on(on("wg show", NO_WG));
  await t.rejects(wg.sync(cfg([])), { code: "CAPSULE_NOT_FOUND", hint: /fabric interface/ });
});

t.test("diffConfig: what counts as a change", async (t) => {
  const dump =
    head(KEY.privateKey, KEY.publicKey, 51820) +
    peerRow(B, "192.0.2.2:51820", "100.64.2.1/32", 1700) +
    peerRow(C, "(none)", "100.64.3.1/32", 0, "25");
  const base = [peer(B, ["100.64.2.1/32"], "192.0.2.2:51820"), peer(C, ["100.64.3.1/32"], undefined, 25)];
  t.same(diffConfig(dump, cfg(base)), { changed: false, added: [], removed: [], updated: [] });
  t.same(diffConfig(dump, cfg([base[0]!])).removed, [C]);
  t.same(
    diffConfig(dump, cfg([peer(B, ["100.64.2.1/32"], "192.0.2.9:51820"), base[1]!])).updated,
    [B],
    "endpoint",
  );
  t.same(
    diffConfig(dump, cfg([peer(B, ["100.64.2.0/24"], "192.0.2.2:51820"), base[1]!])).updated,
    [B],
    "allowed ips",
  );
  t.same(diffConfig(dump, cfg([base[0]!, peer(C, ["100.64.3.1/32"])])).updated, [C], "keepalive off");
  t.same(
    diffConfig(dump, cfg([peer(B, ["100.64.2.1/32"], "192.0.2.2:51820", 0), base[1]!])).updated,
    [],
    "keepalive 0 = off",
  );
  t.same(
    diffConfig(dump, cfg([base[0]!, peer(C, ["100.64.3.1/32"], "peer.example:51820", 25)])).updated,
    [C],
    "hostname",
  );
  t.same(
    diffConfig(dump, cfg([peer(B, ["100.64.2.1"], "192.0.2.2:51820"), base[1]!])).updated,
    [],
    "bare = /32",
  );
  t.same(diffConfig(dump, cfg(base, 51821)), { changed: true, added: [], removed: [], updated: [] }, "port");
  const rotated = { ...cfg(base), privateKey: generateWgKey().privateKey };
  t.equal(diffConfig(dump, rotated).changed, true, "key rotation");
  const fresh = head("(none)", "(none)", 54812);
  t.same(diffConfig(fresh, cfg(base)), { changed: true, added: [B, C], removed: [], updated: [] });
});

t.test("dump and publicKey parse wg show", async (t) => {
  const { runner, wg } = setup(t);
  runner.on(
    on("wg show", {
      stdout:
        head(KEY.privateKey, KEY.publicKey, 51820) +
        peerRow(B, "192.0.2.2:51820", "100.64.2.1/32,100.64.2.7/32", 1700000000, "25"),
    }),
  );
  t.same(await wg.dump(), {
    publicKey: KEY.publicKey,
    listenPort: 51820,
    peers: [
      {
        publicKey: B,
        endpoint: "192.0.2.2:51820",
        allowedIps: ["100.64.2.1/32", "100.64.2.7/32"],
        latestHandshake: 1700000000,
        rxBytes: 100,
        txBytes: 200,
        persistentKeepalive: 25,
      },
    ],
  });
  t.equal(await wg.publicKey(), wgPublicKey(KEY.privateKey));
  const fresh = setup(t);
  fresh.runner.on(on("wg show", { stdout: head("(none)", "(none)", 54812) }));
  await t.rejects(fresh.wg.publicKey(), { code: "CAPSULE_FAILED_PRECONDITION" });
  const none = setup(t);
  none.runner.on(on("wg show", NO_WG));
  await t.rejects(none.wg.dump(), { code: "CAPSULE_NOT_FOUND" });
});

t.test("remove: delete the link, wait until nothing answers, drop the socket; idempotent", async (t) => {
  const { runner, wg } = setup(t);
  let present = true;
  let polls = 0;
  runner
    .on(
      on("ip link del", () =>
        present ? { exitCode: 0 } : { exitCode: 1, stderr: 'Cannot find device "capsule0"' },
      ),
    )
    // wireguard-go takes a moment to let go of its socket after its tun is deleted.
    .on(on("wg show", () => (polls++ < 2 ? { stdout: head("(none)", "(none)", 1) } : NO_WG)));
  t.equal(await wg.remove(), true);
  present = false;
  t.same(runner.commands, [
    "ip link del dev capsule0",
    "wg show capsule0 dump",
    "wg show capsule0 dump",
    "wg show capsule0 dump",
    "rm -f /var/run/wireguard/capsule0.sock",
  ]);
  t.equal(await wg.remove(), false, "already gone");
});

t.test("calls on one client run one at a time", async (t) => {
  const { runner, wg } = setup(t);
  const order: string[] = [];
  runner.on((argv) => {
    order.push(argv.join(" "));
    return argv[1] === "show" ? { stdout: head(KEY.privateKey, KEY.publicKey, 51820) } : undefined;
  });
  await Promise.all([wg.dump(), wg.sync(cfg([])), wg.publicKey()]);
  t.same(order, ["wg show capsule0 dump", "wg show capsule0 dump", "wg show capsule0 dump"]);
});

t.test("NsRunner and NsSpawner prefix nsenter; FakeSpawner records", async (t) => {
  t.same(nsenterArgv({ netns: "cap-a", mountNs: "/x/a.mnt" }), [
    "nsenter",
    "--net=/run/netns/cap-a",
    "--mount=/x/a.mnt",
    "--",
  ]);
  t.same(nsenterArgv({ netns: "/proc/42/ns/net" }), ["nsenter", "--net=/proc/42/ns/net", "--"]);
  const inner = new FakeRunner();
  await new NsRunner(inner, { netns: "cap-a" }).run(["wg", "show"]);
  t.same(inner.commands, ["nsenter --net=/run/netns/cap-a -- wg show"]);
  const fs = new FakeSpawner();
  const sp = new NsSpawner(fs, { netns: "cap-a", mountNs: "/x/a.mnt" });
  const pid = await sp.spawnDetached(["wireguard-go", "-f", "capsule0"], {
    logFile: "/l",
    env: { B: "2", A: "1" },
  });
  t.same(fs.lines, [
    "spawn A=1 B=2 nsenter --net=/run/netns/cap-a --mount=/x/a.mnt -- wireguard-go -f capsule0",
  ]);
  t.equal(await sp.isAlive(pid), true);
  fs.kill(pid);
  t.equal(await sp.isAlive(pid), false);
  t.equal(await fs.isAlive(4242), false, "never spawned");
});

t.test("DetachedSpawner: own session, output to the log, outlives nothing it should not", async (t) => {
  const dir = mkdtempSync(join(tmpdir(), "spawner-"));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const log = join(dir, "out.log");
  const sp = new DetachedSpawner();
  // (NODE_OPTIONS would be the obvious leak to check, but tap injects it into every child.)
  process.env.CAPSULE_SPAWN_LEAK = "leaked";
  t.teardown(() => {
    delete process.env.CAPSULE_SPAWN_LEAK;
  });
  const pid = await sp.spawnDetached(
    [
      "sh",
      "-c",
      'echo "sid=$(cut -d" " -f6 /proc/$$/stat) pid=$$ lvl=$LOG_LEVEL leak=$CAPSULE_SPAWN_LEAK"; exec sleep 30',
    ],
    {
      logFile: log,
      env: { LOG_LEVEL: "error" },
    },
  );
  t.teardown(() => {
    try {
      process.kill(pid, "SIGKILL");
    } catch {}
  });
  t.equal(await sp.isAlive(pid), true);
  const deadline = Date.now() + 5000;
  while (!readFileSync(log, "utf8").includes("leak=") && Date.now() < deadline)
    await new Promise((r) => setTimeout(r, 20));
  const line = readFileSync(log, "utf8").trim();
  t.equal(line, `sid=${pid} pid=${pid} lvl=error leak=`, "session leader, env pinned and extended");
  t.equal(statSync(log).mode & 0o777, 0o600);
  process.kill(pid, "SIGKILL");
  const gone = Date.now() + 5000;
  while ((await sp.isAlive(pid)) && Date.now() < gone) await new Promise((r) => setTimeout(r, 20));
  t.equal(await sp.isAlive(pid), false);
  t.equal(await sp.isAlive(-1), false);
  await t.rejects(sp.spawnDetached(["/nonexistent/binary"], { logFile: log }), {
    code: "CAPSULE_COMMAND_FAILED",
    message: /nonexistent/,
  });
});
