import { invalidArgument } from "../errors.js";

const UNITS: Record<string, number> = { ms: 1, s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 };

/** parseDuration parses "30m", "10s", "1h30m", "500ms" or "0" into milliseconds; `field` names the flag in errors. */
export function parseDuration(text: string, field: string): number {
  if (text === "0") return 0;
  const re = /(\d+(?:\.\d+)?)(ms|s|m|h|d)/gy;
  let total = 0;
  let consumed = 0;
  for (let m = re.exec(text); m; m = re.exec(text)) {
    total += Number(m[1]) * (UNITS[m[2]!] ?? 0);
    consumed = re.lastIndex;
  }
  if (consumed !== text.length || text.length === 0) {
    throw invalidArgument(field, `"${text}" is not a duration`, "use a number with a unit: 30s, 30m, 1h30m");
  }
  return total;
}
