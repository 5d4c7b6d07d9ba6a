import { release } from "node:os";
import type { CapsuleHandlers } from "../../gen/capsule/v1/Capsule.js";
import type { ClaimRequest__Output } from "../../gen/capsule/v1/ClaimRequest.js";
import type { ClaimResponse } from "../../gen/capsule/v1/ClaimResponse.js";
import type { InfoResponse } from "../../gen/capsule/v1/InfoResponse.js";
import type { Operator } from "../../gen/capsule/v1/Operator.js";
import { jwkThumbprint, publicKeyFromJwk } from "../../api/token.js";
import { CapsuleError, ErrorCode, invalidArgument } from "../../errors.js";
import type { Authenticator } from "../auth.js";
import type { ClaimWindow } from "../claim.js";
import type { Clock } from "../host/clock.js";
import type { Identity } from "../identity.js";
import type { OperatorRow, Store } from "../store/store.js";
import { type RpcDeps, unary } from "./rpc.js";

/** CapsuleServiceDeps are the collaborators of the Capsule service. */
export interface CapsuleServiceDeps extends RpcDeps {
  store: Store;
  clock: Clock;
  identity: Identity;
  claim: ClaimWindow;
  auth: Authenticator;
  name: string;
  version: string;
  startedAt: number;
  /** fabric reports the fabric address and WireGuard mode once the fabric exists (optional). */
  fabric?: () => { address: string; wireguardMode: string };
  /** edgeAddress is the public address when this capsule is an edge, "" otherwise (optional). */
  edgeAddress?: string;
  /** vmAccel reports the microVM accelerator detected at start ("" until probed; optional). */
  vmAccel?: () => string;
}

const SVC = "/capsule.v1.Capsule";

function toOperator(row: OperatorRow): Operator {
  return {
    id: row.id,
    name: row.name,
    publicKeyJwk: row.publicKeyJwk,
    addedAt: row.addedAt,
    addedBy: row.addedBy,
  };
}

async function parseOperator(
  op: { name?: string; publicKeyJwk?: string; id?: string } | null,
): Promise<{ id: string; name: string; jwk: string }> {
  if (!op) throw invalidArgument("operator", "missing");
  const name = (op.name ?? "").trim();
  if (!/^[\w.@+-]{1,64}$/.test(name)) {
    throw invalidArgument(
      "operator.name",
      `"${name}" is not a valid name`,
      "use 1-64 letters, digits and . @ + - _",
    );
  }
  let key: ReturnType<typeof publicKeyFromJwk>;
  try {
    key = publicKeyFromJwk(op.publicKeyJwk ?? "");
  } catch (e) {
    throw invalidArgument(
      "operator.publicKeyJwk",
      (e as Error).message,
      "pass the operator's Ed25519 public JWK",
    );
  }
  const jwk = key.export({ format: "jwk" });
  const id = await jwkThumbprint(jwk as never);
  if (op.id && op.id !== id) throw invalidArgument("operator.id", "does not match the key's thumbprint");
  return { id, name, jwk: JSON.stringify(jwk) };
}

/** capsuleService builds the handlers of capsule.v1.Capsule. */
export function capsuleService(d: CapsuleServiceDeps): CapsuleHandlers {
  return {
    Info: unary(d, `${SVC}/Info`, (): InfoResponse => {
      const closes = d.claim.closesAt();
      const fabric = d.fabric?.() ?? { address: "", wireguardMode: "" };
      return {
        name: d.name,
        id: d.identity.id,
        version: d.version,
        fabricAddress: fabric.address,
        uptimeSeconds: (d.clock.now() - d.startedAt) / 1000,
        kernel: release(),
        wireguardMode: fabric.wireguardMode,
        edgeAddress: d.edgeAddress ?? "",
        vmAccel: d.vmAccel?.() ?? "",
        fingerprint: d.identity.fingerprint,
        claimOpen: closes !== undefined,
        claimClosesAt: closes === undefined ? "" : new Date(closes).toISOString(),
        operatorCount: d.store.operatorCount(),
        startedAt: new Date(d.startedAt).toISOString(),
      };
    }),

    Claim: unary(
      d,
      `${SVC}/Claim`,
      async (req: ClaimRequest__Output): Promise<ClaimResponse> => {
        d.claim.assertOpen();
        const op = await parseOperator(req.operator);
        await d.auth.verifyClaimProof(req.proof, publicKeyFromJwk(op.jwk), op.id);
        d.store.tx(() => {
          d.claim.assertOpen(); // re-checked inside the transaction: two racing claims, one wins
          d.store.putOperator({
            id: op.id,
            name: op.name,
            publicKeyJwk: op.jwk,
            addedAt: new Date(d.clock.now()).toISOString(),
            addedBy: "claim",
          });
          d.claim.close();
        });
        d.log.info({ operator: op.id, name: op.name }, "claimed by operator");
        return { id: d.identity.id, name: d.name, fingerprint: d.identity.fingerprint };
      },
      { public: true },
    ),

    ListOperators: unary(d, `${SVC}/ListOperators`, () => ({
      operators: d.store.listOperators().map(toOperator),
    })),

    AddOperator: unary(d, `${SVC}/AddOperator`, async (req: { operator: Operator | null }, ctx) => {
      const op = await parseOperator(req.operator);
      const row = d.store.tx(() =>
        d.store.putOperator({
          id: op.id,
          name: op.name,
          publicKeyJwk: op.jwk,
          addedAt: new Date(d.clock.now()).toISOString(),
          addedBy: ctx.principal?.id ?? "",
        }),
      );
      return toOperator(row);
    }),

    RemoveOperator: unary(d, `${SVC}/RemoveOperator`, (req: { id: string }) =>
      d.store.tx(() => {
        if (!d.store.getOperator(req.id)) {
          throw new CapsuleError(ErrorCode.NotFound, `no operator ${req.id}`, {
            hint: "see capsulectl operator list",
          });
        }
        if (d.store.operatorCount() <= 1) {
          throw new CapsuleError(ErrorCode.FailedPrecondition, "refusing to remove the last operator key", {
            hint: "add another operator first (capsulectl operator add), or the capsule would be locked for good",
          });
        }
        return { removed: d.store.deleteOperator(req.id) };
      }),
    ),
  };
}
