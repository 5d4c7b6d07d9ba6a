import { existsSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";
import type { ProtoGrpcType as CapsuleProto } from "../gen/capsule.js";
import type { ProtoGrpcType as EdgeProto } from "../gen/edge.js";
import type { ProtoGrpcType as FabricProto } from "../gen/fabric.js";
import type { ProtoGrpcType as PolicyProto } from "../gen/policy.js";
import type { ProtoGrpcType as WorkloadsProto } from "../gen/workloads.js";

/** ProtoGrpcType is every Capsule service, typed from the generated definitions. */
export type ProtoGrpcType = CapsuleProto & FabricProto & WorkloadsProto & PolicyProto & EdgeProto;

/** PROTO_DIR is the repository's proto/ folder (the same from src/ under ts-node and from dist/src/). */
export const PROTO_DIR = findProtoDir();

function findProtoDir(): string {
  // Walk up to the directory that holds package.json: ../.. from src/api, ../../.. from dist/src/api.
  let dir = dirname(fileURLToPath(import.meta.url));
  while (dir !== dirname(dir)) {
    if (existsSync(join(dir, "package.json")) && existsSync(join(dir, "proto"))) return join(dir, "proto");
    dir = dirname(dir);
  }
  throw new Error("capsule: cannot find proto/ above " + fileURLToPath(import.meta.url));
}

const LOADER_OPTIONS: protoLoader.Options = {
  keepCase: false,
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
  includeDirs: [PROTO_DIR],
};

let cached: ProtoGrpcType | undefined;

/** loadProto loads (once) and returns the typed package definition of every Capsule service. */
export function loadProto(): ProtoGrpcType {
  if (!cached) {
    const def = protoLoader.loadSync(
      [
        "capsule/v1/capsule.proto",
        "capsule/v1/fabric.proto",
        "capsule/v1/workloads.proto",
        "capsule/v1/policy.proto",
        "capsule/v1/edge.proto",
      ],
      LOADER_OPTIONS,
    );
    cached = grpc.loadPackageDefinition(def) as unknown as ProtoGrpcType;
  }
  return cached;
}

// The decoded (output) message types, re-exported so clients of the API need not reach into
// the generated src/gen tree. With `defaults: true` every field of an __Output type is set.
export type { ClaimResponse__Output } from "../gen/capsule/v1/ClaimResponse.js";
export type { InfoResponse__Output } from "../gen/capsule/v1/InfoResponse.js";
export type { ListOperatorsResponse__Output } from "../gen/capsule/v1/ListOperatorsResponse.js";
export type { Operator, Operator__Output } from "../gen/capsule/v1/Operator.js";
export type { RemoveOperatorResponse__Output } from "../gen/capsule/v1/RemoveOperatorResponse.js";
