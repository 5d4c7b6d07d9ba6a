/**
 * DAEMON_NODE_FLAGS are the V8 flags capsuled runs with (its shebang carries the same): a
 * resident control-plane daemon trades peak JIT speed for a smaller footprint on small boxes.
 * Measured here: idle RSS 91 → 79 MB. Everything that starts capsuled (lab, tests, benches)
 * uses these, so figures match what users run.
 */
export const DAEMON_NODE_FLAGS: readonly string[] = ["--optimize-for-size", "--max-semi-space-size=1"];
