import type { FabricHandlers } from "../../gen/capsule/v1/Fabric.js";
import { CapsuleError, ErrorCode, invalidArgument } from "../../errors.js";
import type { Fabric, Inventory, SelfInfo } from "../../fabric/fabric.js";
import type { FabricRepo } from "../../fabric/repo.js";
import type { RpcContext, RpcDeps } from "./rpc.js";
import { unary } from "./rpc.js";

/** FabricServiceDeps: `fabric` is undefined when the fabric is disabled (--no-fabric). */
export interface FabricServiceDeps extends RpcDeps {
  fabric: Fabric | undefined;
  repo: FabricRepo;
}

const SVC = "/capsule.v1.Fabric";

function need(f: Fabric | undefined): Fabric {
  if (!f?.isStarted()) {
    throw new CapsuleError(ErrorCode.FailedPrecondition, "the fabric is not running on this capsule", {
      hint: "see capsuled's log: it needs wireguard-go or the WireGuard kernel module, and root (or CAP_NET_ADMIN)",
    });
  }
  return f;
}

/** callerPeer is the enrolled peer making this call; anyone else is refused. */
export function callerPeer(d: { repo: FabricRepo }, ctx: RpcContext) {
  const p = ctx.principal?.kind === "peer" ? d.repo.getPeer(ctx.principal.id) : undefined;
  if (!p) throw new CapsuleError(ErrorCode.PermissionDenied, "only an enrolled peer capsule may call this");
  return p;
}

function toInventory(i: Partial<Inventory> | null | undefined): Inventory {
  if (!i) throw invalidArgument("inventory", "missing");
  return {
    capsuleId: i.capsuleId ?? "",
    name: i.name ?? "",
    capsuleAddress: i.capsuleAddress ?? "",
    generation: i.generation ?? "0",
    entries: (i.entries ?? []).map((e) => ({ name: e.name, address: e.address, labels: { ...e.labels } })),
    edge: i.edge === true,
  };
}

/** fabricService builds the handlers of capsule.v1.Fabric (thin: the logic is in src/fabric). */
export function fabricService(d: FabricServiceDeps): FabricHandlers {
  return {
    Self: unary(d, `${SVC}/Self`, () => need(d.fabric).selfInfo()),
    Enroll: unary(d, `${SVC}/Enroll`, async (req: { peer: SelfInfo | null }) => {
      if (!req.peer) throw invalidArgument("peer", "missing");
      const peer = { ...req.peer, inventory: req.peer.inventory ? toInventory(req.peer.inventory) : null };
      return need(d.fabric).enroll(peer);
    }),
    Unenroll: unary(d, `${SVC}/Unenroll`, async (req: { capsuleId: string }) => ({
      removed: await need(d.fabric).unenroll(req.capsuleId),
    })),
    Status: unary(d, `${SVC}/Status`, async () => {
      const f = need(d.fabric);
      const s = await f.status();
      return {
        interface: "",
        publicKey: s.publicKey,
        listenPort: s.listenPort,
        capsuleAddress: f.address,
        wireguardMode: f.wireguardMode,
        peers: s.peers,
        warnings: s.warnings,
      };
    }),
    RotateKey: unary(d, `${SVC}/RotateKey`, () => need(d.fabric).rotateKey()),
    Repool: unary(d, `${SVC}/Repool`, (req: { avoid: number[] }) => need(d.fabric).repool(req.avoid ?? [])),
    ReserveAddress: unary(
      d,
      `${SVC}/ReserveAddress`,
      (req: { name: string; labels: Record<string, string>; address: string }) =>
        need(d.fabric).reserve(req.name, { ...req.labels }, req.address || undefined),
    ),
    ReleaseAddress: unary(d, `${SVC}/ReleaseAddress`, async (req: { name: string }) => ({
      released: await need(d.fabric).release(req.name),
    })),
    Inventory: unary(
      d,
      `${SVC}/Inventory`,
      () => {
        const f = need(d.fabric);
        return { self: f.inventory(), peers: f.peerInventories() };
      },
      { peer: true },
    ),
    PushInventory: unary(
      d,
      `${SVC}/PushInventory`,
      async (req: Inventory, ctx) => ({
        applied: await need(d.fabric).receiveInventory(callerPeer(d, ctx), toInventory(req)),
      }),
      { peer: true },
    ),
    PeerKeyChanged: unary(
      d,
      `${SVC}/PeerKeyChanged`,
      async (req: { wgPublicKey: string }, ctx) => {
        await need(d.fabric).peerKeyChanged(callerPeer(d, ctx), req.wgPublicKey);
        return {};
      },
      { peer: true },
    ),
  };
}
