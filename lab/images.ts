/**
 * Tiny container images for the lab, the demo and tests, built from the host's static busybox: one layer holding
 * /bin/busybox, a symlink per applet, /www/index.html and an empty /tmp. No registry, no
 * network: the archive is written here, byte by byte where it matters (digests from
 * node:crypto), and the tars by `tar`.
 *
 * Two archive formats, the two `ctr images import` takes:
 * - "oci": an OCI image layout (oci-layout, index.json, blobs/sha256/...), the image named by
 *   the `org.opencontainers.image.ref.name` annotation on its index entry (a full reference, as
 *   buildah/skopeo write it for `oci-archive:FILE:NAME`).
 * - "docker": a `docker save` archive (manifest.json with RepoTags, <id>.json, <id>/layer.tar).
 */
import { createHash } from "node:crypto";
import { existsSync } from "node:fs";
import { mkdir, mkdtemp, readFile, rm, symlink, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { type CommandRunner, ExecaRunner } from "../src/node/host/runner.js";

/** BUSYBOX is the static busybox the images are built from. */
export const BUSYBOX = "/bin/busybox";

/** DEFAULT_APPLETS are the applets an image gets unless told otherwise. */
export const DEFAULT_APPLETS = [
  "sh",
  "httpd",
  "sleep",
  "nc",
  "echo",
  "cat",
  "ls",
  "wget",
  "env",
  "ip",
  "hostname",
  "true",
  "false",
  "id",
  "ping",
];

/** ociArch maps Node's process.arch to the OCI architecture name ("x64" -> "amd64"). */
export function ociArch(arch: string = process.arch): string {
  return (
    { x64: "amd64", arm64: "arm64", arm: "arm", ia32: "386", ppc64: "ppc64le", s390x: "s390x" } as const
  )[arch as "x64"];
}

/** ImageOptions: `name` is required; everything else is optional. */
export interface ImageOptions {
  /** name is the image reference the archive carries ("demo/httpd:1"). */
  name: string;
  /** format: unset = "oci". */
  format?: "oci" | "docker";
  /** applets become /bin/<applet> -> busybox; unset = {@link DEFAULT_APPLETS}. */
  applets?: string[];
  /** files are extra regular files (path without leading slash -> content); unset = /www/index.html only. */
  files?: Record<string, string>;
  /** cmd is the image's default command; unset = ["sh"]. */
  cmd?: string[];
  /** entrypoint is the image's entrypoint; unset = none. */
  entrypoint?: string[];
  /** env is the image's environment; unset = ["PATH=/bin"]. */
  env?: string[];
  /** architecture: unset = this host's. */
  architecture?: string;
  /**
   * hostBinaries are host executables copied in at the same path, with the shared libraries
   * `ldd` lists for them (e.g. "/usr/bin/openssl" for a workload that serves its own TLS);
   * unset = none.
   */
  hostBinaries?: string[];
}

/** BuiltImage is what {@link buildImageArchive} wrote. */
export interface BuiltImage {
  /** archive is the path of the tar. */
  archive: string;
  name: string;
  /** manifestDigest is the digest of the image manifest ("sha256:..."); empty for "docker" (containerd writes that manifest at import). */
  manifestDigest: string;
  /** size is the sum of the manifest, config and layer sizes in bytes. */
  size: number;
}

const sha256 = (b: Buffer | string) => createHash("sha256").update(b).digest("hex");
const TAR_FLAGS = ["--owner=0", "--group=0", "--numeric-owner", "--mtime=@0", "--sort=name"];

/**
 * buildImageArchive writes an image archive into `dir` (which must exist) and returns its
 * path and digests. Not idempotent in effect (each call writes a new file), deterministic in
 * content: the same options give the same digests. `runner` runs `tar` (unset = a real one).
 */
export async function buildImageArchive(
  dir: string,
  opts: ImageOptions,
  runner: CommandRunner = new ExecaRunner(),
): Promise<BuiltImage> {
  const host = runner;
  if (!existsSync(BUSYBOX)) throw new Error(`${BUSYBOX} is missing (apt-get install busybox-static)`);
  const work = await mkdtemp(join(dir, "img-"));
  try {
    // The layer: a root filesystem tree, tarred without our uid, gid or times.
    const root = join(work, "rootfs");
    await mkdir(join(root, "bin"), { recursive: true });
    await mkdir(join(root, "tmp"), { recursive: true, mode: 0o1777 });
    await writeFile(join(root, "bin/busybox"), await readFile(BUSYBOX), { mode: 0o755 });
    for (const a of opts.applets ?? DEFAULT_APPLETS) await symlink("busybox", join(root, "bin", a));
    const files = opts.files ?? { "www/index.html": "hello from capsule\n" };
    for (const [p, content] of Object.entries(files)) {
      await mkdir(join(root, p, ".."), { recursive: true });
      await writeFile(join(root, p), content);
    }
    for (const bin of opts.hostBinaries ?? []) {
      const ldd = (await host.run(["ldd", bin])).stdout;
      const libs = [...ldd.matchAll(/(?:=>\s*)?(\/\S+)\s+\(0x/g)].map((m) => m[1] as string);
      for (const f of [bin, ...libs]) {
        await mkdir(join(root, f, ".."), { recursive: true });
        await writeFile(join(root, f), await readFile(f), { mode: 0o755 });
      }
    }
    const layerTar = join(work, "layer.tar");
    await host.run(["tar", "-C", root, ...TAR_FLAGS, "-cf", layerTar, "."]);
    const layer = await readFile(layerTar);
    const layerHex = sha256(layer);

    const config = Buffer.from(
      JSON.stringify({
        architecture: opts.architecture ?? ociArch(),
        os: "linux",
        config: {
          Env: opts.env ?? ["PATH=/bin"],
          ...(opts.entrypoint ? { Entrypoint: opts.entrypoint } : {}),
          Cmd: opts.cmd ?? ["sh"],
          WorkingDir: "/",
        },
        rootfs: { type: "layers", diff_ids: [`sha256:${layerHex}`] },
        history: [{ created_by: "capsule lab/images.ts", created: "1970-01-01T00:00:00Z" }],
      }),
    );
    const configHex = sha256(config);
    const out = join(dir, `${opts.name.replace(/[^A-Za-z0-9.-]/g, "_")}.${opts.format ?? "oci"}.tar`);
    const tree = join(work, "archive");
    await mkdir(tree);

    if ((opts.format ?? "oci") === "docker") {
      const id = configHex;
      await writeFile(join(tree, `${id}.json`), config);
      await mkdir(join(tree, layerHex));
      await writeFile(join(tree, layerHex, "layer.tar"), layer);
      await writeFile(
        join(tree, "manifest.json"),
        JSON.stringify([{ Config: `${id}.json`, RepoTags: [opts.name], Layers: [`${layerHex}/layer.tar`] }]),
      );
      await host.run(["tar", "-C", tree, ...TAR_FLAGS, "-cf", out, "."]);
      // docker-save archives carry no manifest blob; containerd makes one (Docker schema 2).
      return { archive: out, name: opts.name, manifestDigest: "", size: config.length + layer.length };
    }

    const manifest = Buffer.from(
      JSON.stringify({
        schemaVersion: 2,
        mediaType: "application/vnd.oci.image.manifest.v1+json",
        config: {
          mediaType: "application/vnd.oci.image.config.v1+json",
          digest: `sha256:${configHex}`,
          size: config.length,
        },
        layers: [
          {
            mediaType: "application/vnd.oci.image.layer.v1.tar",
            digest: `sha256:${layerHex}`,
            size: layer.length,
          },
        ],
      }),
    );
    const manifestHex = sha256(manifest);
    const blobs = join(tree, "blobs", "sha256");
    await mkdir(blobs, { recursive: true });
    await writeFile(join(blobs, layerHex), layer);
    await writeFile(join(blobs, configHex), config);
    await writeFile(join(blobs, manifestHex), manifest);
    await writeFile(join(tree, "oci-layout"), JSON.stringify({ imageLayoutVersion: "1.0.0" }));
    await writeFile(
      join(tree, "index.json"),
      JSON.stringify({
        schemaVersion: 2,
        mediaType: "application/vnd.oci.image.index.v1+json",
        manifests: [
          {
            mediaType: "application/vnd.oci.image.manifest.v1+json",
            digest: `sha256:${manifestHex}`,
            size: manifest.length,
            annotations: { "org.opencontainers.image.ref.name": opts.name },
          },
        ],
      }),
    );
    // Members named "index.json", not "./index.json": what `oci-archive` writers produce.
    await host.run(["tar", "-C", tree, ...TAR_FLAGS, "-cf", out, "oci-layout", "index.json", "blobs"]);
    return {
      archive: out,
      name: opts.name,
      manifestDigest: `sha256:${manifestHex}`,
      size: manifest.length + config.length + layer.length,
    };
  } finally {
    await rm(work, { recursive: true, force: true });
  }
}
