/**
 * The client's config dir: pinned capsules (contexts) in `config.yaml` and the operator's
 * Ed25519 key in `operator.key`. Both hold secrets or trust anchors, so the dir is 0700 and
 * every file 0600, and every write is atomic (a crash never leaves half a file behind).
 */
import { randomBytes, X509Certificate } from "node:crypto";
import { chmod, link, mkdir, open, readFile, rename, stat, unlink, writeFile } from "node:fs/promises";
import { homedir, hostname, userInfo } from "node:os";
import { join } from "node:path";
import { parse as parseYaml, stringify as stringifyYaml } from "yaml";
import { splitHostPort } from "../api/client.js";
import { isFingerprint, spkiFingerprint } from "../api/fingerprint.js";
import { generateSigner, type Signer, signerFromPem } from "../api/token.js";
import { CapsuleError, ErrorCode, invalidArgument } from "../errors.js";

/** CONFIG_FILE is the name of the contexts file inside the config dir. */
export const CONFIG_FILE = "config.yaml";
/** OPERATOR_KEY_FILE is the name of the operator's private key inside the config dir. */
export const OPERATOR_KEY_FILE = "operator.key";
/** LOCK_FILE serializes read-modify-write of `config.yaml` between capsulectl processes (see {@link updateConfig}). */
export const LOCK_FILE = "config.lock";
/** LOCK_WAIT_MS is how long {@link updateConfig} waits for another capsulectl's lock. */
export const LOCK_WAIT_MS = 10_000;
/** LOCK_STALE_MS is the age after which a lock is taken to be left behind by a crashed capsulectl. */
export const LOCK_STALE_MS = 30_000;

/** Context is one pinned capsule. Every field is required. */
export interface Context {
  /** name is the operator's label for the capsule; unique in the config, see {@link CONTEXT_NAME_RE}. */
  name: string;
  /** address is the capsule's API "host:port". */
  address: string;
  /** capsuleId is the capsule's id (its certificate CN), the audience of every token. */
  capsuleId: string;
  /** fingerprint is the pinned SPKI fingerprint "SHA256:<base64>"; it must be certPem's key. */
  fingerprint: string;
  /** certPem is the capsule's self-signed certificate, the only trust anchor of the connection. */
  certPem: string;
  /** addedAt is when the capsule was adopted (RFC 3339). */
  addedAt: string;
}

/** CapsuleConfig is the whole `config.yaml`. */
export interface CapsuleConfig {
  /** currentContext names the default target; null means none is chosen. */
  currentContext: string | null;
  /** contexts are the pinned capsules, in the order they were adopted. */
  contexts: Context[];
}

/**
 * CONTEXT_NAME_RE is what a context name may look like. It may not contain ":" or ","
 * because `--capsule` reads an item with ":" as HOST:PORT and splits the list on ",".
 */
export const CONTEXT_NAME_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$/;

/** emptyConfig is the config of a client that has adopted nothing (what a missing file means). */
export function emptyConfig(): CapsuleConfig {
  return { currentContext: null, contexts: [] };
}

/**
 * defaultConfigDir is `$CAPSULE_CONFIG_DIR` if set and non-empty, else `~/.config/capsule`
 * (home from `$HOME`, falling back to the OS's idea of it).
 */
export function defaultConfigDir(env: Record<string, string | undefined>): string {
  if (env.CAPSULE_CONFIG_DIR) return env.CAPSULE_CONFIG_DIR;
  return join(env.HOME || homedir(), ".config", "capsule");
}

/** defaultOperatorName is `${USER}@${hostname}`, the label a capsule shows for this operator's key. */
export function defaultOperatorName(env: Record<string, string | undefined>): string {
  let user = env.USER || env.LOGNAME;
  if (!user) {
    try {
      user = userInfo().username;
    } catch {
      user = "operator";
    }
  }
  return `${user}@${hostname()}`;
}

/** validateContextName throws CAPSULE_INVALID_ARGUMENT unless `name` matches {@link CONTEXT_NAME_RE}. */
export function validateContextName(name: string): void {
  if (!CONTEXT_NAME_RE.test(name)) {
    throw invalidArgument(
      "name",
      `"${name}" is not a valid context name`,
      "use letters, digits, '.', '_' and '-' (no ':' or ','), starting with a letter or digit",
    );
  }
}

/** findContext returns the context called `name`, or undefined. */
export function findContext(cfg: CapsuleConfig, name: string): Context | undefined {
  return cfg.contexts.find((c) => c.name === name);
}

function configError(file: string, field: string, problem: string): CapsuleError {
  return new CapsuleError(ErrorCode.InvalidConfig, `${file}: ${field}: ${problem}`, {
    hint: `fix ${field} in ${file}, or delete the context and adopt the capsule again`,
    details: { file, field },
  });
}

function isRecord(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

/**
 * validateConfig checks a parsed `config.yaml` and returns it typed. A missing
 * `currentContext` means null and a missing `contexts` means none; unknown keys are dropped.
 * Any other problem is CAPSULE_INVALID_CONFIG naming `file` and the field. Pure.
 */
export function validateConfig(raw: unknown, file: string): CapsuleConfig {
  if (raw === null || raw === undefined) return emptyConfig();
  if (!isRecord(raw)) throw configError(file, "(top level)", "must be a mapping");
  const current = raw.currentContext ?? null;
  if (current !== null && typeof current !== "string") {
    throw configError(file, "currentContext", "must be a context name or null");
  }
  const list = raw.contexts ?? [];
  if (!Array.isArray(list)) throw configError(file, "contexts", "must be a list");
  const seen = new Set<string>();
  const contexts = list.map((item, i) => {
    const at = `contexts[${i}]`;
    if (!isRecord(item)) throw configError(file, at, "must be a mapping");
    const str = (key: keyof Context): string => {
      const v = item[key];
      if (typeof v !== "string" || v === "")
        throw configError(file, `${at}.${key}`, "must be a non-empty string");
      return v;
    };
    const ctx: Context = {
      name: str("name"),
      address: str("address"),
      capsuleId: str("capsuleId"),
      fingerprint: str("fingerprint"),
      certPem: str("certPem"),
      addedAt: str("addedAt"),
    };
    if (!CONTEXT_NAME_RE.test(ctx.name))
      throw configError(file, `${at}.name`, `"${ctx.name}" is not a valid name`);
    if (seen.has(ctx.name)) throw configError(file, `${at}.name`, `"${ctx.name}" appears twice`);
    seen.add(ctx.name);
    try {
      splitHostPort(ctx.address);
    } catch {
      throw configError(file, `${at}.address`, `"${ctx.address}" is not HOST:PORT`);
    }
    if (!isFingerprint(ctx.fingerprint)) {
      throw configError(file, `${at}.fingerprint`, `"${ctx.fingerprint}" is not SHA256:<base64>`);
    }
    let cert: X509Certificate;
    try {
      cert = new X509Certificate(ctx.certPem);
    } catch {
      throw configError(file, `${at}.certPem`, "is not a PEM certificate");
    }
    // The connection trusts certPem and pins fingerprint; if they disagree every call would
    // fail with a confusing handshake error, so say it here.
    if (spkiFingerprint(cert) !== ctx.fingerprint) {
      throw configError(file, `${at}.fingerprint`, "does not match the key of certPem");
    }
    if (Number.isNaN(Date.parse(ctx.addedAt))) {
      throw configError(file, `${at}.addedAt`, `"${ctx.addedAt}" is not an RFC 3339 time`);
    }
    return ctx;
  });
  if (current !== null && !seen.has(current)) {
    throw configError(file, "currentContext", `"${current}" is not one of the contexts`);
  }
  return { currentContext: current, contexts };
}

/**
 * loadConfig reads `<dir>/config.yaml`. A missing file is an empty config (nothing adopted
 * yet); a malformed one is CAPSULE_INVALID_CONFIG naming the file and field. Read-only.
 */
export async function loadConfig(dir: string): Promise<CapsuleConfig> {
  const file = join(dir, CONFIG_FILE);
  let text: string;
  try {
    text = await readFile(file, "utf8");
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === "ENOENT") return emptyConfig();
    throw new CapsuleError(ErrorCode.InvalidConfig, `${file}: ${(e as Error).message}`, { cause: e });
  }
  let raw: unknown;
  try {
    raw = parseYaml(text);
  } catch (e) {
    throw new CapsuleError(
      ErrorCode.InvalidConfig,
      `${file}: not valid YAML: ${(e as Error).message.split("\n")[0]}`,
      {
        hint: `fix or remove ${file}`,
        cause: e,
      },
    );
  }
  return validateConfig(raw, file);
}

/** ensureConfigDir creates `dir` (and parents) and makes it 0700: it holds the operator's private key. Idempotent. */
export async function ensureConfigDir(dir: string): Promise<void> {
  await mkdir(dir, { recursive: true, mode: 0o700 });
  const st = await stat(dir);
  if ((st.mode & 0o777) !== 0o700) await chmod(dir, 0o700);
}

function tempName(file: string): string {
  return `${file}.${process.pid}.${randomBytes(4).toString("hex")}.tmp`;
}

/**
 * saveConfig validates `cfg` (so nothing unloadable is ever written) and writes it to
 * `<dir>/config.yaml` atomically: a 0600 temp file in the same dir, then rename.
 * Idempotent: saving the same config twice leaves the same file.
 */
export async function saveConfig(dir: string, cfg: CapsuleConfig): Promise<void> {
  const file = join(dir, CONFIG_FILE);
  const valid = validateConfig(cfg, file);
  await ensureConfigDir(dir);
  const body = `# capsulectl contexts; edit with "capsulectl context" and "capsulectl adopt".\n${stringifyYaml(valid, { lineWidth: 0 })}`;
  const tmp = tempName(file);
  try {
    await writeFile(tmp, body, { mode: 0o600, flag: "wx" });
    await rename(tmp, file);
  } catch (e) {
    await unlink(tmp).catch(() => {});
    throw new CapsuleError(ErrorCode.Internal, `${file}: cannot write: ${(e as Error).message}`, {
      cause: e,
    });
  }
}

async function lockIsStale(file: string): Promise<boolean> {
  try {
    const [st, text] = await Promise.all([stat(file), readFile(file, "utf8")]);
    if (Date.now() - st.mtimeMs > LOCK_STALE_MS) return true;
    const pid = Number(text.trim());
    if (!Number.isInteger(pid) || pid <= 0) return false; // being written: not stale yet
    try {
      process.kill(pid, 0);
      return false;
    } catch (e) {
      return (e as NodeJS.ErrnoException).code === "ESRCH";
    }
  } catch {
    return false; // gone already: the next attempt takes it
  }
}

/**
 * lockConfig takes the config dir's lock (an exclusively created {@link LOCK_FILE} holding
 * our pid) and returns its release. A lock whose process is gone, or older than
 * {@link LOCK_STALE_MS}, is broken; one held longer than {@link LOCK_WAIT_MS} is an error.
 */
async function lockConfig(dir: string): Promise<() => Promise<void>> {
  await ensureConfigDir(dir);
  const file = join(dir, LOCK_FILE);
  const until = Date.now() + LOCK_WAIT_MS;
  for (let delay = 5; ; delay = Math.min(100, delay * 2)) {
    try {
      const h = await open(file, "wx", 0o600);
      try {
        await h.writeFile(`${process.pid}\n`);
      } finally {
        await h.close();
      }
      return () => unlink(file).catch(() => {});
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== "EEXIST") {
        throw new CapsuleError(ErrorCode.Internal, `${file}: cannot lock: ${(e as Error).message}`, {
          cause: e,
        });
      }
    }
    if (await lockIsStale(file)) {
      await unlink(file).catch(() => {});
      continue;
    }
    if (Date.now() > until) {
      throw new CapsuleError(ErrorCode.FailedPrecondition, `${file} is held by another capsulectl`, {
        hint: `wait for it to finish; if none is running, remove ${file}`,
      });
    }
    await new Promise((r) => setTimeout(r, delay + Math.random() * delay));
  }
}

/**
 * updateConfig reads, changes and writes `config.yaml` under the config dir's lock, so
 * capsulectl processes running at once (parallel adopts) never lose each other's changes.
 * `change` gets the current config and returns the one to save, or undefined to save
 * nothing; what it throws aborts the update. Resolves with what was saved (or the config as
 * it was). Creates the config dir (0700).
 */
export async function updateConfig(
  dir: string,
  change: (cfg: CapsuleConfig) => CapsuleConfig | undefined | Promise<CapsuleConfig | undefined>,
): Promise<CapsuleConfig> {
  const release = await lockConfig(dir);
  try {
    const cfg = await loadConfig(dir);
    const next = await change(cfg);
    if (next === undefined) return cfg;
    await saveConfig(dir, next);
    return next;
  } finally {
    await release();
  }
}

/**
 * loadOperatorKey loads `<dir>/operator.key`. A missing key is CAPSULE_NOT_FOUND with a hint to
 * adopt (which creates it); a key that is not Ed25519 PKCS#8 PEM is CAPSULE_INVALID_CONFIG. Read-only.
 */
export async function loadOperatorKey(dir: string): Promise<Signer> {
  const file = join(dir, OPERATOR_KEY_FILE);
  let pem: string;
  try {
    pem = await readFile(file, "utf8");
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === "ENOENT") {
      throw new CapsuleError(ErrorCode.NotFound, `no operator key at ${file}`, {
        hint: "capsulectl adopt HOST:PORT --name NAME creates one, or capsulectl operator whoami",
        cause: e,
      });
    }
    throw new CapsuleError(ErrorCode.InvalidConfig, `${file}: ${(e as Error).message}`, { cause: e });
  }
  try {
    return await signerFromPem(pem);
  } catch (e) {
    throw new CapsuleError(ErrorCode.InvalidConfig, `${file}: not an Ed25519 PKCS#8 PEM private key`, {
      hint: `move ${file} away to start with a new key (capsules that knew the old one will refuse the new one)`,
      cause: e,
    });
  }
}

/**
 * loadOrCreateOperatorKey returns the operator key, creating it on first need. Creation is
 * atomic and race-free: the key is written to a 0600 temp file and hard-linked into place,
 * which fails if another process won the race, in which case its key is used. Idempotent.
 */
export async function loadOrCreateOperatorKey(dir: string): Promise<{ signer: Signer; created: boolean }> {
  try {
    return { signer: await loadOperatorKey(dir), created: false };
  } catch (e) {
    if (!(e instanceof CapsuleError) || e.code !== ErrorCode.NotFound) throw e;
  }
  await ensureConfigDir(dir);
  const file = join(dir, OPERATOR_KEY_FILE);
  const { signer, privatePem } = await generateSigner();
  const tmp = tempName(file);
  try {
    await writeFile(tmp, privatePem, { mode: 0o600, flag: "wx" });
    await link(tmp, file);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === "EEXIST")
      return { signer: await loadOperatorKey(dir), created: false };
    throw new CapsuleError(ErrorCode.Internal, `${file}: cannot write: ${(e as Error).message}`, {
      cause: e,
    });
  } finally {
    await unlink(tmp).catch(() => {});
  }
  return { signer, created: true };
}
