/**
 * The policy language: `kind: Policy` documents into the policy model (model.ts).
 *
 * The schema checks (policies/capsule.schema.json, applied by src/api/manifest.ts so the CLI
 * rejects a bad file before sending it) and these functions agree: every parser here checks
 * its own input again, so a document read back from storage or built in code is held to the
 * same rules, and every error names the field ("web-db: allow.0.ports.1: 0 is not a port").
 * Everything here is pure.
 */
import { type PolicyManifest, parsePolicyPort, SELECTOR_KEYS, validateManifest } from "../../api/manifest.js";
import { invalidArgument } from "../../errors.js";
import {
  type Policy,
  type PolicyTest,
  type PortRange,
  type Rule,
  type Selector,
  WORKLOAD_NAME,
} from "./model.js";

const LABEL_KEY = /^[A-Za-z0-9]([A-Za-z0-9._/-]{0,61}[A-Za-z0-9])?$/;

const isMapping = (v: unknown): v is Record<string, unknown> =>
  typeof v === "object" && v !== null && !Array.isArray(v);

// Capsule names are capsuled's --name: case is kept ("homeB").
const CAPSULE_NAME = /^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$/;

function name(value: unknown, field: string, what: "workload" | "capsule" | "policy"): string {
  const capsule = what === "capsule";
  if (typeof value !== "string" || !(capsule ? CAPSULE_NAME : WORKLOAD_NAME).test(value))
    throw invalidArgument(
      field,
      `${JSON.stringify(value)} is not a ${what} name`,
      `${capsule ? "letters" : "lowercase letters"}, digits and inner dashes, at most 63 characters`,
    );
  return value;
}

/**
 * parsePort parses one port of a rule: `5432/tcp`, `8000-8100/udp` (inclusive) or `icmp`
 * (every ICMP type; from = to = 0). Pure. Throws CAPSULE_INVALID_ARGUMENT naming `field` for
 * a port 0 or above 65535, a range whose start exceeds its end, or an unknown protocol.
 */
export function parsePort(text: unknown, field: string): PortRange {
  return parsePolicyPort(text, field);
}

/** parseTestPort is {@link parsePort} for a test: one port, never a range. Pure. */
export function parseTestPort(text: unknown, field: string): PortRange {
  return parsePolicyPort(text, field, true);
}

/**
 * parseSelector parses a selector: a mapping with exactly one of `workload`, `labels`,
 * `capsule`, `edge`. Names follow the workload name rules; label keys and values the label
 * rules. An empty `labels` map is valid and matches nothing (evaluate.ts warns about it). Pure.
 * Throws CAPSULE_INVALID_ARGUMENT naming `field`.
 */
export function parseSelector(value: unknown, field: string): Selector {
  const hint = `use one of ${SELECTOR_KEYS.map((k) => `{${k}: ...}`).join(", ")}`;
  if (!isMapping(value)) throw invalidArgument(field, "is not a mapping", hint);
  const keys = Object.keys(value);
  for (const k of keys)
    if (!(SELECTOR_KEYS as readonly string[]).includes(k))
      throw invalidArgument(`${field}.${k}`, "is not a known field", hint);
  if (keys.length !== 1)
    throw invalidArgument(
      field,
      keys.length === 0
        ? "is an empty selector"
        : `has ${keys.length} keys (${keys.join(", ")}); a selector has exactly one`,
      hint,
    );
  const key = keys[0] as (typeof SELECTOR_KEYS)[number];
  const v = value[key];
  switch (key) {
    case "workload":
      return { workload: name(v, `${field}.workload`, "workload") };
    case "capsule":
      return { capsule: name(v, `${field}.capsule`, "capsule") };
    case "edge":
      return { edge: name(v, `${field}.edge`, "capsule") };
    case "labels": {
      if (!isMapping(v)) throw invalidArgument(`${field}.labels`, "is not a mapping", "e.g. {app: db}");
      const labels: Record<string, string> = {};
      for (const [k, lv] of Object.entries(v)) {
        if (!LABEL_KEY.test(k)) throw invalidArgument(`${field}.labels`, `"${k}" is not a label key`);
        if (typeof lv !== "string" || lv.length > 63)
          throw invalidArgument(`${field}.labels.${k}`, "must be a string of at most 63 characters");
        labels[k] = lv;
      }
      return { labels };
    }
  }
}

/** parseRule parses one `allow` entry `{from, to, ports}` (ports: at least one). Pure; errors name `field`. */
export function parseRule(value: unknown, field: string): Rule {
  if (!isMapping(value))
    throw invalidArgument(field, "is not a mapping", "an allow rule is {from, to, ports}");
  for (const k of Object.keys(value))
    if (k !== "from" && k !== "to" && k !== "ports")
      throw invalidArgument(`${field}.${k}`, "is not a known field", "an allow rule is {from, to, ports}");
  for (const k of ["from", "to", "ports"])
    if (value[k] === undefined) throw invalidArgument(`${field}.${k}`, "is required");
  const ports = value["ports"];
  if (!Array.isArray(ports) || ports.length === 0)
    throw invalidArgument(`${field}.ports`, "must be a non-empty list", 'e.g. ["5432/tcp"]');
  return {
    from: parseSelector(value["from"], `${field}.from`),
    to: parseSelector(value["to"], `${field}.to`),
    ports: ports.map((p: unknown, i) => parsePort(p, `${field}.ports.${i}`)),
  };
}

/**
 * parseTest parses one `tests` entry `{from, to, port, expect}`: from and to are workload
 * names, port is one port (not a range) or icmp, expect is allow or deny. Pure; errors name
 * `field`.
 */
export function parseTest(value: unknown, field: string): PolicyTest {
  const shape = "a test is {from: WORKLOAD, to: WORKLOAD, port: N/tcp, expect: allow|deny}";
  if (!isMapping(value)) throw invalidArgument(field, "is not a mapping", shape);
  for (const k of Object.keys(value))
    if (!["from", "to", "port", "expect"].includes(k))
      throw invalidArgument(`${field}.${k}`, "is not a known field", shape);
  for (const k of ["from", "to", "port", "expect"])
    if (value[k] === undefined) throw invalidArgument(`${field}.${k}`, "is required", shape);
  const expect = value["expect"];
  if (expect !== "allow" && expect !== "deny")
    throw invalidArgument(`${field}.expect`, `${JSON.stringify(expect)} is not allow or deny`);
  return {
    from: name(value["from"], `${field}.from`, "workload"),
    to: name(value["to"], `${field}.to`, "workload"),
    port: parseTestPort(value["port"], `${field}.port`),
    expect,
  };
}

/**
 * toPolicy turns a validated `kind: Policy` manifest into the policy model, checking every
 * part again (see the module comment). `source` prefixes field names in errors ("web-db: "
 * by default). Pure.
 */
export function toPolicy(m: PolicyManifest, source = `${m.name}: `): Policy {
  const allow = m.allow ?? [];
  const tests = m.tests ?? [];
  if (!Array.isArray(allow)) throw invalidArgument(`${source}allow`, "must be a list");
  if (!Array.isArray(tests)) throw invalidArgument(`${source}tests`, "must be a list");
  return {
    name: name(m.name, `${source}name`, "policy"),
    allow: allow.map((r: unknown, i) => parseRule(r, `${source}allow.${i}`)),
    tests: tests.map((t: unknown, i) => parseTest(t, `${source}tests.${i}`)),
  };
}

/**
 * parsePolicy validates one document as a `kind: Policy` manifest (schema and defaults, see
 * validateManifest; any other kind is refused) and returns the policy model. Pure apart from
 * reading the schema once. Throws CAPSULE_INVALID_ARGUMENT naming the field.
 */
export function parsePolicy(doc: unknown, source?: string): Policy {
  const m = validateManifest(doc, source, "Policy");
  return toPolicy(m, source || `${m.name}: `);
}
