/**
 * `capsulectl fabric enroll A B | unenroll A B | status | peers | rotate-key | repool | inventory`:
 * the WireGuard mesh between capsules. Enrollment is pairwise and driven from here: the CLI
 * fetches each side's Self and hands it to the other, after checking locally what the capsules
 * would refuse, so a refused enroll changes nothing. The read commands fan out like every read.
 */
import type { EnrollResponse__Output } from "../../gen/capsule/v1/EnrollResponse.js";
import type { FabricSelf__Output } from "../../gen/capsule/v1/FabricSelf.js";
import type { InventoryResponse__Output } from "../../gen/capsule/v1/InventoryResponse.js";
import type { PeerStatus__Output } from "../../gen/capsule/v1/PeerStatus.js";
import type { RotateKeyResponse__Output } from "../../gen/capsule/v1/RotateKeyResponse.js";
import type { StatusResponse__Output } from "../../gen/capsule/v1/StatusResponse.js";
import type { UnenrollResponse__Output } from "../../gen/capsule/v1/UnenrollResponse.js";
import { CapsuleError, ErrorCode, invalidArgument, toCapsuleError } from "../../errors.js";
import { humanDuration } from "../duration.js";
import type { FanOutResult } from "../fanout.js";
import { humanBytes, type View } from "../output.js";
import type { Session } from "../session.js";
import type { Target } from "../targets.js";

/** REPOOL_SELF_DEADLINE_MS bounds each other capsule's Self during repool: best effort, never a long wait. */
export const REPOOL_SELF_DEADLINE_MS = 3000;

/** FABRIC_BASE is 100.64.0.0 as an integer; pools are its /24s (the CLI may not import src/fabric). */
const FABRIC_BASE = (100 << 24) | (64 << 16);

/** poolCidr is the /24 of pool `index` of 100.64.0.0/10: 100.64.0.0 + index*256. Pure. */
export function poolCidr(index: number): string {
  const n = (FABRIC_BASE + index * 256) >>> 0;
  return `${[n >>> 24, (n >>> 16) & 255, (n >>> 8) & 255, n & 255].join(".")}/24`;
}

/** shortKey shows a WireGuard public key as its first 8 characters and an ellipsis. Pure. */
export function shortKey(key: string): string {
  return key ? `${key.slice(0, 8)}…` : "";
}

/** handshakeAge renders a handshake age in seconds as "12s ago"; a negative age is "never". Pure. */
export function handshakeAge(seconds: number): string {
  return seconds < 0 ? "never" : `${humanDuration(seconds)} ago`;
}

function labelsText(labels: Record<string, string>): string {
  return Object.keys(labels)
    .sort()
    .map((k) => `${k}=${labels[k]}`)
    .join(",");
}

/** PoolClaim is one capsule's pool as one side of an enrollment knows it. */
export interface PoolClaim {
  capsuleId: string;
  /** name labels the capsule in errors: the context name for the two sides, else the capsule's own name. */
  name: string;
  pool: number;
}

/** poolClaims lists the pools a side knows of: its own (as `name`) and its peers', leaving out `otherId`. Pure. */
export function poolClaims(self: FabricSelf__Output, name: string, otherId: string): PoolClaim[] {
  return [
    { capsuleId: self.capsuleId, name, pool: self.pool },
    ...self.peers
      .filter((p) => p.capsuleId !== otherId)
      .map((p) => ({ capsuleId: p.capsuleId, name: p.name, pool: p.pool })),
  ];
}

/** findPoolConflict returns the first pool claimed by different capsules on the two sides, or undefined. Pure. */
export function findPoolConflict(
  a: readonly PoolClaim[],
  b: readonly PoolClaim[],
): [PoolClaim, PoolClaim] | undefined {
  for (const x of a) {
    const y = b.find((c) => c.pool === x.pool && c.capsuleId !== x.capsuleId);
    if (y) return [x, y];
  }
  return undefined;
}

/** EnrollSide is one side of an enrollment: its target and its Self. */
export interface EnrollSide {
  target: Target;
  self: FabricSelf__Output;
}

/**
 * checkEnroll refuses, before anything changes, what the capsules would refuse halfway: the
 * same capsule twice, and an address pool claimed on both sides by different capsules (the
 * error names the /24 and both capsules and says which capsule to repool). Pure.
 */
export function checkEnroll(a: EnrollSide, b: EnrollSide): void {
  if (a.self.capsuleId === b.self.capsuleId) {
    throw sameCapsule(a.target.name, b.target.name);
  }
  const conflict = findPoolConflict(
    poolClaims(a.self, a.target.name, b.self.capsuleId),
    poolClaims(b.self, b.target.name, a.self.capsuleId),
  );
  if (!conflict) return;
  const [x, y] = conflict;
  // Move the side of the enrollment that is itself in the clash (B when both are): only a
  // capsule with no peers and no workloads can repool, and that is usually the newer one.
  const move = y.capsuleId === b.self.capsuleId || x.capsuleId !== a.self.capsuleId ? b.target : a.target;
  throw new CapsuleError(
    ErrorCode.FailedPrecondition,
    `address pool ${poolCidr(x.pool)} is claimed by both ${x.name} and ${y.name}; nothing changed`,
    {
      hint: `move the newer, empty capsule to a free pool: capsulectl --capsule ${move.name} fabric repool, then enroll again`,
      details: { pool: poolCidr(x.pool), capsules: [x.name, y.name] },
    },
  );
}

function sameCapsule(a: string, b: string): CapsuleError {
  return invalidArgument(
    "fabric",
    `${a} and ${b} are the same capsule`,
    "name two different capsules: capsulectl fabric enroll A B",
  );
}

/** pair resolves the two capsules of `fabric enroll|unenroll A B`, refusing the same one twice. */
async function pair(s: Session, aName: string, bName: string): Promise<[Target, Target]> {
  const a = await s.target(aName);
  const b = await s.target(bName);
  if (a.name === b.name || a.context.capsuleId === b.context.capsuleId) throw sameCapsule(a.name, b.name);
  return [a, b];
}

function via(relayVia: string): string {
  return relayVia ? `relayed via ${relayVia}` : "direct";
}

/**
 * fabricEnroll enrolls A and B with each other: Self on both (in parallel), the local checks
 * (see {@link checkEnroll}), then Enroll on A with B's Self and on B with A's. If B fails and
 * A had not had B as a peer before, A is rolled back (Unenroll), so a failed enroll leaves the
 * old state. Idempotent: enrolling again reports "already enrolled" and changes nothing.
 */
export async function fabricEnroll(s: Session, aName: string, bName: string): Promise<void> {
  const [a, b] = await pair(s, aName, bName);
  const selves = await s.rpcTo<FabricSelf__Output>([a, b], "Fabric/Self", () => ({}));
  const failed = selves.find((r) => !r.ok);
  if (failed && !failed.ok) throw failed.error;
  const [selfA, selfB] = selves.map((r) => (r.ok ? r.value : undefined)) as [
    FabricSelf__Output,
    FabricSelf__Output,
  ];
  checkEnroll({ target: a, self: selfA }, { target: b, self: selfB });

  const aKnewB = selfA.peers.some((p) => p.capsuleId === selfB.capsuleId);
  const resA = await s.callOne<EnrollResponse__Output>(a, "Fabric/Enroll", { peer: selfB });
  let resB: EnrollResponse__Output;
  try {
    resB = await s.callOne<EnrollResponse__Output>(b, "Fabric/Enroll", { peer: selfA });
  } catch (e) {
    throw await rollBack(s, a, b, selfB.capsuleId, aKnewB, e);
  }

  const sides = [
    { capsule: a.name, peer: b.name, ...resA },
    { capsule: b.name, peer: a.name, ...resB },
  ];
  s.print(sides, () =>
    sides
      .map((x) =>
        x.changed
          ? `${x.capsule}: enrolled ${x.peer} (${via(x.relayVia)})\n`
          : `${x.capsule}: ${x.peer} already enrolled (${via(x.relayVia)})\n`,
      )
      .join(""),
  );
}

/**
 * rollBack undoes A's half of an enrollment B failed, unless A had B as a peer before, and
 * returns the error to report: B's, saying what became of A.
 */
async function rollBack(
  s: Session,
  a: Target,
  b: Target,
  bId: string,
  aKnewB: boolean,
  cause: unknown,
): Promise<CapsuleError> {
  const err = toCapsuleError(cause);
  const what = `enroll on ${b.name} failed: ${err.message}`;
  if (aKnewB) {
    // Unenrolling would cut a tunnel that worked before this command: keep A's (refreshed) record.
    return new CapsuleError(err.code, `${what}; ${a.name} already had ${b.name} as a peer and keeps it`, {
      hint: err.hint ?? `fix ${b.name}, then run capsulectl fabric enroll ${a.name} ${b.name} again`,
      cause: err,
    });
  }
  try {
    await s.callOne(a, "Fabric/Unenroll", { capsuleId: bId });
  } catch (e) {
    return new CapsuleError(
      err.code,
      `${what}; undoing ${a.name}'s half failed too: ${toCapsuleError(e).message}`,
      {
        hint: `clean up with capsulectl fabric unenroll ${a.name} ${b.name} once both answer`,
        cause: err,
      },
    );
  }
  // A timeout leaves open whether B acted on the call before the answer was lost.
  if (err.code === ErrorCode.Timeout) {
    return new CapsuleError(err.code, `${what}; ${a.name} rolled back`, {
      hint: `${b.name} may have enrolled ${a.name} before the deadline: once it answers, run capsulectl fabric enroll ${a.name} ${b.name} again, or capsulectl fabric unenroll ${a.name} ${b.name}`,
      cause: err,
    });
  }
  return new CapsuleError(err.code, `${what}; ${a.name} rolled back, nothing changed`, {
    hint: err.hint ?? `fix ${b.name}, then run capsulectl fabric enroll ${a.name} ${b.name} again`,
    cause: err,
  });
}

/** UnenrollRow is one side of `fabric unenroll`: which peer it dropped and whether it had it. */
export interface UnenrollRow {
  peer: string;
  removed: boolean;
}

/** UNENROLL_VIEW shows one row per side. */
export const UNENROLL_VIEW: View<UnenrollRow, UnenrollRow> = {
  rows: (v) => [v],
  columns: [
    { header: "PEER", get: (r) => r.peer },
    { header: "RESULT", get: (r) => (r.removed ? "removed" : "not enrolled") },
  ],
};

/**
 * fabricUnenroll removes A and B from each other, both sides in parallel, each by the other's
 * capsule id from its context. Idempotent ("not enrolled"); a side that fails is reported
 * without hiding the other, and makes the exit code 1.
 */
export async function fabricUnenroll(s: Session, aName: string, bName: string): Promise<void> {
  const [a, b] = await pair(s, aName, bName);
  const other = (t: Target) => (t.name === a.name ? b : a);
  const results = await s.rpcTo<UnenrollResponse__Output>([a, b], "Fabric/Unenroll", (t) => ({
    capsuleId: other(t).context.capsuleId,
  }));
  const rows: FanOutResult<Target, UnenrollRow>[] = results.map((r) =>
    r.ok ? { ...r, value: { peer: other(r.target).name, removed: r.value.removed } } : r,
  );
  s.show(rows, UNENROLL_VIEW, true);
}

/** STATUS_VIEW is `fabric status`: one wg-style row per peer. */
export const STATUS_VIEW: View<StatusResponse__Output, PeerStatus__Output> = {
  rows: (v) => v.peers,
  columns: [
    { header: "PEER", get: (p) => p.name },
    { header: "ENDPOINT", get: (p) => p.endpoint },
    { header: "HANDSHAKE", get: (p) => handshakeAge(p.handshakeAgeSeconds) },
    { header: "RX", get: (p) => humanBytes(p.rxBytes) },
    { header: "TX", get: (p) => humanBytes(p.txBytes) },
    { header: "VIA", get: (p) => p.relayVia || "direct" },
    { header: "UP", get: (p) => (p.up ? "yes" : "no") },
    { header: "PUBLIC-KEY", get: (p) => shortKey(p.publicKey), wide: true },
    { header: "ADDRESS", get: (p) => p.capsuleAddress, wide: true },
    { header: "ALLOWED-IPS", get: (p) => p.allowedIps.join(","), wide: true },
  ],
};

/** PEERS_VIEW is `fabric peers`: who is enrolled and how it is reached. */
export const PEERS_VIEW: View<StatusResponse__Output, PeerStatus__Output> = {
  rows: (v) => v.peers,
  columns: [
    { header: "NAME", get: (p) => p.name },
    { header: "ADDRESS", get: (p) => p.capsuleAddress },
    { header: "ENDPOINT", get: (p) => p.endpoint },
    { header: "VIA", get: (p) => p.relayVia || "direct" },
    { header: "PUBLIC-KEY", get: (p) => shortKey(p.publicKey) },
    { header: "ALLOWED-IPS", get: (p) => p.allowedIps.join(","), wide: true },
    { header: "CAPSULE-ID", get: (p) => p.capsuleId, wide: true },
  ],
};

/** fabricStatus shows every selected capsule's peers with WireGuard counters; warnings go to stderr. Read-only. */
export async function fabricStatus(s: Session): Promise<void> {
  const { results, multi } = await s.rpc<StatusResponse__Output>("Fabric/Status", () => ({}));
  s.show(results, STATUS_VIEW, multi);
  for (const r of results) {
    if (!r.ok) continue;
    for (const w of r.value.warnings) s.err(multi ? `warning: ${r.target.name}: ${w}\n` : `warning: ${w}\n`);
  }
}

/** fabricPeers lists every selected capsule's enrolled peers. Read-only. */
export async function fabricPeers(s: Session): Promise<void> {
  await s.rpcAndShow<StatusResponse__Output, PeerStatus__Output>("Fabric/Status", () => ({}), PEERS_VIEW);
}

/** peerName is the peer of a RotateKey `failed` entry ("NAME: why"). */
function peerName(failed: string): string {
  return failed.split(": ")[0] ?? failed;
}

/** ROTATE_VIEW is `fabric rotate-key`: the new key and who was told. */
export const ROTATE_VIEW: View<RotateKeyResponse__Output, RotateKeyResponse__Output> = {
  rows: (v) => [v],
  columns: [
    { header: "PUBLIC-KEY", get: (r) => r.publicKey },
    { header: "NOTIFIED", get: (r) => r.notified.join(",") },
    { header: "FAILED", get: (r) => r.failed.map(peerName).join(",") },
  ],
};

/**
 * fabricRotateKey gives every selected capsule a new WireGuard key, which each distributes to
 * its peers. A peer that could not be told keeps the old key and loses the tunnel until it is
 * enrolled again: each is reported (exit 1) with the enroll command that repairs it.
 */
export async function fabricRotateKey(s: Session): Promise<void> {
  const { results, multi } = await s.rpc<RotateKeyResponse__Output>("Fabric/RotateKey", () => ({}));
  s.show(results, ROTATE_VIEW, multi);
  for (const r of results) {
    if (!r.ok || r.value.failed.length === 0) continue;
    s.exitCode = 1;
    for (const f of r.value.failed) s.err(`error: ${r.target.name}: could not tell ${f}\n`);
    for (const f of r.value.failed)
      s.err(
        `hint: capsulectl fabric enroll ${r.target.name} ${peerName(f)} (hands ${peerName(f)} the new key)\n`,
      );
  }
}

/** RepoolResult is what `fabric repool` reports. */
export interface RepoolResult {
  capsule: string;
  from: string;
  to: string;
  pool: string;
  /** avoided are the pool indices other capsules were found to use. */
  avoided: number[];
  /** skipped are the contexts that did not answer; their pools could not be avoided. */
  skipped: string[];
}

/**
 * fabricRepool moves the one targeted capsule to a free address pool. It asks every other
 * context for its Self (best effort, a short deadline each) to learn the pools in use: theirs
 * and their peers'. A context that does not answer is skipped with a note. The capsule itself
 * refuses unless it has no peers and no workloads.
 */
export async function fabricRepool(s: Session): Promise<void> {
  const targets = await s.targets();
  const [target] = targets;
  if (!target || targets.length !== 1) {
    throw invalidArgument(
      "--capsule",
      "repool moves one capsule at a time",
      "name it: capsulectl --capsule NAME fabric repool",
    );
  }
  const cfg = await s.loadConfig();
  const others: Target[] = cfg.contexts
    .filter((c) => c.name !== target.name && c.capsuleId !== target.context.capsuleId)
    .map((c) => ({ name: c.name, context: c }));
  const [before, seen] = await Promise.all([
    s.callOne<FabricSelf__Output>(target, "Fabric/Self", {}),
    s.rpcTo<FabricSelf__Output>(others, "Fabric/Self", () => ({}), {
      deadlineMs: Math.min(s.globals.timeoutMs, REPOOL_SELF_DEADLINE_MS),
    }),
  ]);
  const avoid = new Set<number>();
  const skipped: string[] = [];
  for (const r of seen) {
    if (!r.ok) {
      skipped.push(r.target.name);
      s.err(`note: skipped ${r.target.name} (${r.error.message}); the pools it uses are not avoided\n`);
      continue;
    }
    avoid.add(r.value.pool);
    for (const p of r.value.peers) if (p.capsuleId !== before.capsuleId) avoid.add(p.pool);
  }
  const avoided = [...avoid].sort((x, y) => x - y);
  const after = await s.callOne<FabricSelf__Output>(target, "Fabric/Repool", { avoid: avoided });
  const result: RepoolResult = {
    capsule: target.name,
    from: before.capsuleAddress,
    to: after.capsuleAddress,
    pool: poolCidr(after.pool),
    avoided,
    skipped,
  };
  s.print(result, () => `${result.capsule}: ${result.from} -> ${result.to} (pool ${result.pool})\n`);
}

/** InventoryRow is one addressable thing in an inventory, with the capsule that holds it. */
export interface InventoryRow {
  owner: string;
  name: string;
  address: string;
  labels: Record<string, string>;
}

/** INVENTORY_VIEW is `fabric inventory`: this capsule's entries, then each peer's as last received. */
export const INVENTORY_VIEW: View<InventoryResponse__Output, InventoryRow> = {
  rows: (v) =>
    [...(v.self ? [v.self] : []), ...v.peers].flatMap((inv) =>
      inv.entries.map((e) => ({ owner: inv.name, name: e.name, address: e.address, labels: e.labels })),
    ),
  columns: [
    { header: "OWNER", get: (r) => r.owner },
    { header: "NAME", get: (r) => r.name },
    { header: "ADDRESS", get: (r) => r.address },
    { header: "LABELS", get: (r) => labelsText(r.labels) },
  ],
};

/** fabricInventory lists what every selected capsule knows to be on the fabric. Read-only. */
export async function fabricInventory(s: Session): Promise<void> {
  await s.rpcAndShow<InventoryResponse__Output, InventoryRow>("Fabric/Inventory", () => ({}), INVENTORY_VIEW);
}
