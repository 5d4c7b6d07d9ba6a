/**
 * Output: kubectl-looking tables (uppercase headers, space-aligned, no borders), `wide`
 * tables with extra columns, and the raw objects as JSON or YAML for scripts. Every
 * renderer returns text; nothing here writes to a stream, so all of it is pure and testable.
 */
import { stringify as stringifyYaml } from "yaml";
import { type CapsuleError, formatError } from "../errors.js";
import type { FanOutResult } from "./fanout.js";

/** OUTPUT_FORMATS are the values `-o` accepts. */
export const OUTPUT_FORMATS = ["table", "wide", "json", "yaml"] as const;

/** OutputFormat is one of {@link OUTPUT_FORMATS}. */
export type OutputFormat = (typeof OUTPUT_FORMATS)[number];

/** Cell is what a column getter returns; null, undefined and "" render as `<none>`. */
export type Cell = string | number | boolean | null | undefined;

/** Column is one table column: `header` (shown uppercase), `get` (required); `wide` = only with `-o wide`. */
export interface Column<R> {
  header: string;
  get(row: R): Cell;
  wide?: boolean;
}

/** View says how one target's raw value becomes table rows. */
export interface View<V, R> {
  /** columns in display order. */
  columns: readonly Column<R>[];
  /** rows extracts the rows from one target's value (one row for a single object, many for a list). */
  rows(value: V): readonly R[];
}

/** Rendered is what a command prints and the exit code it ends with. */
export interface Rendered {
  stdout: string;
  stderr: string;
  exitCode: number;
}

/** NONE is what an empty cell shows, as kubectl does. */
export const NONE = "<none>";

/** COLUMN_GAP separates table columns (kubectl uses three spaces). */
const COLUMN_GAP = "   ";

/** cellText renders one cell on one line. Pure. */
export function cellText(v: Cell): string {
  if (v === null || v === undefined || v === "") return NONE;
  return String(v).replace(/[\r\n]+/g, " ");
}

/** GridRow is one printed line: leading cells, and optionally free text after them that does not set widths. */
interface GridRow {
  cells: string[];
  tail?: string;
}

function formatGrid(header: string[], rows: GridRow[]): string {
  const widths = header.map((h) => h.length);
  for (const r of rows) {
    // Only cells set widths: a failed target's long error (its tail) must not widen the
    // columns of everyone else.
    r.cells.forEach((c, i) => {
      widths[i] = Math.max(widths[i] ?? 0, c.length);
    });
  }
  const line = (cells: string[], tail?: string) => {
    const parts = cells.map((c, i) => c.padEnd(widths[i] ?? 0));
    if (tail !== undefined) parts.push(tail);
    return parts.join(COLUMN_GAP).trimEnd();
  };
  return [line(header), ...rows.map((r) => line(r.cells, r.tail))].map((l) => `${l}\n`).join("");
}

function visible<R>(columns: readonly Column<R>[], wide: boolean): Column<R>[] {
  return columns.filter((c) => wide || !c.wide);
}

/**
 * renderTable renders rows under uppercase headers, space-aligned, without borders; columns
 * marked `wide` appear only when `opts.wide`. No rows prints the header line alone. Pure.
 */
export function renderTable<R>(
  rows: readonly R[],
  columns: readonly Column<R>[],
  opts: { wide?: boolean } = {},
): string {
  const cols = visible(columns, opts.wide ?? false);
  return formatGrid(
    cols.map((c) => c.header.toUpperCase()),
    rows.map((r) => ({ cells: cols.map((c) => cellText(c.get(r))) })),
  );
}

/** renderObject renders a raw value as pretty JSON or as YAML (multi-line strings as block scalars). Pure. */
export function renderObject(value: unknown, format: "json" | "yaml"): string {
  if (format === "json") return `${JSON.stringify(value, null, 2)}\n`;
  return stringifyYaml(value, { lineWidth: 0 });
}

/** ErrorObject is how a failed target appears in JSON/YAML output. `hint` is absent when there is none. */
export interface ErrorObject {
  code: string;
  message: string;
  hint?: string;
}

/** errorObject is the JSON/YAML form of an error. Pure. */
export function errorObject(e: CapsuleError): ErrorObject {
  return e.hint ? { code: e.code, message: e.message, hint: e.hint } : { code: e.code, message: e.message };
}

const BYTE_UNITS = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];

/**
 * humanBytes renders a byte count as wg(8) does: "512 B", "1.50 KiB", "3.27 GiB". Accepts a
 * number or a decimal string (uint64 counters arrive as strings); anything else is "". Pure.
 */
export function humanBytes(n: number | string): string {
  const v = typeof n === "string" ? Number(n) : n;
  if (!Number.isFinite(v) || v < 0) return "";
  let unit = 0;
  let x = v;
  while (x >= 1024 && unit < BYTE_UNITS.length - 1) {
    x /= 1024;
    unit++;
  }
  return unit === 0 ? `${x} B` : `${x.toFixed(2)} ${BYTE_UNITS[unit]}`;
}

/** renderKeyValues renders "Key:   value" lines, values aligned, for one object in table form. Pure. */
export function renderKeyValues(pairs: readonly (readonly [string, Cell])[]): string {
  const w = Math.max(0, ...pairs.map(([k]) => k.length + 1));
  return pairs.map(([k, v]) => `${`${k}:`.padEnd(w)}   ${cellText(v)}\n`).join("");
}

/**
 * renderResults prints the outcome of a fan-out.
 *
 * Single target (`multi` false): success is the table or raw object; failure prints nothing
 * on stdout, the error line and hint on stderr, and exits 1.
 *
 * Several targets (`multi` true): a table gets a leading CAPSULE column and a failed target
 * becomes a row with its one-line error in place of data; JSON/YAML is a list of
 * `{capsule, ...value}` and `{capsule, error: {code, message, hint}}`. Any failure makes the
 * exit code 1 without hiding the other targets; the failures' hints go to stderr, once each. Pure.
 */
export function renderResults<K extends { name: string }, V, R>(
  results: readonly FanOutResult<K, V>[],
  view: View<V, R>,
  format: OutputFormat,
  opts: { multi: boolean },
): Rendered {
  const failed = results.filter((r) => !r.ok);
  const exitCode = failed.length ? 1 : 0;
  if (!opts.multi) {
    const stdout: string[] = [];
    const stderr: string[] = [];
    for (const r of results) {
      if (!r.ok) stderr.push(`${formatError(r.error)}\n`);
      else if (format === "json" || format === "yaml") stdout.push(renderObject(r.value, format));
      else stdout.push(renderTable(view.rows(r.value), view.columns, { wide: format === "wide" }));
    }
    return { stdout: stdout.join(""), stderr: stderr.join(""), exitCode };
  }

  if (format === "json" || format === "yaml") {
    const list = results.map((r) => {
      if (!r.ok) return { capsule: r.target.name, error: errorObject(r.error) };
      const v = r.value as unknown;
      return typeof v === "object" && v !== null && !Array.isArray(v)
        ? { capsule: r.target.name, ...(v as Record<string, unknown>) }
        : { capsule: r.target.name, value: v };
    });
    return { stdout: renderObject(list, format), stderr: "", exitCode };
  }

  const cols = visible(view.columns, format === "wide");
  const header = ["CAPSULE", ...cols.map((c) => c.header.toUpperCase())];
  const rows: GridRow[] = [];
  for (const r of results) {
    if (!r.ok) {
      rows.push({ cells: [r.target.name], tail: `error: ${r.error.message.replace(/[\r\n]+/g, " ")}` });
      continue;
    }
    for (const row of view.rows(r.value)) {
      rows.push({ cells: [r.target.name, ...cols.map((c) => cellText(c.get(row)))] });
    }
  }
  const hints = [...new Set(failed.flatMap((r) => (!r.ok && r.error.hint ? [r.error.hint] : [])))];
  return {
    stdout: formatGrid(header, rows),
    stderr: hints.map((h) => `hint: ${h}\n`).join(""),
    exitCode,
  };
}
