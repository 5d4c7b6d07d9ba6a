// Generates TypeScript types for proto/ with @grpc/proto-loader's generator (src/gen is not committed).
import { execFileSync } from "node:child_process";
import { readdirSync, rmSync, statSync } from "node:fs";
import { join, relative } from "node:path";

function protos(dir) {
  return readdirSync(dir).flatMap((f) => {
    const p = join(dir, f);
    return statSync(p).isDirectory() ? protos(p) : p.endsWith(".proto") ? [p] : [];
  });
}
rmSync("src/gen", { recursive: true, force: true });
const files = protos("proto").map((p) => relative("proto", p));
execFileSync(
  "node_modules/.bin/proto-loader-gen-types",
  [
    "--grpcLib=@grpc/grpc-js",
    "--outDir=src/gen",
    "--longs=String",
    "--enums=String",
    "--defaults",
    "--oneofs",
    "--importFileExtension=.js",
    ...files,
    "-I",
    "proto",
  ],
  { stdio: "inherit" },
);
