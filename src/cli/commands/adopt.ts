/**
 * `capsulectl adopt HOST:PORT --name NAME`: trust on first use. Show the key the capsule
 * presents, pin it (after `--fingerprint` matches, `--yes`, or a yes at the prompt), enroll
 * this operator's key with Claim during the claim window, and save the context.
 * Validation and every trust decision come before any side effect: a refused adopt saves nothing.
 */
import { X509Certificate } from "node:crypto";
import { createInterface } from "node:readline";
import { splitHostPort } from "../../api/client.js";
import { isFingerprint } from "../../api/fingerprint.js";
import type { ClaimResponse__Output } from "../../api/proto.js";
import { mintClaimProof } from "../../api/token.js";
import { CapsuleError, ErrorCode, invalidArgument } from "../../errors.js";
import {
  type CapsuleConfig,
  type Context,
  defaultOperatorName,
  loadOrCreateOperatorKey,
  OPERATOR_KEY_FILE,
  validateContextName,
} from "../config.js";
import type { CliIO, Session } from "../session.js";

/** TrustInput is what the trust decision depends on; `expected` unset = no `--fingerprint` given. */
export interface TrustInput {
  address: string;
  /** presented is the fingerprint the server showed in its handshake. */
  presented: string;
  /** expected is the `--fingerprint` value, if any. */
  expected?: string | undefined;
  /** yes is `--yes`. */
  yes: boolean;
  /** interactive is whether a human can answer a prompt (stdin is a TTY). */
  interactive: boolean;
}

/** TrustDecision: pin the key, ask the human, or refuse with the error to show. */
export type TrustDecision =
  | { kind: "accept"; because: "fingerprint-matches" | "yes" }
  | { kind: "ask" }
  | { kind: "reject"; error: CapsuleError };

/**
 * decideTrust decides whether to pin the presented key. A given `--fingerprint` decides alone
 * (exact match accepts; a mismatch rejects even with `--yes`, naming both); else `--yes`
 * accepts; else a TTY is asked; else it is refused, because a script must not pin blindly. Pure.
 */
export function decideTrust(input: TrustInput): TrustDecision {
  if (input.expected !== undefined) {
    if (input.expected === input.presented) return { kind: "accept", because: "fingerprint-matches" };
    return {
      kind: "reject",
      error: new CapsuleError(
        ErrorCode.FingerprintMismatch,
        `${input.address} presents key ${input.presented}, not the expected ${input.expected}; nothing saved`,
        {
          hint: "check the address; on the capsule, `capsuled fingerprint --state-dir DIR` prints its fingerprint",
          details: { expected: input.expected, presented: input.presented },
        },
      ),
    };
  }
  if (input.yes) return { kind: "accept", because: "yes" };
  if (input.interactive) return { kind: "ask" };
  return {
    kind: "reject",
    error: notTrusted(input.address, "stdin is not a terminal, so nobody can confirm the key"),
  };
}

function notTrusted(address: string, why: string): CapsuleError {
  return new CapsuleError(
    ErrorCode.FingerprintRejected,
    `${address}: key not trusted (${why}); nothing saved`,
    {
      hint: "pass --fingerprint SHA256:... to check the key (`capsuled fingerprint --state-dir DIR` on the capsule prints it), or --yes to trust it as shown",
    },
  );
}

/** AdoptPlan: `new` = go ahead; `already` = this exact capsule is pinned under this name (nothing to do). */
export type AdoptPlan = { kind: "new" } | { kind: "already"; context: Context };

/**
 * planAdopt checks a new context against the config. It refuses a name already pinned to
 * another address or key, and an address already pinned under another name (`--capsule
 * HOST:PORT` must stay unambiguous); the same name, address and key is `already`.
 * `fingerprint` unset = not probed yet: only name and address are checked. Pure.
 */
export function planAdopt(
  cfg: CapsuleConfig,
  want: { name: string; address: string; fingerprint?: string },
): AdoptPlan {
  const deleteHint = (n: string) => `capsulectl context delete ${n} first if the old one is gone`;
  const same = cfg.contexts.find((c) => c.name === want.name);
  if (same) {
    if (same.address !== want.address) {
      throw new CapsuleError(ErrorCode.AlreadyExists, `context "${want.name}" already pins ${same.address}`, {
        hint: deleteHint(want.name),
      });
    }
    if (want.fingerprint !== undefined && same.fingerprint !== want.fingerprint) {
      throw new CapsuleError(
        ErrorCode.FingerprintMismatch,
        `context "${want.name}" pins key ${same.fingerprint}, but ${want.address} now presents ${want.fingerprint}`,
        {
          hint: `if the capsule was reinstalled on purpose: capsulectl context delete ${want.name}, then adopt it again`,
          details: { pinned: same.fingerprint, presented: want.fingerprint },
        },
      );
    }
    if (want.fingerprint !== undefined) return { kind: "already", context: same };
    return { kind: "new" };
  }
  const other = cfg.contexts.find((c) => c.address === want.address);
  if (other) {
    throw new CapsuleError(
      ErrorCode.AlreadyExists,
      `${want.address} is already adopted as context "${other.name}"`,
      {
        hint: deleteHint(other.name),
      },
    );
  }
  return { kind: "new" };
}

/**
 * capsuleIdFromCert reads the capsule id from the certificate's subject CN (capsuled writes
 * CN=<capsuleId>); it is the audience of the claim proof, known before any token can be minted.
 */
export function capsuleIdFromCert(certPem: string): string {
  const subject = new X509Certificate(certPem).subject;
  const cn = subject
    .split("\n")
    .map((l) => /^CN=(.+)$/.exec(l.trim())?.[1])
    .find((v) => v !== undefined);
  if (!cn) {
    throw new CapsuleError(
      ErrorCode.FailedPrecondition,
      `the certificate has no subject CN (subject "${subject}")`,
      {
        hint: "is capsuled listening at that address?",
      },
    );
  }
  return cn;
}

/** askYesNo writes `question` to stderr and reads one line; only "y"/"yes" is yes, end of input is no. */
export async function askYesNo(io: CliIO, question: string): Promise<boolean> {
  io.stderr.write(question);
  const rl = createInterface({ input: io.stdin, terminal: false });
  try {
    const line = await new Promise<string | null>((resolve) => {
      rl.once("line", resolve);
      rl.once("close", () => resolve(null));
    });
    return line !== null && /^y(es)?$/i.test(line.trim());
  } finally {
    rl.close();
  }
}

/** AdoptOptions: `name` required; `fingerprint`, `yes`, `operatorName` optional (see the command's help). */
export interface AdoptOptions {
  name: string;
  fingerprint?: string | undefined;
  yes?: boolean | undefined;
  operatorName?: string | undefined;
}

/**
 * adopt runs the command. Idempotent: adopting the same name, address and key again reports
 * it as already adopted and changes nothing.
 */
export async function adopt(s: Session, address: string, opts: AdoptOptions): Promise<void> {
  // Validate everything the user typed before touching the network.
  splitHostPort(address);
  validateContextName(opts.name);
  if (opts.fingerprint !== undefined && !isFingerprint(opts.fingerprint)) {
    throw invalidArgument(
      "--fingerprint",
      `"${opts.fingerprint}" is not SHA256:<base64>`,
      "copy it as `capsuled fingerprint --state-dir DIR` prints it",
    );
  }
  planAdopt(await s.loadConfig(), { name: opts.name, address });

  const probe = await s.io.probe(address, s.globals.timeoutMs);
  s.err(`${address} presents key fingerprint ${probe.fingerprint}\n`);

  const plan = planAdopt(await s.loadConfig(), { name: opts.name, address, fingerprint: probe.fingerprint });
  // Already pinned under this name: the key was trusted before, so no prompt is needed; only a
  // contradicting --fingerprint still fails (below).
  if (plan.kind === "already" && (opts.fingerprint === undefined || opts.fingerprint === probe.fingerprint)) {
    report(s, plan.context, `${opts.name} is already adopted (${plan.context.capsuleId}) at ${address}`);
    return;
  }
  const decision = decideTrust({
    address,
    presented: probe.fingerprint,
    expected: opts.fingerprint,
    yes: opts.yes === true,
    interactive: s.io.stdin.isTTY === true,
  });
  if (decision.kind === "reject") throw decision.error;
  if (decision.kind === "ask" && !(await askYesNo(s.io, "Trust this capsule? [y/N] "))) {
    throw notTrusted(address, "the answer was not yes");
  }

  const capsuleId = capsuleIdFromCert(probe.certPem);
  const { signer, created } = await loadOrCreateOperatorKey(s.configDir);
  if (created) s.err(`created operator key ${s.configDir}/${OPERATOR_KEY_FILE}\n`);

  // Claim is the one call without a token: the proof JWT shows we hold the key being enrolled.
  const client = s.io.dial(
    { address, certPem: probe.certPem, fingerprint: probe.fingerprint, capsuleId, label: opts.name },
    null,
  );
  try {
    await client.call<ClaimResponse__Output>(
      "Claim",
      {
        operator: {
          id: signer.kid,
          name: opts.operatorName ?? defaultOperatorName(s.io.env),
          publicKeyJwk: JSON.stringify(signer.publicJwk),
        },
        proof: await mintClaimProof(signer, capsuleId),
      },
      { deadlineMs: s.globals.timeoutMs },
    );
  } finally {
    client.close();
  }

  const ctx: Context = {
    name: opts.name,
    address,
    capsuleId,
    fingerprint: probe.fingerprint,
    certPem: probe.certPem,
    addedAt: s.io.now().toISOString(),
  };
  // Under the lock, against the config as it is now: another capsulectl (a parallel adopt)
  // may have written it while we waited on the claim.
  await s.updateConfig((cfg) => {
    planAdopt(cfg, { name: opts.name, address, fingerprint: probe.fingerprint });
    const contexts = [...cfg.contexts.filter((c) => c.name !== ctx.name), ctx];
    return { currentContext: cfg.currentContext ?? ctx.name, contexts };
  });
  report(s, ctx, `adopted ${ctx.name} (${ctx.capsuleId}) at ${ctx.address}, fingerprint ${ctx.fingerprint}`);
}

function report(s: Session, ctx: Context, line: string): void {
  const { certPem: _pem, ...shown } = ctx;
  s.print(shown, () => `${line}\n`);
}
