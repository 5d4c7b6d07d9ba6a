import { RpcClient } from "../api/client.js";
import type { Signer } from "../api/token.js";
import type { PeerCaller } from "./fabric.js";
import type { PeerRow } from "./repo.js";

/**
 * RpcPeerCaller calls a peer's API at its fabric address, pinned to the certificate exchanged
 * at enrollment and signed with this capsule's own peer key (an operator token is never
 * forwarded). One client per peer, rebuilt when the peer's address or pin changes.
 */
export class RpcPeerCaller implements PeerCaller {
  private readonly clients = new Map<string, { key: string; client: RpcClient }>();

  constructor(private readonly signer: Signer) {}

  async call<Res>(peer: PeerRow, method: string, request: object, deadlineMs = 5000): Promise<Res> {
    const address = `${peer.capsuleAddress}:${peer.apiPort}`;
    const key = `${address}|${peer.apiFingerprint}`;
    let entry = this.clients.get(peer.capsuleId);
    if (!entry || entry.key !== key) {
      entry?.client.close();
      entry = {
        key,
        client: new RpcClient(
          {
            address,
            certPem: peer.apiCertPem,
            fingerprint: peer.apiFingerprint,
            capsuleId: peer.capsuleId,
            label: peer.name,
          },
          this.signer,
        ),
      };
      this.clients.set(peer.capsuleId, entry);
    }
    return entry.client.call<Res>(method, request, { deadlineMs });
  }

  /** close drops every client. */
  close(): void {
    for (const e of this.clients.values()) e.client.close();
    this.clients.clear();
  }
}
