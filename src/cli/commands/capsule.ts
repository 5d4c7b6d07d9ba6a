/** `capsulectl capsule info`: the Info RPC on every selected capsule. */
import type { InfoResponse__Output } from "../../api/proto.js";
import { humanDuration } from "../duration.js";
import type { View } from "../output.js";
import type { Session } from "../session.js";

/** INFO_VIEW is how an InfoResponse shows as a table row (one row per capsule). */
export const INFO_VIEW: View<InfoResponse__Output, InfoResponse__Output> = {
  rows: (v) => [v],
  columns: [
    { header: "NAME", get: (r) => r.name },
    { header: "ID", get: (r) => r.id },
    { header: "VERSION", get: (r) => r.version },
    { header: "FABRIC-ADDRESS", get: (r) => r.fabricAddress },
    { header: "UPTIME", get: (r) => humanDuration(Number(r.uptimeSeconds)) },
    { header: "KERNEL", get: (r) => r.kernel },
    { header: "WIREGUARD", get: (r) => r.wireguardMode },
    { header: "EDGE", get: (r) => r.edgeAddress || "-", wide: true },
    { header: "VM-ACCEL", get: (r) => r.vmAccel || "-", wide: true },
    { header: "FINGERPRINT", get: (r) => r.fingerprint, wide: true },
    { header: "CLAIM", get: (r) => (r.claimOpen ? `open until ${r.claimClosesAt}` : "closed"), wide: true },
    { header: "OPERATORS", get: (r) => r.operatorCount, wide: true },
  ],
};

/** capsuleInfo describes every selected capsule. Read-only. */
export async function capsuleInfo(s: Session): Promise<void> {
  await s.rpcAndShow<InfoResponse__Output, InfoResponse__Output>("Info", () => ({}), INFO_VIEW);
}
