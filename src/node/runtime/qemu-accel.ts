/**
 * QEMU accelerator detection: which accelerator (and CPU model) can actually run a guest here.
 *
 * "/dev/kvm exists" is not enough, nor is QEMU starting with `-accel kvm`. Nested KVM can open
 * the device and create a VM, then fail when a vCPU is set up (on the lab host `-cpu host` and
 * `-cpu max` abort with `error: failed to set MSR 0x10a to 0x69`), or run guest code so slowly
 * that a Linux kernel never gets out of its decompressor (the lab host's KVM runs the canary
 * below ~80x slower than TCG). So every candidate is tried for real: QEMU starts paused (`-S`)
 * on the `microvm` machine with a 64 KiB canary firmware ({@link canaryFirmware}) that runs a
 * short store loop, then writes {@link CANARY_CODE} to an `isa-debug-exit` port. Over QMP on
 * stdin the probe sends `qmp_capabilities`, `query-kvm` and `cont`; QEMU exits with status
 * {@link CANARY_EXIT} only if a vCPU really executed the guest under that accelerator. A KVM
 * candidate must also finish within `slowMs` (wall time of the whole run, QEMU's start-up
 * included). Anything else (an error exit, an abort, a hang until the timeout, `query-kvm`
 * disagreeing with the accelerator) rejects the candidate; the reason keeps QEMU's own words.
 *
 * Candidates, in order: KVM with `host`, KVM with `qemu64`, then TCG with `max`. "none" means
 * `qemu-system-x86_64` is missing (or cannot even print its version), or no candidate ran.
 */
import { randomBytes } from "node:crypto";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { CommandRunner, RunResult } from "../host/runner.js";

/** QEMU_BINARY is the system emulator Capsule runs microVMs with. */
export const QEMU_BINARY = "qemu-system-x86_64";

/** QEMU_INSTALL_HINT is what to do when {@link QEMU_BINARY} is missing. */
export const QEMU_INSTALL_HINT = "apt-get install qemu-system-x86";

/** Accel is an accelerator QEMU can use, or "none" when microVMs cannot run here. */
export type Accel = "kvm" | "tcg" | "none";

/** AccelChoice is what {@link detectAccel} found. */
export interface AccelChoice {
  accel: Accel;
  /** cpu is the `-cpu` model the canary ran with; undefined when accel is "none". */
  cpu: string | undefined;
  /** reason says in words why, including each rejected candidate's error, for the log. */
  reason: string;
}

/** AccelCandidate is one accelerator and CPU model to try. */
export interface AccelCandidate {
  accel: "kvm" | "tcg";
  cpu: string;
}

/** DEFAULT_CANDIDATES is the order {@link detectAccel} tries: fastest first. */
export const DEFAULT_CANDIDATES: readonly AccelCandidate[] = [
  { accel: "kvm", cpu: "host" },
  { accel: "kvm", cpu: "qemu64" },
  { accel: "tcg", cpu: "max" },
];

/** CANARY_PORT is the I/O port of the probe's `isa-debug-exit` device. */
export const CANARY_PORT = 0xf4;
/** CANARY_CODE is the byte the canary writes to {@link CANARY_PORT}. */
export const CANARY_CODE = 0x2a;
/** CANARY_EXIT is QEMU's exit status after the canary ran: isa-debug-exit exits with `(value << 1) | 1`. */
export const CANARY_EXIT = (CANARY_CODE << 1) | 1;

/** DetectAccelOptions: all optional. */
export interface DetectAccelOptions {
  /** qemu is the emulator to run; default {@link QEMU_BINARY}. */
  qemu?: string;
  /** timeoutMs bounds each candidate's run; default 5 s (the canary takes ~50 ms under TCG). */
  timeoutMs?: number;
  /** slowMs is the most a KVM candidate's run may take; default 1 s. TCG is not held to it. */
  slowMs?: number;
  /** now is the clock the run time is measured with; default `performance.now`. */
  now?: () => number;
  /** candidates overrides {@link DEFAULT_CANDIDATES}. */
  candidates?: readonly AccelCandidate[];
  /**
   * firmwarePath is an existing file holding {@link canaryFirmware}. Without it the probe writes
   * one to a fresh temporary directory and removes it afterwards.
   */
  firmwarePath?: string;
}

/** CANARY_LOOPS is how many iterations of its store loop the canary runs before it exits. */
export const CANARY_LOOPS = 0x100000;

/**
 * canaryFirmware is the probe's BIOS image (pure): 64 KiB (QEMU wants a multiple of 64 KiB)
 * mapped just below 4 GiB. The reset vector (offset 0xfff0) jumps to offset 0, which runs, in
 * real mode, {@link CANARY_LOOPS} iterations of a store loop over the first 64 KiB of RAM, then
 * `out CANARY_PORT, CANARY_CODE` and halts. Under TCG it takes ~40 ms including QEMU's start-up;
 * a KVM that traps every instruction takes seconds, which is how the probe tells it apart.
 */
export function canaryFirmware(): Uint8Array {
  const image = new Uint8Array(0x10000).fill(0xf4); // hlt
  const n = CANARY_LOOPS;
  image.set(
    [
      ...[0x66, 0xb9, n & 0xff, (n >>> 8) & 0xff, (n >>> 16) & 0xff, n >>> 24], // 0x00 mov ecx, n
      ...[0x31, 0xdb], // 0x06 xor bx, bx
      ...[0x89, 0x0f], // 0x08 mov [bx], cx
      ...[0x83, 0xc3, 0x02], // 0x0a add bx, 2
      ...[0x66, 0x49], // 0x0d dec ecx
      ...[0x75, 0xf7], // 0x0f jnz 0x08
      ...[0xb0, CANARY_CODE], // 0x11 mov al, CANARY_CODE
      ...[0xe6, CANARY_PORT], // 0x13 out CANARY_PORT, al
      ...[0xf4, 0xeb, 0xfd], // 0x15 hlt; jmp 0x15
    ],
    0,
  );
  image.set([0xe9, 0x0d, 0x00], 0xfff0); // jmp 0x0000 (IP wraps at 64 KiB)
  return image;
}

/** probeArgv is the command line of one candidate's probe (pure). */
export function probeArgv(qemu: string, c: AccelCandidate, firmwarePath: string): string[] {
  return [
    qemu,
    "-accel",
    c.accel,
    "-cpu",
    c.cpu,
    "-machine",
    "microvm,x-option-roms=off,rtc=off",
    "-m",
    "16M",
    "-nodefaults",
    "-no-user-config",
    "-display",
    "none",
    "-S",
    "-bios",
    firmwarePath,
    "-device",
    `isa-debug-exit,iobase=0x${CANARY_PORT.toString(16)},iosize=0x01`,
    "-qmp",
    "stdio",
  ];
}

/** PROBE_INPUT is the QMP the probe feeds on stdin: negotiate, ask about KVM, then let the canary run. */
export const PROBE_INPUT =
  ['{"execute":"qmp_capabilities"}', '{"execute":"query-kvm"}', '{"execute":"cont"}'].join("\n") + "\n";

/** KvmState is QMP's `query-kvm` answer. */
export interface KvmState {
  enabled: boolean;
  present: boolean;
}

/** parseQueryKvm finds the `query-kvm` answer among QMP's output lines (pure); undefined when there is none. */
export function parseQueryKvm(stdout: string): KvmState | undefined {
  for (const line of stdout.split("\n")) {
    const s = line.trim();
    if (!s.startsWith("{")) continue;
    let msg: unknown;
    try {
      msg = JSON.parse(s);
    } catch {
      continue;
    }
    const ret = (msg as { return?: unknown }).return;
    if (ret && typeof ret === "object" && "enabled" in ret && "present" in ret) {
      const r = ret as Record<string, unknown>;
      return { enabled: r["enabled"] === true, present: r["present"] === true };
    }
  }
  return undefined;
}

/**
 * lastWords is QEMU's most telling stderr line (pure): the first `error:` line, else the last
 * line that is not a warning, without the program-name prefix; "" when there is none.
 */
export function lastWords(stderr: string): string {
  const lines = stderr
    .split("\n")
    .map((l) => l.trim())
    .filter((l) => l !== "" && !/^\S*: warning:/.test(l));
  const line = lines.find((l) => /^\S*: error:/.test(l)) ?? lines.at(-1);
  return line === undefined ? "" : line.replace(/^\S*qemu-system-\S*:\s*/, "");
}

/**
 * judgeProbe decides one candidate from its run, which took `ms` (pure): undefined when it
 * worked, else why not. A KVM candidate slower than `slowMs` is rejected as too slow.
 */
export function judgeProbe(c: AccelCandidate, r: RunResult, ms: number, slowMs: number): string | undefined {
  const kvm = parseQueryKvm(r.stdout);
  if (r.exitCode === CANARY_EXIT) {
    if (c.accel === "kvm" && kvm && !kvm.enabled) return "the guest ran, but query-kvm reports KVM disabled";
    if (c.accel === "tcg" && kvm?.enabled) return "the guest ran, but query-kvm reports KVM enabled";
    if (c.accel === "kvm" && ms > slowMs)
      return `too slow: the canary guest took ${ms} ms (limit ${slowMs} ms; TCG takes ~50 ms)`;
    return undefined;
  }
  const words = lastWords(r.stderr);
  const status =
    r.exitCode < 0
      ? `killed, crashed or timed out after ${ms} ms`
      : r.exitCode === 134
        ? "aborted"
        : r.exitCode === 0
          ? "exited 0 before the canary ran"
          : `exit ${r.exitCode}`;
  return words ? `${status}: ${words}` : status;
}

/** describe names a candidate in reasons. */
function describe(c: AccelCandidate): string {
  return `${c.accel} (-cpu ${c.cpu})`;
}

/**
 * detectAccel finds the first candidate that really runs a guest: see the module comment. It
 * never throws for a failing candidate; it throws only if the firmware cannot be written.
 */
export async function detectAccel(
  runner: CommandRunner,
  opts: DetectAccelOptions = {},
): Promise<AccelChoice> {
  const qemu = opts.qemu ?? QEMU_BINARY;
  const timeoutMs = opts.timeoutMs ?? 5_000;
  const slowMs = opts.slowMs ?? 1_000;
  const now = opts.now ?? (() => performance.now());
  const candidates = opts.candidates ?? DEFAULT_CANDIDATES;

  let version: RunResult;
  try {
    version = await runner.run([qemu, "--version"], { allowFailure: true, timeoutMs });
  } catch (e) {
    version = { exitCode: -1, stdout: "", stderr: e instanceof Error ? e.message : String(e) };
  }
  if (version.exitCode !== 0) {
    const why =
      lastWords(version.stderr) || (version.exitCode < 0 ? "not found" : `exit ${version.exitCode}`);
    return {
      accel: "none",
      cpu: undefined,
      reason: `${qemu} is not usable (${why}); install it: ${QEMU_INSTALL_HINT}`,
    };
  }
  const versionLine = version.stdout.split("\n")[0]?.trim() ?? "";

  let dir: string | undefined;
  let firmware = opts.firmwarePath;
  try {
    if (firmware === undefined) {
      dir = await mkdtemp(join(tmpdir(), `capsule-qemu-probe-${randomBytes(3).toString("hex")}-`));
      firmware = join(dir, "canary.bin");
      await writeFile(firmware, canaryFirmware());
    }
    const rejected: string[] = [];
    for (const c of candidates) {
      let r: RunResult;
      const start = now();
      try {
        r = await runner.run(probeArgv(qemu, c, firmware), {
          input: PROBE_INPUT,
          timeoutMs,
          allowFailure: true,
        });
      } catch (e) {
        r = { exitCode: -1, stdout: "", stderr: e instanceof Error ? e.message : String(e) };
      }
      const ms = Math.round(now() - start);
      const why = judgeProbe(c, r, ms, slowMs);
      if (why === undefined) {
        const before = rejected.length ? `; rejected ${rejected.join("; ")}` : "";
        return {
          accel: c.accel,
          cpu: c.cpu,
          reason: `${describe(c)} ran the canary guest in ${ms} ms (${versionLine})${before}`,
        };
      }
      rejected.push(`${describe(c)}: ${why}`);
    }
    return {
      accel: "none",
      cpu: undefined,
      reason: `no accelerator ran a canary guest (${versionLine}): ${rejected.join("; ")}`,
    };
  } finally {
    if (dir !== undefined) await rm(dir, { recursive: true, force: true });
  }
}
