import t from "tap";
import {
  FakeNetlink,
  IpNetlink,
  type Netlink,
  parseCidr,
  parseRouteDst,
  RtNetlink,
} from "../../src/node/host/netlink.js";
import { FakeRunner, type RunResult } from "../../src/node/host/runner.js";

/** A fabric applier's typical moves, run against any Netlink; returns what each call reported. */
async function apply(nl: Netlink): Promise<boolean[]> {
  return [
    await nl.setLinkUp("capsule0"),
    await nl.ensureAddress("capsule0", "100.64.1.1/10"),
    await nl.ensureRoute("100.64.2.0/24", "capsule0", { src: "100.64.1.1" }),
    await nl.ensureRoute("100.64.9.7", "capsule0"),
    await nl.setSysctl("net.ipv4.ip_forward", "1"),
  ];
}

const GOLDEN = [
  "ip link set dev capsule0 up",
  "ip addr add 100.64.1.1/10 dev capsule0",
  "ip route replace 100.64.2.0/24 dev capsule0 src 100.64.1.1",
  "ip route replace 100.64.9.7/32 dev capsule0",
  "sysctl -w net.ipv4.ip_forward=1",
];

t.test("parseCidr and parseRouteDst", async (t) => {
  t.same(parseCidr("100.64.1.1/10"), { ip: "100.64.1.1", prefix: 10 });
  t.same(parseCidr("100.64.1.1"), { ip: "100.64.1.1", prefix: 32 });
  for (const bad of [
    "100.64.1/10",
    "100.64.1.256/32",
    "100.64.1.1/33",
    "100.64.1.1/",
    "fd00::1/64",
    "a/b/c",
    "01.2.3.4",
  ])
    t.throws(() => parseCidr(bad), { code: "CAPSULE_INVALID_ARGUMENT" }, bad);
  t.same(parseRouteDst("100.64.2.0/24"), { ip: "100.64.2.0", prefix: 24 });
  t.same(parseRouteDst("0.0.0.0/0"), { ip: "0.0.0.0", prefix: 0 });
  t.throws(() => parseRouteDst("100.64.2.1/24"), { code: "CAPSULE_INVALID_ARGUMENT", message: /host bits/ });
});

t.test("FakeNetlink records canonical lines once; a re-apply is silent", async (t) => {
  const nl = new FakeNetlink({ links: ["capsule0"] });
  t.same(await apply(nl), [true, true, true, true, true]);
  t.same(nl.lines, GOLDEN);
  t.same(await apply(nl), [false, false, false, false, false]);
  t.same(nl.lines, GOLDEN, "nothing more recorded");
  t.same(await nl.listAddresses("capsule0"), ["100.64.1.1/10"]);
  t.same(nl.routeTable(), ["100.64.2.0/24 dev capsule0 src 100.64.1.1", "100.64.9.7/32 dev capsule0"]);
  t.equal(nl.sysctl("net.ipv4.ip_forward"), "1");
});

t.test("FakeNetlink: updates, removals and missing links", async (t) => {
  const nl = new FakeNetlink({ links: ["capsule0", "eth0"], sysctls: { "net.ipv4.ip_forward": "0" } });
  await apply(nl);
  nl.lines.length = 0;
  t.equal(await nl.ensureRoute("100.64.2.0/24", "capsule0"), true, "dropping the source is a change");
  t.equal(await nl.ensureRoute("100.64.2.0/24", "eth0"), true, "moving to another device is a change");
  t.equal(await nl.removeRoute("100.64.2.0/24", "capsule0"), false, "not through capsule0 any more");
  t.equal(await nl.removeRoute("100.64.2.0/24", "eth0"), true);
  t.equal(await nl.removeAddress("capsule0", "100.64.1.1/10"), true);
  t.equal(await nl.removeAddress("capsule0", "100.64.1.1/10"), false);
  t.equal(await nl.removeAddress("gone0", "100.64.1.1/10"), false, "removing from a missing link is a no-op");
  t.equal(await nl.removeRoute("100.64.9.7/32", "gone0"), false);
  t.same(nl.lines, [
    "ip route replace 100.64.2.0/24 dev capsule0",
    "ip route replace 100.64.2.0/24 dev eth0",
    "ip route del 100.64.2.0/24 dev eth0",
    "ip addr del 100.64.1.1/10 dev capsule0",
  ]);
  await t.rejects(nl.ensureAddress("gone0", "100.64.1.1/32"), {
    code: "CAPSULE_NOT_FOUND",
    message: /gone0/,
  });
  await t.rejects(nl.ensureRoute("100.64.3.0/24", "gone0"), { code: "CAPSULE_NOT_FOUND" });
  await t.rejects(nl.setLinkUp("gone0"), { code: "CAPSULE_NOT_FOUND" });
  await t.rejects(nl.listAddresses("gone0"), { code: "CAPSULE_NOT_FOUND" });
  t.equal(await nl.linkExists("eth0"), true);
  nl.deleteLink("capsule0");
  t.equal(await nl.linkExists("capsule0"), false);
  t.same(nl.routeTable(), [], "the kernel drops a deleted link's routes");
});

/**
 * simulatedIp answers `ip -json` and `sysctl` reads from an in-memory namespace and applies the
 * mutating commands to it: enough of iproute2 to check IpNetlink's reads and writes together.
 */
function simulatedIp(links: string[]): FakeRunner {
  const ns = {
    links: new Map(links.map((l) => [l, { up: false, addrs: [] as string[] }])),
    routes: new Map<string, { dev: string; prefsrc?: string }>(),
    sysctl: new Map<string, string>([["net.ipv4.ip_forward", "0"]]),
  };
  type Answer = Partial<RunResult> | undefined;
  const noDev = (d: string): Answer => ({ exitCode: 1, stderr: `Device "${d}" does not exist.\n` });
  const table: [RegExp, (m: string[]) => Answer][] = [
    [
      /^ip -json link show dev (\S+)$/,
      ([, d]) => {
        const l = ns.links.get(d!);
        return l
          ? { stdout: JSON.stringify([{ ifname: d, flags: ["POINTOPOINT", ...(l.up ? ["UP"] : [])] }]) }
          : noDev(d!);
      },
    ],
    [
      /^ip -json -4 addr show dev (\S+)$/,
      ([, d]) => {
        const l = ns.links.get(d!);
        if (!l) return noDev(d!);
        const info = l.addrs.map((a) => ({
          family: "inet",
          local: a.split("/")[0],
          prefixlen: Number(a.split("/")[1]),
        }));
        return { stdout: JSON.stringify([{ ifname: d, addr_info: info }]) };
      },
    ],
    [
      /^ip -json -4 route show table main exact (\S+)$/,
      ([, dst]) => {
        const r = ns.routes.get(dst!);
        // iproute2 prints a /32 destination without its prefix length.
        const shown = dst!.endsWith("/32") ? dst!.slice(0, -3) : dst;
        return { stdout: JSON.stringify(r ? [{ dst: shown, ...r, scope: "link" }] : []) };
      },
    ],
    [/^sysctl -n (\S+)$/, ([, k]) => ({ stdout: `${ns.sysctl.get(k!) ?? ""}\n` })],
    [
      /^ip link set dev (\S+) up$/,
      ([, d]) => {
        ns.links.get(d!)!.up = true;
        return {};
      },
    ],
    [
      /^ip addr add (\S+) dev (\S+)$/,
      ([, a, d]) => {
        ns.links.get(d!)!.addrs.push(a!);
        return {};
      },
    ],
    [
      /^ip addr del (\S+) dev (\S+)$/,
      ([, a, d]) => {
        const l = ns.links.get(d!)!;
        l.addrs = l.addrs.filter((x) => x !== a);
        return {};
      },
    ],
    [
      /^ip route replace (\S+) dev (\S+)(?: src (\S+))?$/,
      ([, dst, dev, src]) => {
        ns.routes.set(dst!, { dev: dev!, ...(src ? { prefsrc: src } : {}) });
        return {};
      },
    ],
    [
      /^ip route del (\S+) dev (\S+)$/,
      ([, dst]) => {
        ns.routes.delete(dst!);
        return {};
      },
    ],
    [
      /^sysctl -w ([^=]+)=(.*)$/,
      ([, k, v]) => {
        ns.sysctl.set(k!, v!);
        return {};
      },
    ],
  ];
  return new FakeRunner().on((argv) => {
    const cmd = argv.join(" ");
    for (const [re, answer] of table) {
      const m = re.exec(cmd);
      if (m) return answer([...m]);
    }
    return { exitCode: 127, stderr: `unexpected command: ${cmd}` };
  });
}

const mutating = (cmds: string[]) => cmds.filter((c) => !/^ip -json |^sysctl -n /.test(c));

t.test("IpNetlink runs exactly FakeNetlink's lines, and only reads on a re-apply", async (t) => {
  const runner = simulatedIp(["capsule0"]);
  const nl = new IpNetlink(runner);
  t.same(await apply(nl), [true, true, true, true, true]);
  t.same(mutating(runner.commands), GOLDEN);
  t.same(runner.commands.slice(0, 4), [
    "ip -json link show dev capsule0",
    "ip link set dev capsule0 up",
    "ip -json link show dev capsule0",
    "ip -json -4 addr show dev capsule0",
  ]);
  runner.commands.length = 0;
  t.same(await apply(nl), [false, false, false, false, false]);
  t.same(mutating(runner.commands), [], "a re-apply only reads");
  t.same(await nl.listAddresses("capsule0"), ["100.64.1.1/10"]);
  t.equal(await nl.removeRoute("100.64.9.7/32", "capsule0"), true);
  t.equal(await nl.removeRoute("100.64.9.7/32", "capsule0"), false);
  t.equal(await nl.removeAddress("capsule0", "100.64.1.1/10"), true);
  t.equal(await nl.removeAddress("capsule0", "100.64.1.1/10"), false);
  t.equal(await nl.removeAddress("gone0", "100.64.1.1/10"), false);
  await t.rejects(nl.ensureAddress("gone0", "100.64.1.1/32"), { code: "CAPSULE_NOT_FOUND" });
  t.equal(await nl.linkExists("capsule0"), true);
  t.equal(await nl.linkExists("gone0"), false);
});

t.test("IpNetlink: a failing read is an error with the command, not a missing link", async (t) => {
  const runner = new FakeRunner().on(() => ({
    exitCode: 255,
    stderr: "Cannot open netlink socket: Permission denied",
  }));
  await t.rejects(new IpNetlink(runner).linkExists("capsule0"), {
    code: "CAPSULE_COMMAND_FAILED",
    message: /ip -json link show dev capsule0: exit 255: Cannot open netlink socket/,
  });
});

t.test("RtNetlink reads this namespace without privileges (loopback)", async (t) => {
  const nl = new RtNetlink();
  t.teardown(() => nl.close());
  t.equal(await nl.linkExists("lo"), true);
  t.equal(await nl.linkExists("no-such-if0"), false);
  const addrs = await nl.listAddresses("lo");
  t.ok(
    addrs.every((a) => /^\d+\.\d+\.\d+\.\d+\/\d+$/.test(a)),
    addrs.join(" "),
  );
  await t.rejects(nl.listAddresses("no-such-if0"), { code: "CAPSULE_NOT_FOUND" });
  await t.rejects(
    nl.ensureAddress("lo", "100.64.0.0/99"),
    { code: "CAPSULE_INVALID_ARGUMENT" },
    "validated first",
  );
});

t.test("RtNetlink: concurrent dumps on one socket are serialized, not interleaved", async (t) => {
  const nl = new RtNetlink();
  t.teardown(() => nl.close());
  // Route and address dumps at once, as when several workloads are set up together; without
  // the queue the package fails with "Multipart message not terminated properly".
  const r = await Promise.all(
    Array.from({ length: 40 }, (_, i) =>
      i % 2 ? nl.removeRoute("203.0.113.0/24", "lo") : nl.listAddresses("lo").then(() => false),
    ),
  );
  t.same(r, Array(40).fill(false), "40 concurrent reads all answered");
});
