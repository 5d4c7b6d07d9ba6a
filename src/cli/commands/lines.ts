/**
 * Helpers shared by the workload, image and volume commands: kubectl-style result lines for one
 * capsule, one table with a CAPSULE column for several, and the labels and sizes they show.
 */
import { formatError } from "../../errors.js";
import type { FanOutResult } from "../fanout.js";
import type { View } from "../output.js";
import type { Session } from "../session.js";
import type { Target } from "../targets.js";

/**
 * showLines prints a mutation's fan-out results: with one target and a table format, the lines
 * `lines(value)` gives (`workload/web stopped`) and errors on stderr; otherwise (several
 * targets, or -o json|yaml) through `view` as every read does. A failure makes the exit code 1.
 */
export function showLines<V, R>(
  s: Session,
  results: readonly FanOutResult<Target, V>[],
  multi: boolean,
  view: View<V, R>,
  lines: (value: V) => string,
): void {
  if (multi || s.output === "json" || s.output === "yaml") {
    s.show(results, view, multi);
    return;
  }
  for (const r of results) {
    if (r.ok) s.out(lines(r.value));
    else {
      s.err(`${formatError(r.error)}\n`);
      s.exitCode = 1;
    }
  }
}

/** labelsText renders labels as sorted `k=v` pairs joined by commas. Pure. */
export function labelsText(labels: Record<string, string> | undefined): string {
  if (!labels) return "";
  return Object.keys(labels)
    .sort()
    .map((k) => `${k}=${labels[k]}`)
    .join(",");
}
