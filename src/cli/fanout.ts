/**
 * fanOut runs one operation against many targets in parallel, with a bound on how many run
 * at once and a deadline per target, and reports every target's outcome in target order.
 * One slow or failing capsule never hides or delays the others' results beyond its deadline.
 */
import { CapsuleError, ErrorCode, toCapsuleError } from "../errors.js";

/** DEFAULT_CONCURRENCY is how many targets are worked on at once unless told otherwise. */
export const DEFAULT_CONCURRENCY = 16;

/** FanOutResult is one target's outcome: its value, or the error it failed with. */
export type FanOutResult<K, T> =
  { target: K; ok: true; value: T } | { target: K; ok: false; error: CapsuleError };

/** FanOutOptions: `deadlineMs` is required; `concurrency` defaults to 16; `label` defaults to String(target). */
export interface FanOutOptions<K> {
  /** deadlineMs bounds each target's run, counted from when it starts (required, > 0). */
  deadlineMs: number;
  /** concurrency is the most targets in flight at once (optional, integer >= 1; default 16). */
  concurrency?: number;
  /** label names a target in its timeout error (optional). */
  label?: (target: K) => string;
}

function formatMs(ms: number): string {
  return ms % 1000 === 0 ? `${ms / 1000}s` : `${ms}ms`;
}

/**
 * fanOut calls `fn(target, signal)` for every target, at most `concurrency` at a time, and
 * resolves with one result per target in the order of `targets` (never rejects). A target
 * whose `fn` has not settled after `deadlineMs` fails with CAPSULE_TIMEOUT and its `signal`
 * is aborted (reason: that error); its slot is then freed even if `fn` ignores the signal,
 * so `fn` should honour it to keep the real work bounded too. Anything `fn` throws becomes
 * a CapsuleError (CAPSULE_INTERNAL unless it already is one).
 */
export async function fanOut<K, T>(
  targets: readonly K[],
  fn: (target: K, signal: AbortSignal) => Promise<T>,
  opts: FanOutOptions<K>,
): Promise<FanOutResult<K, T>[]> {
  const concurrency = opts.concurrency ?? DEFAULT_CONCURRENCY;
  if (!Number.isInteger(concurrency) || concurrency < 1) {
    throw new CapsuleError(
      ErrorCode.InvalidArgument,
      `fanOut: concurrency must be an integer >= 1, got ${concurrency}`,
    );
  }
  if (!(opts.deadlineMs > 0)) {
    throw new CapsuleError(
      ErrorCode.InvalidArgument,
      `fanOut: deadlineMs must be > 0, got ${opts.deadlineMs}`,
    );
  }
  const label = opts.label ?? ((t: K) => String(t));
  const results = new Array<FanOutResult<K, T>>(targets.length);

  const runOne = async (target: K): Promise<FanOutResult<K, T>> => {
    const ac = new AbortController();
    let timer: NodeJS.Timeout | undefined;
    const deadline = new Promise<never>((_, reject) => {
      timer = setTimeout(() => {
        const err = new CapsuleError(
          ErrorCode.Timeout,
          `${label(target)}: no answer within ${formatMs(opts.deadlineMs)}`,
          {
            hint: "check that capsuled runs there and is reachable; a slow link may need a longer --timeout",
          },
        );
        ac.abort(err);
        reject(err);
      }, opts.deadlineMs);
    });
    try {
      // Promise.resolve().then: a synchronous throw from fn is a failed target, not a crash.
      const value = await Promise.race([Promise.resolve().then(() => fn(target, ac.signal)), deadline]);
      return { target, ok: true, value };
    } catch (e) {
      return { target, ok: false, error: toCapsuleError(e) };
    } finally {
      clearTimeout(timer);
    }
  };

  // A fixed pool of workers pulling the next index keeps at most `concurrency` in flight
  // and starts the next target as soon as any slot frees.
  let next = 0;
  const worker = async (): Promise<void> => {
    while (next < targets.length) {
      const i = next++;
      results[i] = await runOne(targets[i] as K);
    }
  };
  await Promise.all(Array.from({ length: Math.min(concurrency, targets.length) }, worker));
  return results;
}
