import type { Dataplane, HostNet, PeerCaller } from "./fabric.js";
import type { PeerRow } from "./repo.js";
import { type WgDump, type WgInterfaceConfig, renderWgConfig } from "./wgconf.js";
import { wgPublicKey } from "./keys.js";

/** FakeDataplane records every synced configuration as the rendered wg file (for golden diffs). */
export class FakeDataplane implements Dataplane {
  readonly syncs: string[] = [];
  last: WgInterfaceConfig | undefined;
  mode: "kernel" | "userspace" = "userspace";
  ensured = 0;

  async ensureInterface(): Promise<{ mode: "kernel" | "userspace"; adopted: boolean }> {
    this.ensured++;
    return { mode: this.mode, adopted: this.ensured > 1 };
  }
  async sync(c: WgInterfaceConfig): Promise<void> {
    this.last = c;
    this.syncs.push(renderWgConfig(c));
  }
  async dump(): Promise<WgDump> {
    return {
      publicKey: this.last ? wgPublicKey(this.last.privateKey) : "",
      listenPort: this.last?.listenPort ?? 0,
      peers: (this.last?.peers ?? []).map((p) => ({
        publicKey: p.publicKey,
        endpoint: p.endpoint,
        allowedIps: p.allowedIps,
        latestHandshake: 0,
        rxBytes: 0,
        txBytes: 0,
        persistentKeepalive: p.persistentKeepalive,
      })),
    };
  }
}

/** FakeHostNet records canonical `ip`/`sysctl` lines. */
export class FakeHostNet implements HostNet {
  readonly lines: string[] = [];
  readonly addresses = new Map<string, Set<string>>();
  async ensureAddress(iface: string, cidr: string): Promise<void> {
    const set = this.addresses.get(iface) ?? new Set();
    this.addresses.set(iface, set);
    if (set.has(cidr)) return;
    set.add(cidr);
    this.lines.push(`ip addr add ${cidr} dev ${iface}`);
  }
  async removeAddress(iface: string, cidr: string): Promise<void> {
    if (!this.addresses.get(iface)?.delete(cidr)) return;
    this.lines.push(`ip addr del ${cidr} dev ${iface}`);
  }
  async listAddresses(iface: string): Promise<string[]> {
    return [...(this.addresses.get(iface) ?? [])].sort();
  }
  async setLinkUp(iface: string): Promise<void> {
    this.lines.push(`ip link set ${iface} up`);
  }
  async setSysctl(key: string, value: string): Promise<void> {
    this.lines.push(`sysctl ${key}=${value}`);
  }
}

/** FakeCaller records peer calls and answers through a handler (default: success, empty). */
export class FakeCaller implements PeerCaller {
  readonly calls: { peer: string; method: string; request: object }[] = [];
  handler: (peer: PeerRow, method: string, request: object) => unknown = () => ({});
  async call<Res>(peer: PeerRow, method: string, request: object): Promise<Res> {
    this.calls.push({ peer: peer.name, method, request });
    return (await this.handler(peer, method, request)) as Res;
  }
}
