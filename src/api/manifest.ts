import { readFileSync } from "node:fs";
import { join } from "node:path";
import { Ajv, type ErrorObject } from "ajv";
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
  microvm?: { kernel?: string; initrd?: string; image?: string; cpus?: number; memoryMib?: number };
  ports: PortSpec[];
  volumes: { name: string; mountPath: string }[];
  restartPolicy: "Always" | "OnFailure" | "Never";
}

/** Manifest is any validated document (more kinds join as they land). */
export type Manifest = WorkloadManifest;

let validator: ReturnType<Ajv["compile"]> | undefined;

function validate(doc: unknown): boolean {
  if (!validator) {
    const ajv = new Ajv({ allErrors: false, strict: false, useDefaults: true });
    validator = ajv.compile(JSON.parse(readFileSync(SCHEMA_PATH, "utf8")));
  }
  return validator(doc) as boolean;
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
 * validateManifest checks one document against the schema and applies defaults. The error names
 * the field ("web: container.image: is required"). Pure apart from reading the schema once.
 */
export function validateManifest(doc: unknown, source = ""): Manifest {
  if (typeof doc !== "object" || doc === null || Array.isArray(doc)) {
    throw invalidArgument(
      source || "(document)",
      "is not a mapping",
      "each YAML document must be a mapping with kind and name",
    );
  }
  const d = doc as Record<string, unknown>;
  const prefix = source || (typeof d["name"] === "string" ? `${d["name"]}: ` : "");
  if (d["kind"] !== "Workload") {
    throw invalidArgument(
      `${prefix}kind`,
      `"${String(d["kind"])}" is not a known kind`,
      "known kinds: Workload",
    );
  }
  const copy = structuredClone(d);
  if (!validate(copy)) {
    const errs = (validator?.errors ?? []).filter((e) => e.keyword !== "oneOf" && e.keyword !== "if");
    const first = errs[0];
    if (!first) throw invalidArgument(`${prefix}(document)`, "needs exactly one of container or microvm");
    throw describe(first, prefix);
  }
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
