import { readFileSync } from "node:fs";
import { join } from "node:path";
import { Ajv, type ErrorObject, type ValidateFunction } from "ajv";
import { parseAllDocuments } from "yaml";
import { CapsuleError, ErrorCode, invalidArgument } from "../errors.js";
import { PROTO_DIR } from "./proto.js";

/** SCHEMA_PATH is the JSON Schema of every manifest kind (shipped for editors, used here to validate). */
export const SCHEMA_PATH = join(PROTO_DIR, "..", "policies", "capsule.schema.json");

/** PortSpec is one exposed port of a workload. */
export interface PortSpec {
  port: number;
  hostPort?: number;
  protocol: "tcp" | "udp";
}

/** WorkloadManifest is a validated `kind: Workload` document (defaults applied). */
export interface WorkloadManifest {
  kind: "Workload";
  name: string;
  labels: Record<string, string>;
  container?: { image: string; command?: string[]; env?: Record<string, string> };
  microvm?: {
    kernel?: string;
    initrd?: string;
    image?: string;
    cmdline?: string;
    cpus?: number;
    memoryMib?: number;
  };
  ports: PortSpec[];
  volumes: { name: string; mountPath: string }[];
  restartPolicy: "Always" | "OnFailure" | "Never";
}

/**
 * SelectorManifest is a policy selector as written: exactly one key. `labels` selects every
 * workload whose labels include all of these; `capsule` a capsule's own address and its
 * workloads; `edge` an edge capsule's own address.
 */
export type SelectorManifest =
  { workload: string } | { labels: Record<string, string> } | { capsule: string } | { edge: string };

/** PolicyRuleManifest is one `allow` entry as written; ports are `N/tcp`, `N-M/udp` or `icmp`. */
export interface PolicyRuleManifest {
  from: SelectorManifest;
  to: SelectorManifest;
  ports: string[];
}

/** PolicyTestManifest is one `tests` entry as written: endpoints are workload names, one port. */
export interface PolicyTestManifest {
  from: string;
  to: string;
  port: string;
  expect: "allow" | "deny";
}

/**
 * PolicyManifest is a validated `kind: Policy` document (defaults applied: `allow` and `tests`
 * are empty when unset). Every port string has been checked (see {@link parsePolicyPort}).
 * src/fabric/policy/parse.ts turns it into the policy model.
 */
export interface PolicyManifest {
  kind: "Policy";
  name: string;
  allow: PolicyRuleManifest[];
  tests: PolicyTestManifest[];
}

/** Manifest is any validated document (more kinds join as they land). */
export type Manifest = WorkloadManifest | PolicyManifest;

/** ManifestKind is the `kind` of a known document. */
export type ManifestKind = Manifest["kind"];

/** KINDS are the known kinds, in the order errors list them. */
export const KINDS: readonly ManifestKind[] = ["Workload", "Policy"];

/** SELECTOR_KEYS are the keys a policy selector may have (exactly one of them). */
export const SELECTOR_KEYS = ["workload", "labels", "capsule", "edge"] as const;

/** PolicyPort is a parsed policy port (icmp: from = to = 0); the policy model's PortRange has this shape. */
export interface PolicyPort {
  proto: "tcp" | "udp" | "icmp";
  from: number;
  to: number;
}

/**
 * parsePolicyPort parses `N/tcp`, `N/udp`, `N-M/tcp`, `N-M/udp` or `icmp` (lowercase; ports
 * 1-65535, N <= M). `single` refuses ranges (a policy test names one port). Pure. Throws
 * CAPSULE_INVALID_ARGUMENT naming `field` ("web-db: allow.0.ports.1: 0 is not a port (1-65535)").
 */
export function parsePolicyPort(text: unknown, field: string, single = false): PolicyPort {
  const syntax = single ? "use N/tcp, N/udp or icmp" : "use N/tcp, N-M/udp (a range) or icmp";
  if (typeof text !== "string") throw invalidArgument(field, "must be a string", syntax);
  if (text === "icmp") return { proto: "icmp", from: 0, to: 0 };
  const m = /^(0|[1-9]\d*)(?:-(0|[1-9]\d*))?\/([A-Za-z0-9]+)$/.exec(text);
  if (!m) throw invalidArgument(field, `"${text}" is not a port`, syntax);
  const [, a = "", b, proto = ""] = m;
  if (proto !== "tcp" && proto !== "udp")
    throw invalidArgument(field, `"${proto}" is not a protocol`, "known protocols: tcp, udp, icmp");
  if (single && b !== undefined)
    throw invalidArgument(field, `"${text}" is a range`, "a test names one port, e.g. 5432/tcp");
  const from = Number(a);
  const to = b === undefined ? from : Number(b);
  for (const p of [from, to])
    if (p < 1 || p > 65535) throw invalidArgument(field, `${p} is not a port (1-65535)`);
  if (from > to) throw invalidArgument(field, `${from}-${to} is an empty range`, `write ${to}-${from}`);
  return { proto, from, to };
}

const validators = new Map<ManifestKind, ValidateFunction>();

/**
 * validatorFor compiles the schema's definition of `kind` (once). A Policy is validated with
 * every error collected so that a misspelt key is reported rather than the key it was meant
 * to be ("tests.0.too: is not a known field", not "tests.0.to: is required"); a Workload
 * keeps the first-error behaviour it always had.
 */
function validatorFor(kind: ManifestKind): ValidateFunction {
  let v = validators.get(kind);
  if (!v) {
    const schema = JSON.parse(readFileSync(SCHEMA_PATH, "utf8")) as { $id: string };
    const ajv = new Ajv({ allErrors: kind === "Policy", strict: false, useDefaults: true });
    ajv.addSchema(schema);
    v = ajv.getSchema(`${schema.$id}#/definitions/${kind}`);
    if (!v) throw new Error(`${SCHEMA_PATH}: no definition for ${kind}`);
    validators.set(kind, v);
  }
  return v;
}

/** valueAt returns the value at an ajv instancePath ("/allow/0/ports/1") of `doc`. */
function valueAt(doc: unknown, instancePath: string): unknown {
  let v = doc;
  for (const part of instancePath.split("/").slice(1)) {
    if (typeof v !== "object" || v === null) return undefined;
    v = (v as Record<string, unknown>)[part.replace(/~1/g, "/").replace(/~0/g, "~")];
  }
  return v;
}

/**
 * describePolicy turns the schema errors a Policy document can have into messages that say
 * what to write instead of which schema keyword failed; undefined for the generic ones.
 */
function describePolicy(e: ErrorObject, doc: unknown, source: string): CapsuleError | undefined {
  const path = e.instancePath.replace(/^\//, "").replace(/\//g, ".");
  const field = `${source}${path}`;
  if (/^allow\.\d+\.ports\.\d+$/.test(path)) return tryPort(valueAt(doc, e.instancePath), field, false);
  if (/^tests\.\d+\.port$/.test(path)) return tryPort(valueAt(doc, e.instancePath), field, true);
  if (
    /^allow\.\d+\.(from|to)$/.test(path) &&
    (e.keyword === "minProperties" || e.keyword === "maxProperties")
  ) {
    const keys = Object.keys((valueAt(doc, e.instancePath) as object | undefined) ?? {});
    return invalidArgument(
      field,
      keys.length === 0
        ? "is an empty selector"
        : `has ${keys.length} keys (${keys.join(", ")}); a selector has exactly one`,
      `use one of ${SELECTOR_KEYS.map((k) => `{${k}: ...}`).join(", ")}`,
    );
  }
  if (e.keyword === "enum") {
    const allowed = (e.params as { allowedValues?: unknown[] }).allowedValues ?? [];
    return invalidArgument(field, `must be one of: ${allowed.map(String).join(", ")}`);
  }
  return undefined;
}

function tryPort(value: unknown, field: string, single: boolean): CapsuleError | undefined {
  try {
    parsePolicyPort(value, field, single);
  } catch (err) {
    if (err instanceof CapsuleError) return err;
  }
  return undefined;
}

/**
 * validateManifest checks one document against the schema of its kind and applies defaults. The
 * error names the field ("web: container.image: is required"). Given `kind`, a document of any
 * other kind is refused (an API that takes only workloads says so). Pure apart from reading the
 * schema once.
 */
export function validateManifest(doc: unknown, source?: string): Manifest;
export function validateManifest<K extends ManifestKind>(
  doc: unknown,
  source: string | undefined,
  kind: K,
): Extract<Manifest, { kind: K }>;
export function validateManifest(doc: unknown, source = "", kind?: ManifestKind): Manifest {
  if (typeof doc !== "object" || doc === null || Array.isArray(doc)) {
    throw invalidArgument(
      source || "(document)",
      "is not a mapping",
      "each YAML document must be a mapping with kind and name",
    );
  }
  const d = doc as Record<string, unknown>;
  const prefix = source || (typeof d["name"] === "string" ? `${d["name"]}: ` : "");
  const found = KINDS.find((k) => k === d["kind"]);
  if (!found) {
    throw invalidArgument(
      `${prefix}kind`,
      `"${String(d["kind"])}" is not a known kind`,
      `known kinds: ${KINDS.join(", ")}`,
    );
  }
  if (kind !== undefined && found !== kind) {
    throw invalidArgument(`${prefix}kind`, `a ${found} is not accepted here`, `only ${kind} documents are`);
  }
  const copy = structuredClone(d);
  const validator = validatorFor(found);
  if (!validator(copy)) {
    const errs = (validator.errors ?? []).filter((e) => e.keyword !== "oneOf" && e.keyword !== "if");
    const first = errs.find((e) => found === "Policy" && e.keyword === "additionalProperties") ?? errs[0];
    if (!first) throw invalidArgument(`${prefix}(document)`, "needs exactly one of container or microvm");
    throw (found === "Policy" ? describePolicy(first, copy, prefix) : undefined) ?? describe(first, prefix);
  }
  return found === "Policy"
    ? checkPolicy(copy as unknown as PolicyManifest, prefix)
    : checkWorkload(copy, prefix);
}

/** checkPolicy applies defaults and the checks a schema cannot state (port ranges ordered). */
function checkPolicy(m: PolicyManifest, prefix: string): PolicyManifest {
  m.allow ??= [];
  m.tests ??= [];
  m.allow.forEach((r, i) => r.ports.forEach((p, j) => parsePolicyPort(p, `${prefix}allow.${i}.ports.${j}`)));
  m.tests.forEach((t, i) => parsePolicyPort(t.port, `${prefix}tests.${i}.port`, true));
  return m;
}

/** checkWorkload applies defaults and refuses a port or volume listed twice. */
function checkWorkload(copy: Record<string, unknown>, prefix: string): WorkloadManifest {
  const m = copy as unknown as WorkloadManifest;
  m.labels ??= {};
  m.ports = (m.ports ?? []).map((p) => ({ ...p, protocol: p.protocol ?? "tcp" }));
  m.volumes ??= [];
  m.restartPolicy ??= "Always";
  const seen = new Set<string>();
  for (const p of m.ports) {
    const k = `${p.port}/${p.protocol}`;
    if (seen.has(k)) throw invalidArgument(`${prefix}ports`, `${k} is listed twice`);
    seen.add(k);
  }
  const mounts = new Set<string>();
  for (const v of m.volumes) {
    if (mounts.has(v.name)) throw invalidArgument(`${prefix}volumes`, `volume ${v.name} is mounted twice`);
    mounts.add(v.name);
  }
  return m;
}

function describe(e: ErrorObject, source: string): CapsuleError {
  const path = e.instancePath.replace(/^\//, "").replace(/\//g, ".") || "(document)";
  const p = e.params as Record<string, unknown>;
  switch (e.keyword) {
    case "required":
      return invalidArgument(
        `${source}${path === "(document)" ? "" : `${path}.`}${String(p["missingProperty"])}`,
        "is required",
      );
    case "additionalProperties":
      return invalidArgument(
        `${source}${path === "(document)" ? "" : `${path}.`}${String(p["additionalProperty"])}`,
        "is not a known field",
        "check the spelling; see policies/capsule.schema.json",
      );
    default:
      return invalidArgument(
        `${source}${path}`,
        e.message ?? "is invalid",
        "see policies/capsule.schema.json",
      );
  }
}

/**
 * parseManifests reads every YAML document of `text` (`file` names it in errors), validates
 * each, and refuses duplicate names of one kind. Empty documents are skipped.
 */
export function parseManifests(text: string, file: string): Manifest[] {
  const docs = parseAllDocuments(text);
  const out: Manifest[] = [];
  const names = new Set<string>();
  docs.forEach((doc, i) => {
    if (doc.errors.length > 0) {
      throw new CapsuleError(
        ErrorCode.InvalidArgument,
        `${file}: document ${i + 1}: ${doc.errors[0]?.message}`,
        {
          hint: "fix the YAML syntax",
        },
      );
    }
    const value = doc.toJS();
    if (value === null || value === undefined) return;
    const m = validateManifest(
      value,
      `${file}: ${typeof value?.name === "string" ? value.name : `document ${i + 1}`}: `,
    );
    const key = `${m.kind}/${m.name}`;
    if (names.has(key)) throw invalidArgument(`${file}: ${m.name}`, `${m.kind} ${m.name} appears twice`);
    names.add(key);
    out.push(m);
  });
  return out;
}
