/**
 * TapNet: a microVM workload's one link to the capsule, a TAP device.
 *
 * The capsule side is the container layout of netns.ts with a TAP where the veth's host end
 * was: the same name (`cw` + 11 hex digits of sha256(workload)), MAC ee:ee:ee:ee:ee:ee, no IPv4
 * address, rp_filter=1, and a /32 route to the workload's fabric address through it. So the
 * policy compiler, NAT, edge and fabric see a VM exactly as they see a container: an interface
 * named `cw*` behind which one fabric address lives. The guest configures its side from the
 * kernel command line (qemu-plan.ts: `capsule.ip`, `capsule.gw=169.254.1.1`, `capsule.gwmac`).
 *
 * The TAP is persistent (`ip tuntap add`): it outlives QEMU and capsuled, so the route and the
 * policy stay in place while a VM restarts, and a restarted capsuled finds everything as it
 * left it. QEMU opens it by name (`-netdev tap,ifname=`) before dropping privileges.
 *
 * A workload that changes kind (container ⇄ microVM) under one name finds the other kind's
 * link under its interface name: {@link TapNet.ensure} deletes a veth there, and WorkloadNet
 * rebuilds over a TAP (half a pair), so either way the link is remade.
 */
import { CommandError, invalidArgument } from "../../errors.js";
import type { Netlink } from "../host/netlink.js";
import { parseCidr } from "../host/netlink.js";
import type { CommandRunner } from "../host/runner.js";
import { HOST_MAC, workloadNetNames } from "./netns.js";

/** TapNetSpec: `workload` and `address` required; `hostSrc` as in WorkloadNetSpec. */
export interface TapNetSpec {
  workload: string;
  /** address is the workload's fabric address ("100.64.7.2" or "100.64.7.2/32"). */
  address: string;
  /** hostSrc is the capsule's source address towards the workload (its fabric address); unset = the kernel's choice. */
  hostSrc?: string;
}

/** TapNetResult is the TAP after {@link TapNet.ensure}: its name and whether anything changed. */
export interface TapNetResult {
  tap: string;
  changed: boolean;
}

interface LinkJson {
  ifname?: string;
  address?: string;
  linkinfo?: { info_kind?: string };
}

/** linkKind reads the kind ("tun", "veth", ...) of the one link in `ip -json -d link show` output; "" when none (pure). */
export function linkKind(json: string): { kind: string; mac: string } | undefined {
  const links = json.trim() ? (JSON.parse(json) as LinkJson[]) : [];
  const l = links[0];
  if (!l) return undefined;
  return { kind: l.linkinfo?.info_kind ?? "", mac: (l.address ?? "").toLowerCase() };
}

/** tapAddArgv creates the persistent TAP (pure). */
export function tapAddArgv(tap: string): string[] {
  return ["ip", "tuntap", "add", "dev", tap, "mode", "tap"];
}

/** TapNet makes, checks and removes microVM workloads' TAP links (see the module comment). */
export class TapNet {
  constructor(private readonly o: { runner: CommandRunner; netlink: Netlink }) {}

  private async link(tap: string): Promise<{ kind: string; mac: string } | undefined> {
    const argv = ["ip", "-json", "-d", "link", "show", "dev", tap];
    const r = await this.o.runner.run(argv, { allowFailure: true });
    if (r.exitCode === 0) return linkKind(r.stdout);
    if (/does not exist|Cannot find device/i.test(r.stderr)) return undefined;
    throw new CommandError(argv, r.exitCode, r.stdout, r.stderr);
  }

  /**
   * ensure makes `spec.workload`'s TAP, MAC, rp_filter, link state and route as the module
   * comment draws them. Idempotent: `changed` is false when all was there. Throws
   * CAPSULE_INVALID_ARGUMENT for a bad name or address.
   */
  async ensure(spec: TapNetSpec): Promise<TapNetResult> {
    const { hostIface: tap, netns } = workloadNetNames(spec.workload);
    const addr = parseCidr(spec.address, "address");
    if (addr.prefix !== 32) throw invalidArgument("address", `"${spec.address}" is not a single address`);
    let changed = false;
    let link = await this.link(tap);
    if (link && link.kind !== "tun") {
      // The workload was a container: its veth (and namespace) go.
      await this.o.runner.run(["ip", "link", "del", "dev", tap]);
      await this.o.runner.run(["ip", "netns", "del", netns], { allowFailure: true });
      link = undefined;
    }
    if (!link) {
      await this.o.runner.run(tapAddArgv(tap));
      changed = true;
    }
    if (link?.mac !== HOST_MAC) {
      await this.o.runner.run(["ip", "link", "set", "dev", tap, "address", HOST_MAC]);
      changed = true;
    }
    changed = (await this.o.netlink.setSysctl(`net.ipv4.conf.${tap}.rp_filter`, "1")) || changed;
    changed = (await this.o.netlink.setLinkUp(tap)) || changed;
    const src = spec.hostSrc === undefined ? {} : { src: spec.hostSrc };
    changed = (await this.o.netlink.ensureRoute(`${addr.ip}/32`, tap, src)) || changed;
    return { tap, changed };
  }

  /** teardown removes `workload`'s TAP (its route goes with it). Idempotent: false when there was none or it is not a TAP. */
  async teardown(workload: string): Promise<boolean> {
    const { hostIface: tap } = workloadNetNames(workload);
    const link = await this.link(tap);
    if (link?.kind !== "tun") return false;
    await this.o.runner.run(["ip", "link", "del", "dev", tap]);
    return true;
  }
}
