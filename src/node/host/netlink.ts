/**
 * The Netlink seam: addresses, routes, link state and sysctls of the network namespace.
 *
 * Three implementations, one canonical text:
 * - {@link RtNetlink}: rtnetlink in-process through the `netlink` package (no `ip` process per
 *   change, typed replies). A netlink socket talks to the network namespace of the thread that
 *   opened it, and capsuled runs inside its own namespace, so it needs no namespace plumbing.
 *   /proc/sys/net is per namespace the same way. Beware: the package's sendmsg/recvmsg run on
 *   the event loop, and the kernel serves most rtnetlink requests in that syscall under its
 *   global rtnl lock; while another process holds the lock (namespace teardown, a device being
 *   created or deleted anywhere on the host) the whole event loop waits, with no timeout able to
 *   fire. The request timeout below bounds only a reply that never comes.
 * - {@link IpNetlink} runs `ip -json` and `sysctl` through a {@link CommandRunner}: a request that
 *   waits for the rtnl lock blocks a child process, bounded by the runner's timeout, never the
 *   event loop. capsuled's fabric uses it (its start must never freeze the API). Node cannot
 *   setns(2), so code that drives a namespace from outside (root tests, the lab) wraps its runner
 *   in an NsRunner and uses this one too.
 * - {@link FakeNetlink} models the state and records each change as the `ip`/`sysctl` line that
 *   would make it (exactly the mutating commands IpNetlink runs), so tests diff text.
 *
 * IPv4 only: the fabric is 100.64.0.0/10. Routes live in the main table.
 */
import { readFile, writeFile } from "node:fs/promises";
import type { RtNetlinkSocket } from "netlink";
import { CapsuleError, CommandError, ErrorCode, invalidArgument } from "../../errors.js";
import type { CommandRunner } from "./runner.js";

/** RouteOptions: `src` is optional, the preferred source address; unset = no preferred source (the kernel picks). */
export interface RouteOptions {
  src?: string;
}

/**
 * Netlink is the seam for the namespace's L3 configuration. Every method is idempotent and
 * returns whether it changed anything, so a re-apply of unchanged state changes nothing.
 * Interfaces are never created here (WireGuard makes its own); an `ensure*` on a missing
 * interface fails with CAPSULE_NOT_FOUND, a `remove*` on one is a no-op.
 */
export interface Netlink {
  /** ensureAddress adds `cidr` ("100.64.1.1/10"; a bare address means /32) to `iface` unless present. Other addresses are left alone. */
  ensureAddress(iface: string, cidr: string): Promise<boolean>;
  /** removeAddress removes exactly `cidr` from `iface` if present. */
  removeAddress(iface: string, cidr: string): Promise<boolean>;
  /** listAddresses returns the IPv4 addresses of `iface` as sorted "a.b.c.d/len". */
  listAddresses(iface: string): Promise<string[]>;
  /**
   * ensureRoute makes the main table's route to `dst` (a network, "100.64.2.0/24"; a bare address
   * means /32) go out `iface` with `opts.src` as preferred source, replacing a route to the same
   * destination that differs (another device or source).
   */
  ensureRoute(dst: string, iface: string, opts?: RouteOptions): Promise<boolean>;
  /** removeRoute deletes the main table's route to `dst` through `iface` if there is one (a route to `dst` via another device is left). */
  removeRoute(dst: string, iface: string): Promise<boolean>;
  /** setLinkUp sets `iface` administratively up unless it is. */
  setLinkUp(iface: string): Promise<boolean>;
  /** linkExists reports whether the namespace has an interface named `iface`. */
  linkExists(iface: string): Promise<boolean>;
  /** setSysctl writes `value` to `key` ("net.ipv4.ip_forward", or a /proc/sys-relative path with "/") unless it already holds it. */
  setSysctl(key: string, value: string): Promise<boolean>;
}

// ---------------------------------------------------------------------------------------------
// Addresses and canonical command lines (pure)

/** Cidr is a parsed IPv4 address with its prefix length. */
export interface Cidr {
  ip: string;
  prefix: number;
}

const IPV4 = /^(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(\.(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)){3}$/;

/** parseCidr parses "a.b.c.d/len" or a bare "a.b.c.d" (= /32); throws CAPSULE_INVALID_ARGUMENT otherwise. */
export function parseCidr(s: string, field = "cidr"): Cidr {
  const [ip = "", len, extra] = s.split("/");
  if (extra !== undefined || !IPV4.test(ip))
    throw invalidArgument(field, `"${s}" is not an IPv4 address or CIDR`);
  if (len === undefined) return { ip, prefix: 32 };
  const prefix = Number(len);
  if (!/^\d{1,2}$/.test(len) || prefix > 32)
    throw invalidArgument(field, `"${s}" has an invalid prefix length`);
  return { ip, prefix };
}

const toInt = (ip: string) => ip.split(".").reduce((n, o) => ((n << 8) | Number(o)) >>> 0, 0);

/** formatCidr renders a {@link Cidr} as "a.b.c.d/len". */
export function formatCidr(c: Cidr): string {
  return `${c.ip}/${c.prefix}`;
}

/**
 * parseRouteDst parses a route destination: a network whose host bits are zero (the kernel
 * rejects anything else), or a bare address (= /32).
 */
export function parseRouteDst(s: string): Cidr {
  const c = parseCidr(s, "route destination");
  const mask = c.prefix === 0 ? 0 : (0xffffffff << (32 - c.prefix)) >>> 0;
  if ((toInt(c.ip) & ~mask) >>> 0 !== 0) {
    throw invalidArgument("route destination", `"${s}" has host bits set`, "use the network address");
  }
  return c;
}

/** addrAddArgv is the canonical command for adding an address. */
export function addrAddArgv(iface: string, cidr: string): string[] {
  return ["ip", "addr", "add", cidr, "dev", iface];
}

/** addrDelArgv is the canonical command for removing an address. */
export function addrDelArgv(iface: string, cidr: string): string[] {
  return ["ip", "addr", "del", cidr, "dev", iface];
}

/** routeReplaceArgv is the canonical command for creating or updating a route. */
export function routeReplaceArgv(dst: string, iface: string, src?: string): string[] {
  return ["ip", "route", "replace", dst, "dev", iface, ...(src ? ["src", src] : [])];
}

/** routeDelArgv is the canonical command for deleting a route. */
export function routeDelArgv(dst: string, iface: string): string[] {
  return ["ip", "route", "del", dst, "dev", iface];
}

/** linkUpArgv is the canonical command for setting a link up. */
export function linkUpArgv(iface: string): string[] {
  return ["ip", "link", "set", "dev", iface, "up"];
}

/** sysctlArgv is the canonical command for writing a sysctl. */
export function sysctlArgv(key: string, value: string): string[] {
  return ["sysctl", "-w", `${key}=${value}`];
}

const normValue = (v: string) => v.trim().split(/\s+/).join(" ");

const noSuchLink = (iface: string, cause?: unknown) =>
  new CapsuleError(ErrorCode.NotFound, `network interface ${iface} does not exist`, { cause });

const sortAddrs = (a: string[]) =>
  a.sort((x, y) => toInt(x.split("/")[0]!) - toInt(y.split("/")[0]!) || x.localeCompare(y));

// ---------------------------------------------------------------------------------------------
// RtNetlink: rtnetlink in-process

const AF_INET = 2;
const RT_TABLE_MAIN = 254;
// FlagsNew from netlink's constants, spelled out so this module loads the native addon lazily.
const NLM_F_REPLACE = 0x100;
const NLM_F_EXCL = 0x200;
const NLM_F_CREATE = 0x400;

const ipBuf = (ip: string) => Buffer.from(ip.split(".").map(Number));
const bufIp = (b: Buffer | undefined) => (b && b.length === 4 ? [...b].join(".") : undefined);

/** RtNetlinkOptions: all optional. `timeoutMs` bounds each request (default 5 s); `procSys` is where sysctls live (default /proc/sys). */
export interface RtNetlinkOptions {
  timeoutMs?: number;
  procSys?: string;
}

/**
 * RtNetlink is the real {@link Netlink}: rtnetlink requests in-process, in the network
 * namespace capsuled runs in. The socket opens on first use (the native addon loads then, so
 * importing this module never needs it) and does not keep the process alive; {@link close}
 * releases it.
 */
export class RtNetlink implements Netlink {
  private sock: Promise<RtNetlinkSocket> | undefined;
  private readonly timeout: number;
  private readonly procSys: string;

  constructor(opts: RtNetlinkOptions = {}) {
    this.timeout = opts.timeoutMs ?? 5_000;
    this.procSys = opts.procSys ?? "/proc/sys";
  }

  private socket(): Promise<RtNetlinkSocket> {
    this.sock ??= import("netlink").then((m) => m.createRtNetlink());
    return this.sock;
  }

  // One request at a time on the socket: the package matches replies by sequence number but
  // assembles multipart dumps per socket, so two concurrent dumps (routes for two workloads
  // being set up at once) fail with "Multipart message not terminated properly".
  private queue: Promise<unknown> = Promise.resolve();
  private exclusive<T>(fn: (s: RtNetlinkSocket) => Promise<T>): Promise<T> {
    const run = this.queue.then(async () => fn(await this.socket()));
    this.queue = run.catch(() => undefined);
    return run;
  }

  /** close releases the netlink socket; a later call opens a new one. */
  async close(): Promise<void> {
    const s = this.sock;
    this.sock = undefined;
    if (s) (await s).socket.close();
  }

  // The package reports kernel errors only as "Request rejected: EEXIST"; keep the code and
  // wrap it so callers see what was asked.
  private async call<T>(what: string, fn: (s: RtNetlinkSocket) => Promise<T>): Promise<T> {
    try {
      return await this.exclusive(fn);
    } catch (e) {
      const code = /Request rejected: (\w+)/.exec(e instanceof Error ? e.message : "")?.[1];
      throw new CapsuleError(ErrorCode.CommandFailed, `netlink ${what}: ${code ?? String(e)}`, {
        cause: e,
        details: { errno: code },
      });
    }
  }

  private async link(iface: string): Promise<{ index: number; up: boolean } | undefined> {
    try {
      const [l] = await this.exclusive((s) => s.getLink({}, { ifname: iface }, { timeout: this.timeout }));
      if (!l?.data.index) return undefined;
      return { index: l.data.index, up: !!l.data.flags?.up };
    } catch (e) {
      if (e instanceof Error && /ENODEV/.test(e.message)) return undefined;
      throw new CapsuleError(ErrorCode.CommandFailed, `netlink get link ${iface}: ${String(e)}`, {
        cause: e,
      });
    }
  }

  private async mustLink(iface: string): Promise<{ index: number; up: boolean }> {
    const l = await this.link(iface);
    if (!l) throw noSuchLink(iface);
    return l;
  }

  private async addrs(index: number): Promise<string[]> {
    const all = await this.call("get addresses", (s) =>
      s.getAddresses({ family: AF_INET }, {}, { timeout: this.timeout }),
    );
    const out: string[] = [];
    for (const a of all) {
      const ip = bufIp(a.attrs.local ?? a.attrs.address);
      if (a.data.index === index && a.data.family === AF_INET && ip) out.push(`${ip}/${a.data.prefixlen}`);
    }
    return sortAddrs(out);
  }

  async listAddresses(iface: string): Promise<string[]> {
    return this.addrs((await this.mustLink(iface)).index);
  }

  async ensureAddress(iface: string, cidr: string): Promise<boolean> {
    const c = parseCidr(cidr);
    const { index } = await this.mustLink(iface);
    if ((await this.addrs(index)).includes(formatCidr(c))) return false;
    await this.call(`add address ${formatCidr(c)} dev ${iface}`, (s) =>
      s.newAddress(
        { family: AF_INET, prefixlen: c.prefix, index },
        { local: ipBuf(c.ip), address: ipBuf(c.ip) },
        { flags: NLM_F_CREATE | NLM_F_EXCL, timeout: this.timeout },
      ),
    );
    return true;
  }

  async removeAddress(iface: string, cidr: string): Promise<boolean> {
    const c = parseCidr(cidr);
    const l = await this.link(iface);
    if (!l || !(await this.addrs(l.index)).includes(formatCidr(c))) return false;
    await this.call(`del address ${formatCidr(c)} dev ${iface}`, (s) =>
      s.delAddress(
        { family: AF_INET, prefixlen: c.prefix, index: l.index },
        { local: ipBuf(c.ip), address: ipBuf(c.ip) },
        { timeout: this.timeout },
      ),
    );
    return true;
  }

  private async routesTo(dst: Cidr): Promise<{ oif: number | undefined; src: string | undefined }[]> {
    const all = await this.call("get routes", (s) =>
      s.getRoutes({ family: AF_INET }, {}, { timeout: this.timeout }),
    );
    return all
      .filter(
        (r) =>
          r.data.family === AF_INET &&
          (r.attrs.table ?? r.data.table) === RT_TABLE_MAIN &&
          r.data.dstLen === dst.prefix &&
          (bufIp(r.attrs.dst) ?? "0.0.0.0") === dst.ip,
      )
      .map((r) => ({ oif: r.attrs.oif, src: bufIp(r.attrs.prefsrc) }));
  }

  async ensureRoute(dst: string, iface: string, opts: RouteOptions = {}): Promise<boolean> {
    const d = parseRouteDst(dst);
    const src = opts.src === undefined ? undefined : parseCidr(opts.src, "route source").ip;
    const { index } = await this.mustLink(iface);
    if ((await this.routesTo(d)).some((r) => r.oif === index && r.src === src)) return false;
    await this.call(`replace route ${formatCidr(d)} dev ${iface}`, (s) =>
      s.newRoute(
        {
          family: AF_INET,
          dstLen: d.prefix,
          table: RT_TABLE_MAIN,
          protocol: "BOOT",
          scope: "LINK",
          type: "UNICAST",
        },
        { dst: ipBuf(d.ip), oif: index, ...(src ? { prefsrc: ipBuf(src) } : {}) },
        { flags: NLM_F_CREATE | NLM_F_REPLACE, timeout: this.timeout },
      ),
    );
    return true;
  }

  async removeRoute(dst: string, iface: string): Promise<boolean> {
    const d = parseRouteDst(dst);
    const l = await this.link(iface);
    if (!l || !(await this.routesTo(d)).some((r) => r.oif === l.index)) return false;
    await this.call(`del route ${formatCidr(d)} dev ${iface}`, (s) =>
      s.delRoute(
        // Scope NOWHERE is the kernel's wildcard for deletes (what `ip route del` sends); the
        // default, UNIVERSE, would not match a link-scope route.
        { family: AF_INET, dstLen: d.prefix, table: RT_TABLE_MAIN, scope: "NOWHERE" },
        { dst: ipBuf(d.ip), oif: l.index },
        { timeout: this.timeout },
      ),
    );
    return true;
  }

  async setLinkUp(iface: string): Promise<boolean> {
    const l = await this.mustLink(iface);
    if (l.up) return false;
    await this.call(`set link ${iface} up`, (s) =>
      s.setLink({ index: l.index, change: { up: true }, flags: { up: true } }, {}, { timeout: this.timeout }),
    );
    return true;
  }

  async linkExists(iface: string): Promise<boolean> {
    return (await this.link(iface)) !== undefined;
  }

  async setSysctl(key: string, value: string): Promise<boolean> {
    const path = `${this.procSys}/${key.includes("/") ? key : key.replaceAll(".", "/")}`;
    try {
      if (normValue(await readFile(path, "utf8")) === normValue(value)) return false;
      await writeFile(path, `${value}\n`);
      return true;
    } catch (e) {
      throw new CapsuleError(ErrorCode.CommandFailed, `sysctl ${key}=${value}: ${String(e)}`, { cause: e });
    }
  }
}

// ---------------------------------------------------------------------------------------------
// IpNetlink: `ip -json` through a runner

interface IpAddrJson {
  addr_info?: { family?: string; local?: string; prefixlen?: number }[];
}
interface IpLinkJson {
  flags?: string[];
}
interface IpRouteJson {
  dst?: string;
  dev?: string;
  prefsrc?: string;
}

/**
 * IpNetlink is the {@link Netlink} for driving a namespace from outside: `ip -json` and
 * `sysctl` through a {@link CommandRunner} (wrap it in an NsRunner to target a namespace). Its
 * mutating commands are exactly {@link FakeNetlink}'s lines.
 */
export class IpNetlink implements Netlink {
  constructor(private readonly runner: CommandRunner) {}

  private async linkJson(iface: string): Promise<IpLinkJson | undefined> {
    const argv = ["ip", "-json", "link", "show", "dev", iface];
    const r = await this.runner.run(argv, { allowFailure: true });
    if (r.exitCode !== 0) {
      // iproute2 says 'Device "x" does not exist.'; anything else is a real failure.
      if (/does not exist|Cannot find device/i.test(r.stderr)) return undefined;
      throw new CommandError(argv, r.exitCode, r.stdout, r.stderr);
    }
    return (JSON.parse(r.stdout || "[]") as IpLinkJson[])[0];
  }

  private async mustLink(iface: string): Promise<IpLinkJson> {
    const l = await this.linkJson(iface);
    if (!l) throw noSuchLink(iface);
    return l;
  }

  async listAddresses(iface: string): Promise<string[]> {
    await this.mustLink(iface);
    const r = await this.runner.run(["ip", "-json", "-4", "addr", "show", "dev", iface]);
    const out: string[] = [];
    for (const l of JSON.parse(r.stdout || "[]") as IpAddrJson[])
      for (const a of l.addr_info ?? [])
        if (a.family === "inet" && a.local && a.prefixlen !== undefined)
          out.push(`${a.local}/${a.prefixlen}`);
    return sortAddrs(out);
  }

  async ensureAddress(iface: string, cidr: string): Promise<boolean> {
    const c = formatCidr(parseCidr(cidr));
    if ((await this.listAddresses(iface)).includes(c)) return false;
    await this.runner.run(addrAddArgv(iface, c));
    return true;
  }

  async removeAddress(iface: string, cidr: string): Promise<boolean> {
    const c = formatCidr(parseCidr(cidr));
    if (!(await this.linkExists(iface)) || !(await this.listAddresses(iface)).includes(c)) return false;
    await this.runner.run(addrDelArgv(iface, c));
    return true;
  }

  private async routesTo(dst: Cidr): Promise<IpRouteJson[]> {
    const r = await this.runner.run([
      "ip",
      "-json",
      "-4",
      "route",
      "show",
      "table",
      "main",
      "exact",
      formatCidr(dst),
    ]);
    return JSON.parse(r.stdout || "[]") as IpRouteJson[];
  }

  async ensureRoute(dst: string, iface: string, opts: RouteOptions = {}): Promise<boolean> {
    const d = parseRouteDst(dst);
    const src = opts.src === undefined ? undefined : parseCidr(opts.src, "route source").ip;
    await this.mustLink(iface);
    if ((await this.routesTo(d)).some((r) => r.dev === iface && r.prefsrc === src)) return false;
    await this.runner.run(routeReplaceArgv(formatCidr(d), iface, src));
    return true;
  }

  async removeRoute(dst: string, iface: string): Promise<boolean> {
    const d = parseRouteDst(dst);
    if (!(await this.linkExists(iface)) || !(await this.routesTo(d)).some((r) => r.dev === iface))
      return false;
    await this.runner.run(routeDelArgv(formatCidr(d), iface));
    return true;
  }

  async setLinkUp(iface: string): Promise<boolean> {
    if ((await this.mustLink(iface)).flags?.includes("UP")) return false;
    await this.runner.run(linkUpArgv(iface));
    return true;
  }

  async linkExists(iface: string): Promise<boolean> {
    return (await this.linkJson(iface)) !== undefined;
  }

  async setSysctl(key: string, value: string): Promise<boolean> {
    const r = await this.runner.run(["sysctl", "-n", key]);
    if (normValue(r.stdout) === normValue(value)) return false;
    await this.runner.run(sysctlArgv(key, value));
    return true;
  }
}

// ---------------------------------------------------------------------------------------------
// FakeNetlink

/** FakeNetlinkOptions: all optional. `links` names interfaces that exist (down) from the start. */
export interface FakeNetlinkOptions {
  links?: string[];
  sysctls?: Record<string, string>;
}

/**
 * FakeNetlink keeps the namespace's state in memory and records every change as its canonical
 * command line (`ip addr add 100.64.1.1/10 dev capsule0`, `ip route replace ...`,
 * `sysctl -w ...`). A no-op call records nothing, so a test can assert that a re-apply is
 * silent. Interfaces come from the options or {@link addLink}, as the real ones come from
 * WireGuard.
 */
export class FakeNetlink implements Netlink {
  /** lines are the changes so far, in order. */
  readonly lines: string[] = [];
  private readonly links = new Map<string, { up: boolean; addrs: string[] }>();
  private readonly routes = new Map<string, { iface: string; src: string | undefined }>();
  private readonly sysctls = new Map<string, string>();

  constructor(opts: FakeNetlinkOptions = {}) {
    for (const l of opts.links ?? []) this.addLink(l);
    for (const [k, v] of Object.entries(opts.sysctls ?? {})) this.sysctls.set(k, v);
  }

  /** addLink makes an interface exist (down, no addresses), as creating a WireGuard device would; not recorded. */
  addLink(iface: string): void {
    if (!this.links.has(iface)) this.links.set(iface, { up: false, addrs: [] });
  }

  /** deleteLink removes an interface and its addresses and routes, as the kernel does; not recorded. */
  deleteLink(iface: string): void {
    this.links.delete(iface);
    for (const [dst, r] of this.routes) if (r.iface === iface) this.routes.delete(dst);
  }

  /** sysctl returns a sysctl's current value (undefined when never set). */
  sysctl(key: string): string | undefined {
    return this.sysctls.get(key);
  }

  /** routeTable renders the main table as `DST dev IFACE [src SRC]`, sorted. */
  routeTable(): string[] {
    return [...this.routes]
      .map(([dst, r]) => `${dst} dev ${r.iface}${r.src ? ` src ${r.src}` : ""}`)
      .sort((a, b) => toInt(a.split("/")[0]!) - toInt(b.split("/")[0]!) || a.localeCompare(b));
  }

  private must(iface: string) {
    const l = this.links.get(iface);
    if (!l) throw noSuchLink(iface);
    return l;
  }

  private record(argv: string[]): true {
    this.lines.push(argv.join(" "));
    return true;
  }

  async listAddresses(iface: string): Promise<string[]> {
    return sortAddrs([...this.must(iface).addrs]);
  }

  async ensureAddress(iface: string, cidr: string): Promise<boolean> {
    const c = formatCidr(parseCidr(cidr));
    const l = this.must(iface);
    if (l.addrs.includes(c)) return false;
    l.addrs.push(c);
    return this.record(addrAddArgv(iface, c));
  }

  async removeAddress(iface: string, cidr: string): Promise<boolean> {
    const c = formatCidr(parseCidr(cidr));
    const l = this.links.get(iface);
    if (!l?.addrs.includes(c)) return false;
    l.addrs.splice(l.addrs.indexOf(c), 1);
    return this.record(addrDelArgv(iface, c));
  }

  async ensureRoute(dst: string, iface: string, opts: RouteOptions = {}): Promise<boolean> {
    const d = formatCidr(parseRouteDst(dst));
    const src = opts.src === undefined ? undefined : parseCidr(opts.src, "route source").ip;
    this.must(iface);
    const cur = this.routes.get(d);
    if (cur && cur.iface === iface && cur.src === src) return false;
    this.routes.set(d, { iface, src });
    return this.record(routeReplaceArgv(d, iface, src));
  }

  async removeRoute(dst: string, iface: string): Promise<boolean> {
    const d = formatCidr(parseRouteDst(dst));
    if (this.routes.get(d)?.iface !== iface) return false;
    this.routes.delete(d);
    return this.record(routeDelArgv(d, iface));
  }

  async setLinkUp(iface: string): Promise<boolean> {
    const l = this.must(iface);
    if (l.up) return false;
    l.up = true;
    return this.record(linkUpArgv(iface));
  }

  async linkExists(iface: string): Promise<boolean> {
    return this.links.has(iface);
  }

  async setSysctl(key: string, value: string): Promise<boolean> {
    if (normValue(this.sysctls.get(key) ?? "") === normValue(value) && this.sysctls.has(key)) return false;
    this.sysctls.set(key, value);
    return this.record(sysctlArgv(key, value));
  }
}
