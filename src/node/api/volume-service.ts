import type { CreateVolumeRequest__Output } from "../../gen/capsule/v1/CreateVolumeRequest.js";
import type { DeleteVolumeRequest__Output } from "../../gen/capsule/v1/DeleteVolumeRequest.js";
import type { Volume } from "../../gen/capsule/v1/Volume.js";
import type { VolumesHandlers } from "../../gen/capsule/v1/Volumes.js";
import { CapsuleError, ErrorCode, invalidArgument } from "../../errors.js";
import type { LoopVolumes, VolumeInfo } from "../workloads/volumes.js";
import { type RpcDeps, unary } from "./rpc.js";

/** VolumeServiceDeps: `volumes` is undefined when workloads are not running on this capsule. */
export interface VolumeServiceDeps extends RpcDeps {
  volumes: LoopVolumes | undefined;
}

const SVC = "/capsule.v1.Volumes";

function need(v: LoopVolumes | undefined): LoopVolumes {
  if (!v)
    throw new CapsuleError(ErrorCode.FailedPrecondition, "workloads are not running on this capsule", {
      hint: "see capsuled's log: workloads need root and the container runtime",
    });
  return v;
}

/** toVolume maps a {@link VolumeInfo} to the wire message; unset device/usedBy become "". */
export function toVolume(v: VolumeInfo): Volume {
  return {
    name: v.name,
    size: String(v.sizeBytes),
    backend: v.backend,
    device: v.device ?? "",
    usedBy: v.usedBy ?? "",
    createdAt: v.createdAt,
  };
}

/**
 * volumeService builds the handlers of capsule.v1.Volumes (thin: the logic is in
 * src/node/workloads/volumes.ts). Create is not idempotent (an existing name is
 * CAPSULE_ALREADY_EXISTS); Delete is (`deleted: false` for a missing volume).
 */
export function volumeService(d: VolumeServiceDeps): VolumesHandlers {
  return {
    Create: unary(d, `${SVC}/Create`, async (req: CreateVolumeRequest__Output) => {
      if (!req.name) throw invalidArgument("name", "missing");
      if (!req.size) throw invalidArgument("size", "missing", 'give a size, e.g. "1Gi"');
      return toVolume(await need(d.volumes).create(req.name, req.size));
    }),
    List: unary(d, `${SVC}/List`, () => ({ volumes: need(d.volumes).list().map(toVolume) })),
    Delete: unary(d, `${SVC}/Delete`, async (req: DeleteVolumeRequest__Output) => {
      if (!req.name) throw invalidArgument("name", "missing");
      return { deleted: await need(d.volumes).delete(req.name) };
    }),
  };
}
