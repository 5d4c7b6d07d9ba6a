/**
 * Target resolution: which pinned capsules a command talks to. Every target is a context,
 * because a connection needs a pinned key; a bare HOST:PORT is accepted only when some
 * context already pins that address.
 */
import type { Endpoint } from "../api/client.js";
import { splitHostPort } from "../api/client.js";
import { CapsuleError, ErrorCode, invalidArgument } from "../errors.js";
import type { CapsuleConfig, Context } from "./config.js";

/** CAPSULE_HOST_ENV is the environment variable that names the default target(s). */
export const CAPSULE_HOST_ENV = "CAPSULE_HOST";

/** Target is one capsule a command runs against. */
export interface Target {
  /** name labels the target in output and errors: its context name. */
  name: string;
  /** context is the pinned capsule. */
  context: Context;
}

/** TargetSelection is what the user asked for; both fields optional (unset = use the default). */
export interface TargetSelection {
  /** capsule is the raw `--capsule` value: a comma list of names, HOST:PORTs or `$CAPSULE_HOST`. */
  capsule?: string | undefined;
  /** all selects every context. */
  all?: boolean | undefined;
}

/** endpointOf turns a target into the pinned endpoint the RPC client dials. */
export function endpointOf(target: Target): Endpoint {
  const c = target.context;
  return {
    address: c.address,
    certPem: c.certPem,
    fingerprint: c.fingerprint,
    capsuleId: c.capsuleId,
    label: c.name,
  };
}

function normalAddress(address: string): string {
  const { host, port } = splitHostPort(address);
  return `${host.toLowerCase()}:${port}`;
}

function resolveItem(cfg: CapsuleConfig, item: string): Context {
  // Context names cannot contain ":", so a ":" means HOST:PORT.
  if (item.includes(":")) {
    const want = normalAddress(item);
    const ctx = cfg.contexts.find((c) => normalAddress(c.address) === want);
    if (!ctx) {
      throw new CapsuleError(ErrorCode.UnknownContext, `no pinned key for ${item}`, {
        hint: `capsulectl adopt ${item} --name NAME`,
        details: { target: item },
      });
    }
    return ctx;
  }
  const ctx = cfg.contexts.find((c) => c.name === item);
  if (!ctx) {
    const known = cfg.contexts.map((c) => c.name);
    throw new CapsuleError(ErrorCode.UnknownContext, `unknown context "${item}"`, {
      hint: known.length
        ? `known contexts: ${known.join(", ")}`
        : "no contexts yet: capsulectl adopt HOST:PORT --name NAME",
      details: { target: item, known },
    });
  }
  return ctx;
}

function splitList(list: string, what: string): string[] {
  const items = list.split(",").map((s) => s.trim());
  if (items.some((s) => s === "")) {
    throw invalidArgument(what, `"${list}" has an empty item`, "write a comma list without blanks: a,b,c");
  }
  return items;
}

function expandEnv(item: string, env: Record<string, string | undefined>): string[] {
  if (item !== `$${CAPSULE_HOST_ENV}`) return [item];
  const value = env[CAPSULE_HOST_ENV];
  if (!value) {
    throw invalidArgument(
      "--capsule",
      `${item} is given but ${CAPSULE_HOST_ENV} is not set`,
      `export ${CAPSULE_HOST_ENV}=NAME`,
    );
  }
  return splitList(value, CAPSULE_HOST_ENV);
}

/**
 * resolveTargets picks the targets of a command, in the order the user listed them, each
 * context at most once. `--capsule` wins; then `--all` (every context, config order); then
 * `$CAPSULE_HOST` (itself a comma list of names or HOST:PORTs); then the current context.
 * Errors: CAPSULE_UNKNOWN_CONTEXT (an unknown name or an unpinned HOST:PORT),
 * CAPSULE_NO_CONTEXT (nothing selected and nothing to default to). Pure.
 */
export function resolveTargets(
  cfg: CapsuleConfig,
  sel: TargetSelection,
  env: Record<string, string | undefined>,
): Target[] {
  let items: string[];
  if (sel.capsule !== undefined) {
    items = splitList(sel.capsule, "--capsule").flatMap((i) => expandEnv(i, env));
  } else if (sel.all) {
    if (cfg.contexts.length === 0) throw noContext("--all selects no capsule: no contexts yet");
    items = cfg.contexts.map((c) => c.name);
  } else if (env[CAPSULE_HOST_ENV]) {
    items = splitList(env[CAPSULE_HOST_ENV], CAPSULE_HOST_ENV);
  } else if (cfg.currentContext !== null) {
    items = [cfg.currentContext];
  } else {
    throw noContext(
      cfg.contexts.length ? "no current context and no --capsule" : "no capsule selected: no contexts yet",
      cfg.contexts.length ? `pick one: capsulectl context use ${cfg.contexts[0]?.name}` : undefined,
    );
  }
  const out: Target[] = [];
  const seen = new Set<string>();
  for (const item of items) {
    const ctx = resolveItem(cfg, item);
    if (seen.has(ctx.name)) continue;
    seen.add(ctx.name);
    out.push({ name: ctx.name, context: ctx });
  }
  return out;
}

function noContext(message: string, hint?: string): CapsuleError {
  return new CapsuleError(ErrorCode.NoContext, message, {
    hint: hint ?? "capsulectl adopt HOST:PORT --name NAME, then it becomes the current context",
  });
}
