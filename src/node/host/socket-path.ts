/**
 * Unix socket paths: Linux takes at most {@link SOCKET_PATH_MAX} bytes (sun_path is 108 with the
 * NUL), and a deep state dir can exceed that. Daemons whose sockets would not fit move them to
 * {@link fallbackSocketDir}: stable for a state dir, distinct between state dirs.
 */
import { createHash } from "node:crypto";

/** SOCKET_PATH_MAX is the longest unix socket path Linux takes. */
export const SOCKET_PATH_MAX = 107;

/** socketPathFits reports whether `path` can be a unix socket address (pure). */
export function socketPathFits(path: string): boolean {
  return Buffer.byteLength(path) <= SOCKET_PATH_MAX;
}

/** fallbackSocketDir is `/run/capsule-<12 hex of sha256(stateDir)>` (pure). */
export function fallbackSocketDir(stateDir: string): string {
  return `/run/capsule-${createHash("sha256").update(stateDir).digest("hex").slice(0, 12)}`;
}
