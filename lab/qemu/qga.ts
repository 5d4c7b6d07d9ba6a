/**
 * The lab's way into its guests: shell scripts run through each guest's qemu-guest-agent
 * (`guest-exec`), using capsuled's own client (src/node/runtime/guest-agent.ts). No network
 * and no ssh are needed.
 */
import { type GuestAgent, guestAgent } from "../../src/node/runtime/guest-agent.js";

/** ExecResult is a finished guest command. */
export interface ExecResult {
  exitCode: number;
  stdout: string;
  stderr: string;
  /** ms is the wall-clock time the command took, as seen from the host. */
  ms: number;
}

/** ExecOptions: all fields optional. */
export interface ExecOptions {
  /** timeoutMs bounds the whole command (default 120 s); on expiry the call throws. */
  timeoutMs?: number;
  /** input is written to the command's stdin. */
  input?: string;
  /** allowFailure returns a non-zero exit instead of throwing. */
  allowFailure?: boolean;
}

/** QgaClient runs shell scripts in one guest. */
export class QgaClient {
  private constructor(private readonly agent: GuestAgent) {}

  /** connect waits (at most `timeoutMs`) until the guest's agent answers a ping on `socketPath`. */
  static async connect(socketPath: string, timeoutMs = 30_000): Promise<QgaClient> {
    const agent = guestAgent(socketPath);
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      try {
        await agent.ping({ timeoutMs: 5_000 });
        return new QgaClient(agent);
      } catch (e) {
        if (Date.now() > deadline) throw e;
        await new Promise((r) => setTimeout(r, 250));
      }
    }
  }

  /** exec runs `script` with `sh -c`; a non-zero exit throws (with its output) unless `allowFailure`. */
  async exec(script: string, opts: ExecOptions = {}): Promise<ExecResult> {
    const t0 = Date.now();
    const r = await this.agent.exec(["/bin/sh", "-c", script], {
      timeoutMs: opts.timeoutMs ?? 120_000,
      ...(opts.input !== undefined ? { input: opts.input } : {}),
    });
    const out = { exitCode: r.exitCode, stdout: r.stdout, stderr: r.stderr, ms: Date.now() - t0 };
    if (out.exitCode !== 0 && !opts.allowFailure)
      throw new Error(`guest command failed (exit ${out.exitCode}): ${script}\n${out.stdout}${out.stderr}`);
    return out;
  }

  /** close is a no-op: every call opens its own connection to the agent. */
  close(): void {}
}
