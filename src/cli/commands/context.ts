/**
 * `capsulectl context list | use NAME | show [NAME] | delete NAME`: the local list of pinned
 * capsules. No RPC: these only read and write the config dir.
 */
import { CapsuleError, ErrorCode } from "../../errors.js";
import { type CapsuleConfig, type Context, findContext } from "../config.js";
import { type Column, renderKeyValues, renderTable } from "../output.js";
import type { Session } from "../session.js";

/** ContextRow is a context as listed: the context plus whether it is the current one. */
export type ContextRow = Context & { current: boolean };

/** CONTEXT_COLUMNS are the columns of `context list`. */
export const CONTEXT_COLUMNS: readonly Column<ContextRow>[] = [
  { header: "CURRENT", get: (r) => (r.current ? "*" : " ") },
  { header: "NAME", get: (r) => r.name },
  { header: "ADDRESS", get: (r) => r.address },
  { header: "CAPSULE-ID", get: (r) => r.capsuleId },
  { header: "FINGERPRINT", get: (r) => r.fingerprint },
  { header: "ADDED", get: (r) => r.addedAt, wide: true },
];

function mustFind(cfg: CapsuleConfig, name: string): Context {
  const ctx = findContext(cfg, name);
  if (!ctx) {
    const known = cfg.contexts.map((c) => c.name);
    throw new CapsuleError(ErrorCode.UnknownContext, `unknown context "${name}"`, {
      hint: known.length
        ? `known contexts: ${known.join(", ")}`
        : "no contexts yet: capsulectl adopt HOST:PORT --name NAME",
      details: { target: name, known },
    });
  }
  return ctx;
}

/** contextList prints every context; the current one is marked `*`. Read-only. */
export async function contextList(s: Session): Promise<void> {
  const cfg = await s.loadConfig();
  const rows: ContextRow[] = cfg.contexts.map((c) => ({ ...c, current: c.name === cfg.currentContext }));
  s.print(rows, () => renderTable(rows, CONTEXT_COLUMNS, { wide: s.output === "wide" }));
}

/** contextUse makes `name` the current context. Idempotent. */
export async function contextUse(s: Session, name: string): Promise<void> {
  // Check first without the lock, so a typo changes nothing (not even creating the dir).
  mustFind(await s.loadConfig(), name);
  await s.updateConfig((cfg) => {
    mustFind(cfg, name);
    return cfg.currentContext === name ? undefined : { ...cfg, currentContext: name };
  });
  s.out(`switched to context "${name}"\n`);
}

/**
 * contextShow prints one context (`name` unset = the current one). The table form leaves
 * out the certificate, which only a script wants; `-o json|yaml` prints everything. Read-only.
 */
export async function contextShow(s: Session, name: string | undefined): Promise<void> {
  const cfg = await s.loadConfig();
  const wanted = name ?? cfg.currentContext;
  if (wanted === null) {
    throw new CapsuleError(ErrorCode.NoContext, "no current context", {
      hint: cfg.contexts.length
        ? "name one: capsulectl context show NAME, or capsulectl context use NAME"
        : "capsulectl adopt HOST:PORT --name NAME",
    });
  }
  const ctx = mustFind(cfg, wanted);
  const current = ctx.name === cfg.currentContext;
  s.print({ ...ctx, current }, () =>
    renderKeyValues([
      ["Name", ctx.name],
      ["Address", ctx.address],
      ["Capsule ID", ctx.capsuleId],
      ["Fingerprint", ctx.fingerprint],
      ["Added", ctx.addedAt],
      ["Current", current ? "yes" : "no"],
    ]),
  );
}

/**
 * contextDelete forgets a context (its pinned key included). If it was current, no context
 * is current afterwards: silently picking another could aim the next command at the wrong capsule.
 */
export async function contextDelete(s: Session, name: string): Promise<void> {
  mustFind(await s.loadConfig(), name);
  let wasCurrent = false;
  const { contexts } = await s.updateConfig((cfg) => {
    mustFind(cfg, name);
    wasCurrent = cfg.currentContext === name;
    return {
      currentContext: wasCurrent ? null : cfg.currentContext,
      contexts: cfg.contexts.filter((c) => c.name !== name),
    };
  });
  s.out(`deleted context "${name}"\n`);
  if (wasCurrent && contexts.length)
    s.err(`hint: no current context now; pick one: capsulectl context use NAME\n`);
}
