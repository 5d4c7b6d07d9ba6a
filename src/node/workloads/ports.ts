/**
 * Seams between the workload manager/reconciler and the host-side
 * implementations of volumes (`volumes.ts`, `LoopVolumes`) and host-port NAT
 * (`nat.ts`, `NftPortForwarder`). The composition root (`src/node/root.ts`)
 * builds the real ones; unit tests pass fakes.
 */

/**
 * VolumeAttacher mounts named volumes for workloads. A volume is held by at
 * most one workload at a time.
 */
export interface VolumeAttacher {
  /** attach mounts volume `name` for workload `workload` and returns the host directory to bind-mount; refuses (CAPSULE_FAILED_PRECONDITION) when another workload holds it, CAPSULE_NOT_FOUND when missing. Idempotent for the same workload. */
  attach(name: string, workload: string): Promise<string>;
  /** attachDevice claims volume `name` for microVM workload `workload` and returns its block device or image file, not mounted on the capsule (the guest mounts it). Errors as attach. Idempotent. */
  attachDevice(name: string, workload: string): Promise<string>;
  /** detach flushes and unmounts; idempotent. */
  detach(name: string, workload: string): Promise<void>;
  /** check is the apply-time validation: throws the same errors as attach would, changes nothing. */
  check(name: string, workload: string): void;
}

/** HostPortForward is one DNAT rule: capsule `hostPort`/`protocol` → workload `address`:`port`. */
export interface HostPortForward {
  protocol: "tcp" | "udp";
  hostPort: number;
  address: string;
  port: number;
  workload: string;
}

/** PortForwarder owns the capsule's NAT table (egress masquerade + host-port DNAT). */
export interface PortForwarder {
  /** set makes the capsule's NAT table exactly: masquerade of workload egress to non-fabric destinations + DNAT of `forwards`. One `nft -f` transaction; idempotent. */
  set(workloadAddresses: string[], forwards: HostPortForward[]): Promise<void>;
  /** portInUse reports whether a host port is already bound by something else on the capsule (ss). */
  portInUse(protocol: "tcp" | "udp", port: number): Promise<boolean>;
}
