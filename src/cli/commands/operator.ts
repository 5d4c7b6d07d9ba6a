/**
 * `capsulectl operator list | add NAME --public-key-file FILE | remove ID | whoami`: the
 * operator keys a capsule accepts. list/add/remove are one RPC each, fanned out like every
 * read; whoami is local and prints this operator's public key for another operator to add.
 */
import { createPublicKey } from "node:crypto";
import { readFile } from "node:fs/promises";
import type { JWK } from "jose";
import type {
  ListOperatorsResponse__Output,
  Operator__Output,
  RemoveOperatorResponse__Output,
} from "../../api/proto.js";
import { jwkThumbprint, publicKeyFromJwk } from "../../api/token.js";
import { invalidArgument } from "../../errors.js";
import { defaultOperatorName, loadOrCreateOperatorKey } from "../config.js";
import { type Column, renderKeyValues, type View } from "../output.js";
import type { Session } from "../session.js";

/** OPERATOR_COLUMNS are the columns of an operator row. */
export const OPERATOR_COLUMNS: readonly Column<Operator__Output>[] = [
  { header: "ID", get: (o) => o.id },
  { header: "NAME", get: (o) => o.name },
  { header: "ADDED", get: (o) => o.addedAt },
  { header: "ADDED-BY", get: (o) => o.addedBy },
  { header: "PUBLIC-KEY", get: (o) => publicX(o.publicKeyJwk), wide: true },
];

function publicX(jwkJson: string): string {
  try {
    return String((JSON.parse(jwkJson) as JWK).x ?? "");
  } catch {
    return "";
  }
}

/**
 * parsePublicKey reads an operator's Ed25519 public key from a file's text: a public JWK
 * (JSON), `operator whoami -o json` output or an Operator object (its `publicKeyJwk`), or a
 * PEM SubjectPublicKeyInfo. A private key is refused: it must never leave its owner. Returns
 * the minimal JWK {kty, crv, x}. Throws CAPSULE_INVALID_ARGUMENT naming `file`. Pure.
 */
export function parsePublicKey(text: string, file: string): JWK {
  const t = text.trim();
  if (/PRIVATE KEY-----/.test(t)) {
    throw invalidArgument(
      file,
      "is a private key; pass the public key",
      "the key's owner runs `capsulectl operator whoami -o json > me.json` and sends that file",
    );
  }
  let jwk: JWK;
  if (t.startsWith("{")) {
    let obj: Record<string, unknown>;
    try {
      obj = JSON.parse(t) as Record<string, unknown>;
    } catch (e) {
      throw invalidArgument(file, `not valid JSON: ${(e as Error).message}`);
    }
    const inner = obj.publicKeyJwk;
    try {
      jwk =
        inner === undefined
          ? (obj as JWK)
          : typeof inner === "string"
            ? (JSON.parse(inner) as JWK)
            : (inner as JWK);
      if ("d" in jwk) throw new Error("is a private JWK; pass the public key only");
      publicKeyFromJwk(jwk);
    } catch (e) {
      throw invalidArgument(file, (e as Error).message);
    }
  } else if (t.startsWith("-----BEGIN PUBLIC KEY-----")) {
    try {
      const key = createPublicKey(t);
      if (key.asymmetricKeyType !== "ed25519")
        throw new Error(`is a ${key.asymmetricKeyType} key, not Ed25519`);
      jwk = key.export({ format: "jwk" }) as JWK;
    } catch (e) {
      throw invalidArgument(file, (e as Error).message);
    }
  } else {
    throw invalidArgument(
      file,
      "is neither a JWK (JSON) nor a PEM public key",
      "pass `operator whoami -o json` output",
    );
  }
  return { kty: "OKP", crv: "Ed25519", x: jwk.x as string };
}

/** operatorList lists the operator keys of every selected capsule. Read-only. */
export async function operatorList(s: Session): Promise<void> {
  const view: View<ListOperatorsResponse__Output, Operator__Output> = {
    rows: (v) => v.operators,
    columns: OPERATOR_COLUMNS,
  };
  await s.rpcAndShow("ListOperators", () => ({}), view);
}

/** operatorAdd adds one public key, labelled `name`, to every selected capsule. Idempotent for the same key. */
export async function operatorAdd(s: Session, name: string, publicKeyFile: string): Promise<void> {
  if (!name.trim()) throw invalidArgument("NAME", "must not be empty");
  let text: string;
  try {
    text = await readFile(publicKeyFile, "utf8");
  } catch (e) {
    throw invalidArgument("--public-key-file", `${publicKeyFile}: ${(e as Error).message}`);
  }
  const jwk = parsePublicKey(text, publicKeyFile);
  const operator = { id: await jwkThumbprint(jwk), name, publicKeyJwk: JSON.stringify(jwk) };
  const view: View<Operator__Output, Operator__Output> = { rows: (v) => [v], columns: OPERATOR_COLUMNS };
  await s.rpcAndShow("AddOperator", () => ({ operator }), view);
}

/**
 * operatorRemove removes the key `id` from every selected capsule. Idempotent: a key that is
 * not there shows as "not present". The capsule refuses to remove its last key.
 */
export async function operatorRemove(s: Session, id: string): Promise<void> {
  if (!id.trim()) throw invalidArgument("ID", "must not be empty");
  const view: View<RemoveOperatorResponse__Output, { id: string; removed: boolean }> = {
    rows: (v) => [{ id, removed: v.removed }],
    columns: [
      { header: "ID", get: (r) => r.id },
      { header: "RESULT", get: (r) => (r.removed ? "removed" : "not present") },
    ],
  };
  await s.rpcAndShow("RemoveOperator", () => ({ id }), view);
}

/**
 * operatorWhoami prints this operator's key id, name and public JWK, creating the key on
 * first need. Its `-o json` output is what `operator add --public-key-file` takes.
 */
export async function operatorWhoami(s: Session): Promise<void> {
  const { signer, created } = await loadOrCreateOperatorKey(s.configDir);
  if (created) s.err(`created operator key in ${s.configDir}\n`);
  const me = {
    id: signer.kid,
    name: defaultOperatorName(s.io.env),
    publicKeyJwk: JSON.stringify(signer.publicJwk),
  };
  s.print(me, () =>
    renderKeyValues([
      ["ID", me.id],
      ["Name", me.name],
      ["Public key", me.publicKeyJwk],
    ]),
  );
}
