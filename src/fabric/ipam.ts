import { randomInt } from "node:crypto";
import { CapsuleError, ErrorCode } from "../errors.js";

/**
 * IPAM for the fabric. 100.64.0.0/10 is cut into 16,384 pools of /24. Each capsule owns one
 * pool: its own address is pool.1 and its workloads get pool.2 .. pool.254, persisted at
 * creation. Pools are picked at random (not hashed from anything), kept disjoint across
 * enrolled capsules by a check at enroll, and only serve *allocation*: routing is per /32
 * (a peer's AllowedIPs list each address it hosts), so an address can move to another capsule
 * (migration) without renumbering. Pool 0 (100.64.0.0/24) is reserved.
 */
export const FABRIC_CIDR = "100.64.0.0/10";
export const FABRIC_BASE = ipToInt("100.64.0.0");
export const POOL_COUNT = 1 << 14;
export const POOL_PREFIX = 24;

/** ipToInt parses dotted IPv4. */
export function ipToInt(ip: string): number {
  const parts = ip.split(".").map(Number);
  if (parts.length !== 4 || parts.some((p) => !Number.isInteger(p) || p < 0 || p > 255)) {
    throw new CapsuleError(ErrorCode.InvalidArgument, `"${ip}" is not an IPv4 address`);
  }
  return ((parts[0]! << 24) | (parts[1]! << 16) | (parts[2]! << 8) | parts[3]!) >>> 0;
}

/** intToIp formats an IPv4 integer. */
export function intToIp(n: number): string {
  return [n >>> 24, (n >>> 16) & 255, (n >>> 8) & 255, n & 255].join(".");
}

/** inFabric reports whether an address lies in 100.64.0.0/10. */
export function inFabric(ip: string): boolean {
  return (ipToInt(ip) & 0xffc00000) >>> 0 === FABRIC_BASE;
}

/** poolCidr is the /24 of pool `index`. */
export function poolCidr(index: number): string {
  return `${intToIp(FABRIC_BASE + index * 256)}/${POOL_PREFIX}`;
}

/** poolOf returns the pool index an address falls in. */
export function poolOf(ip: string): number {
  if (!inFabric(ip)) throw new CapsuleError(ErrorCode.InvalidArgument, `${ip} is not in ${FABRIC_CIDR}`);
  return (ipToInt(ip) - FABRIC_BASE) >>> 8;
}

/** capsuleAddress is pool.1, the capsule's own fabric address. */
export function capsuleAddress(pool: number): string {
  return intToIp(FABRIC_BASE + pool * 256 + 1);
}

/**
 * pickPool chooses a random pool outside `taken` (indices). `rand` is injectable for tests.
 * Throws CAPSULE_FAILED_PRECONDITION when every pool is taken.
 */
export function pickPool(taken: ReadonlySet<number>, rand: (max: number) => number = randomInt): number {
  for (let i = 0; i < 64; i++) {
    const p = 1 + rand(POOL_COUNT - 1);
    if (!taken.has(p)) return p;
  }
  for (let p = 1; p < POOL_COUNT; p++) if (!taken.has(p)) return p;
  throw new CapsuleError(ErrorCode.FailedPrecondition, "the fabric has no free address pool left", {
    hint: "unenroll capsules that are gone for good to free their pools",
  });
}

/**
 * allocateAddress returns the lowest free workload address of `pool` (pool.2 .. pool.254)
 * not in `used`. Deterministic. Throws when the pool is full.
 */
export function allocateAddress(pool: number, used: ReadonlySet<string>): string {
  for (let host = 2; host <= 254; host++) {
    const ip = intToIp(FABRIC_BASE + pool * 256 + host);
    if (!used.has(ip)) return ip;
  }
  throw new CapsuleError(
    ErrorCode.FailedPrecondition,
    `address pool ${poolCidr(pool)} is full (253 workloads)`,
    {
      hint: "delete workloads you no longer need on this capsule, or run them on another capsule",
    },
  );
}

/** PoolClaim is who holds which pool, as one side of an enrollment sees it. */
export interface PoolClaim {
  capsuleId: string;
  name: string;
  pool: number;
}

/**
 * poolConflicts lists pairs of distinct capsules claiming the same pool across two sides of
 * an enrollment (each side: itself and its peers). Pure; an empty list means enroll may go on.
 */
export function poolConflicts(a: readonly PoolClaim[], b: readonly PoolClaim[]): [PoolClaim, PoolClaim][] {
  const out: [PoolClaim, PoolClaim][] = [];
  const seen = new Map<number, PoolClaim>();
  for (const c of [...a, ...b]) {
    const prev = seen.get(c.pool);
    if (prev && prev.capsuleId !== c.capsuleId) out.push([prev, c]);
    else seen.set(c.pool, c);
  }
  return out;
}
