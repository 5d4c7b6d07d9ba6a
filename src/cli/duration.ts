/** Durations as users type them ("10s", "1m30s", "500ms") and as tables show them ("3d4h"). */
import { invalidArgument } from "../errors.js";

const UNIT_MS: Record<string, number> = { ms: 1, s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 };

/**
 * parseDuration reads a Go-style duration ("500ms", "10s", "1m30s", "1.5h", "2d") or a bare
 * number of seconds ("10") and returns milliseconds. It must be > 0; anything else throws
 * CAPSULE_INVALID_ARGUMENT naming `field`. Pure.
 */
export function parseDuration(text: string, field = "duration"): number {
  const s = text.trim();
  const bad = () =>
    invalidArgument(field, `"${text}" is not a duration`, 'write it like "10s", "1m30s" or "500ms"');
  let ms: number;
  if (/^\d+(\.\d+)?$/.test(s)) {
    ms = Number(s) * 1000;
  } else {
    if (!/^(\d+(\.\d+)?(ms|s|m|h|d))+$/.test(s)) throw bad();
    ms = 0;
    for (const m of s.matchAll(/(\d+(?:\.\d+)?)(ms|s|m|h|d)/g))
      ms += Number(m[1]) * (UNIT_MS[m[2] as string] ?? 0);
  }
  ms = Math.round(ms);
  if (!(ms > 0)) throw invalidArgument(field, `"${text}" must be longer than zero`);
  return ms;
}

/**
 * humanDuration renders seconds in the two largest units, kubectl-style: "45s", "4m10s",
 * "5h12m", "3d4h" (a zero second unit is left out: "2h"). Negative or non-finite input is "0s". Pure.
 */
export function humanDuration(seconds: number): string {
  if (!Number.isFinite(seconds) || seconds < 0) return "0s";
  const s = Math.floor(seconds);
  const pair = (a: number, ua: string, b: number, ub: string) => (b ? `${a}${ua}${b}${ub}` : `${a}${ua}`);
  if (s < 60) return `${s}s`;
  if (s < 3600) return pair(Math.floor(s / 60), "m", s % 60, "s");
  if (s < 86_400) return pair(Math.floor(s / 3600), "h", Math.floor((s % 3600) / 60), "m");
  return pair(Math.floor(s / 86_400), "d", Math.floor((s % 86_400) / 3600), "h");
}
