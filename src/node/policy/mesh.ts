import { type Mesh, WORKLOAD_NAME } from "../../fabric/policy/model.js";

/** MeshInventory is the part of a fabric inventory the policy mesh is built from. */
export interface MeshInventory {
  name: string;
  capsuleAddress: string;
  entries: readonly { name: string; address: string; labels: Record<string, string> }[];
  /** edge: unset = not an edge. */
  edge?: boolean;
}

/**
 * meshOf builds the policy {@link Mesh} from this capsule's inventory and its peers' as last
 * received: every capsule with its address and edge flag, every workload with its address,
 * labels and capsule. Pure and deterministic (capsules by name, workloads by name then capsule),
 * so the compiled ruleset changes only when the mesh does.
 *
 * An address claimed twice (a pool conflict the fabric also reports) is kept for the first
 * claimant only, this capsule first, then peers by name, so one bad inventory cannot stop the
 * ruleset from compiling; entries that are not workload names are left out (they get no rule,
 * which is deny).
 */
export function meshOf(self: MeshInventory, peers: readonly MeshInventory[]): Mesh {
  const all = [self, ...peers.filter((p) => p.name !== self.name).sort((a, b) => cmp(a.name, b.name))];
  const taken = new Set<string>();
  const claim = (address: string) => {
    if (!address || taken.has(address)) return false;
    taken.add(address);
    return true;
  };
  const capsules = all
    .filter((i) => claim(i.capsuleAddress))
    .map((i) => ({ name: i.name, address: i.capsuleAddress, edge: i.edge === true }));
  const workloads = all.flatMap((i) =>
    i.entries
      .filter((e) => WORKLOAD_NAME.test(e.name) && claim(e.address))
      .map((e) => ({ name: e.name, address: e.address, labels: { ...e.labels }, capsule: i.name })),
  );
  return {
    self: self.name,
    capsules: capsules.sort((a, b) => cmp(a.name, b.name)),
    workloads: workloads.sort((a, b) => cmp(a.name, b.name) || cmp(a.capsule, b.capsule)),
  };
}

function cmp(a: string, b: string): number {
  return a < b ? -1 : a > b ? 1 : 0;
}
