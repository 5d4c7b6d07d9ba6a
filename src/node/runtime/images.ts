/**
 * Images: the capsule's image store, containerd's content store in our namespace, filled from
 * archives (`capsulectl image push ARCHIVE.tar`): an OCI image layout tar or a `docker save`
 * tar, or pulled by reference from a registry the capsule can reach (`capsulectl image pull`).
 *
 * An archive is read before it is imported (`tar -t`, then its index.json or manifest.json) so
 * a bad one is rejected with a clear error before anything changes, and so we know the names
 * it will create: ctr names an OCI image after its index annotation as written and a docker
 * one after its RepoTags normalized ("demo/httpd:1" becomes "docker.io/demo/httpd:1"). Lookups
 * by reference therefore compare normalized forms on both sides (see {@link normalizeRef}).
 */
import { CapsuleError, ErrorCode, invalidArgument } from "../../errors.js";
import type { CommandRunner } from "../host/runner.js";
import { type CtrEndpoint, ctrArgv, ctrError, ctrMessage, parseHumanBytes, parseTable } from "./ctr.js";

/** ImageInfo is one image in the store. */
export interface ImageInfo {
  /** name is the reference as stored ("demo/httpd:1", "docker.io/library/nginx:1.27"). */
  name: string;
  /** digest is the image's target (manifest or index) digest, "sha256:...". */
  digest: string;
  /** size is the image's size for this platform in bytes, to ctr's printed precision (3 digits). */
  size: number;
  mediaType: string;
  /** platforms the image has content for ("linux/amd64"). */
  platforms: string[];
}

/** ArchiveFormat is what {@link inspectArchive} recognised. */
export type ArchiveFormat = "oci" | "docker";

/** ArchiveContents is what an archive will import: its format and the image names it carries. */
export interface ArchiveContents {
  format: ArchiveFormat;
  /** names are the references the images will be stored under, as ctr stores them. */
  names: string[];
}

const OCI_REF_NAME = "org.opencontainers.image.ref.name";
const CONTAINERD_NAME = "io.containerd.image.name";

/**
 * normalizeRef spells a reference the way Docker does (pure): a registry-less name gets
 * "docker.io/", a single-component Docker Hub name gets "library/", a missing tag (and no
 * digest) becomes ":latest". "demo/httpd:1" and "docker.io/demo/httpd:1" normalize alike.
 */
export function normalizeRef(ref: string): string {
  let name = ref;
  let suffix = "";
  const at = name.indexOf("@");
  if (at >= 0) {
    suffix = name.slice(at);
    name = name.slice(0, at);
  }
  const colon = name.lastIndexOf(":");
  if (colon > name.lastIndexOf("/")) {
    suffix = name.slice(colon) + suffix;
    name = name.slice(0, colon);
  } else if (!suffix) {
    suffix = ":latest";
  }
  const first = name.split("/")[0] ?? "";
  const hasRegistry =
    name.includes("/") && (first.includes(".") || first.includes(":") || first === "localhost");
  if (!hasRegistry) name = `docker.io/${name}`;
  if (/^docker\.io\/[^/]+$/.test(name)) name = name.replace("docker.io/", "docker.io/library/");
  return name + suffix;
}

const REF =
  /^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?::\d+)?(?:\/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*(?::[\w][\w.-]{0,127})?(?:@sha256:[0-9a-f]{64})?$/;

/** isValidRef reports whether `ref` is a well-formed image reference ("demo/httpd:1", "host:5000/a/b@sha256:..."). */
export function isValidRef(ref: string): boolean {
  return ref.length <= 255 && REF.test(ref);
}

/** stripDot turns a tar member name into a path relative to the archive root ("./index.json" -> "index.json"). */
const stripDot = (m: string) => m.replace(/^(\.\/)+/, "");

/**
 * archiveFormat decides an archive's format from its member list (pure): a manifest.json means
 * `docker save` (ctr reads that first; recent Docker writes an OCI index beside it), else an
 * index.json with an oci-layout file means an OCI layout. Returns the member to read the
 * names from, as tar lists it.
 */
export function archiveFormat(
  members: readonly string[],
): { format: ArchiveFormat; member: string } | undefined {
  const find = (n: string) => members.find((m) => stripDot(m) === n);
  const manifest = find("manifest.json");
  if (manifest) return { format: "docker", member: manifest };
  const index = find("index.json");
  if (index && find("oci-layout")) return { format: "oci", member: index };
  return undefined;
}

/**
 * archiveNames lists the names ctr will store an archive's images under (pure), from its
 * index.json (OCI: the `io.containerd.image.name` annotation, else a full reference in
 * `org.opencontainers.image.ref.name`; a tag-only ref name gives no usable name) or
 * manifest.json (docker: RepoTags, normalized). Throws CAPSULE_INVALID_ARGUMENT when the file
 * is not what the format says.
 */
export function archiveNames(format: ArchiveFormat, json: string): string[] {
  let doc: unknown;
  try {
    doc = JSON.parse(json);
  } catch {
    throw invalidArgument("archive", `its ${format === "oci" ? "index.json" : "manifest.json"} is not JSON`);
  }
  const names: string[] = [];
  if (format === "docker") {
    if (!Array.isArray(doc)) throw invalidArgument("archive", "its manifest.json is not a list of images");
    for (const m of doc as { RepoTags?: unknown }[])
      for (const t of Array.isArray(m?.RepoTags) ? m.RepoTags : [])
        if (typeof t === "string" && isValidRef(t)) names.push(normalizeRef(t));
  } else {
    const manifests = (doc as { manifests?: unknown })?.manifests;
    if (!Array.isArray(manifests)) throw invalidArgument("archive", "its index.json has no manifests list");
    for (const m of manifests as { annotations?: Record<string, unknown> }[]) {
      const a = m?.annotations ?? {};
      const full = a[CONTAINERD_NAME];
      const ref = a[OCI_REF_NAME];
      if (typeof full === "string" && isValidRef(full)) names.push(full);
      else if (typeof ref === "string" && /[/:@]/.test(ref) && isValidRef(ref)) names.push(ref);
    }
  }
  return [...new Set(names)];
}

/** parseImageList reads `ctr images ls` (pure). */
export function parseImageList(text: string): ImageInfo[] {
  return parseTable(text).map((r) => ({
    name: r["REF"] ?? "",
    digest: r["DIGEST"] ?? "",
    size: parseHumanBytes(r["SIZE"] ?? "") ?? 0,
    mediaType: r["TYPE"] ?? "",
    platforms: (r["PLATFORMS"] ?? "").split(",").filter((p) => p && p !== "-"),
  }));
}

/** findImage returns the image `ref` names (pure): an exact name, else one whose normalized form matches. */
export function findImage(images: readonly ImageInfo[], ref: string): ImageInfo | undefined {
  const exact = images.find((i) => i.name === ref);
  if (exact) return exact;
  const want = normalizeRef(ref);
  return images.find((i) => normalizeRef(i.name) === want);
}

/** ImagesOptions: `runner` and `endpoint` are required; `importTimeoutMs` is optional (unset = 600000). */
export interface ImagesOptions {
  runner: CommandRunner;
  endpoint: CtrEndpoint;
  importTimeoutMs?: number;
}

const ARCHIVE_HINT =
  "push an OCI layout tar (skopeo copy ... oci-archive:FILE.tar:NAME:TAG) or a docker save tar (docker save NAME:TAG -o FILE.tar)";

/** Images is the capsule's image store: import archives, list, look up, remove. */
export class Images {
  private readonly runner: CommandRunner;
  private readonly ep: CtrEndpoint;
  private readonly importTimeoutMs: number;

  constructor(opts: ImagesOptions) {
    this.runner = opts.runner;
    this.ep = opts.endpoint;
    this.importTimeoutMs = opts.importTimeoutMs ?? 600_000;
  }

  /**
   * inspectArchive reads an archive's format and image names without importing anything
   * (`tar -tf`, then `tar -xOf` of its index.json or manifest.json). Read-only. Throws
   * CAPSULE_NOT_FOUND when the file does not exist, CAPSULE_INVALID_ARGUMENT when it is not a
   * tar, not an image archive, or names no image.
   */
  async inspectArchive(archive: string): Promise<ArchiveContents> {
    const exists = await this.runner.run(["test", "-f", archive], { allowFailure: true });
    if (exists.exitCode !== 0) {
      throw new CapsuleError(ErrorCode.NotFound, `archive ${archive} does not exist`, {
        hint: "give the path of a .tar file on the capsule",
      });
    }
    const list = await this.runner.run(["tar", "-tf", archive], {
      allowFailure: true,
      timeoutMs: this.importTimeoutMs,
    });
    if (list.exitCode !== 0) {
      throw new CapsuleError(ErrorCode.InvalidArgument, `${archive} is not a tar archive`, {
        hint: ARCHIVE_HINT,
        details: { stderr: list.stderr.trim() },
      });
    }
    const f = archiveFormat(list.stdout.split("\n").filter(Boolean));
    if (!f) {
      throw new CapsuleError(
        ErrorCode.InvalidArgument,
        `${archive} is a tar but not an image archive (no index.json with oci-layout, no manifest.json)`,
        { hint: ARCHIVE_HINT },
      );
    }
    const json = await this.runner.run(["tar", "-xOf", archive, f.member], {
      timeoutMs: this.importTimeoutMs,
    });
    const names = archiveNames(f.format, json.stdout);
    if (names.length === 0) {
      throw new CapsuleError(ErrorCode.InvalidArgument, `${archive} names no image`, {
        hint:
          f.format === "oci"
            ? `annotate its index.json entry with ${OCI_REF_NAME} set to a full reference (NAME:TAG), not a bare tag`
            : "save it by name (docker save NAME:TAG), not by image id",
      });
    }
    return { format: f.format, names };
  }

  /**
   * import adds an archive's images to the store and returns them. Validates first (see
   * {@link inspectArchive}); nothing is imported from a bad archive. Idempotent: content is
   * stored by digest, so importing the same archive again changes nothing; an archive that
   * reuses a name moves the name to its image (containers made from the old one keep it).
   * Images are unpacked into the endpoint's snapshotter, for this host's platform only.
   */
  async import(archive: string): Promise<ImageInfo[]> {
    const contents = await this.inspectArchive(archive);
    const argv = ctrArgv(this.ep, "images", "import", "--snapshotter", this.ep.snapshotter, archive);
    const r = await this.runner.run(argv, { allowFailure: true, timeoutMs: this.importTimeoutMs });
    if (r.exitCode !== 0) {
      const err = ctrError(argv, r);
      if (err.code === ErrorCode.Unreachable) throw err;
      throw new CapsuleError(
        ErrorCode.InvalidArgument,
        `import of ${archive} failed: ${ctrMessage(r.stderr) ?? "?"}`,
        {
          hint: ARCHIVE_HINT,
          cause: err,
        },
      );
    }
    const all = await this.list();
    const out: ImageInfo[] = [];
    for (const n of contents.names) {
      const img = all.find((i) => i.name === n);
      if (!img) {
        throw new CapsuleError(ErrorCode.InvalidArgument, `${archive}: image ${n} was not imported`, {
          hint: "the archive may hold no image for this capsule's platform",
        });
      }
      out.push(img);
    }
    return out;
  }

  /**
   * pull fetches `ref` from its registry into the store (unpacked into the endpoint's
   * snapshotter, this host's platform only) and returns it. `plainHttp` allows a registry
   * without TLS (a LAN registry). Idempotent: content is stored by digest. Throws
   * CAPSULE_INVALID_ARGUMENT for a malformed reference, CAPSULE_NOT_FOUND when the registry has
   * no such image, CAPSULE_PERMISSION_DENIED when it wants credentials, CAPSULE_UNREACHABLE when
   * it cannot be reached, CAPSULE_TIMEOUT when the pull outlasts `importTimeoutMs`; no image is
   * named on failure.
   */
  async pull(ref: string, opts: { plainHttp?: boolean } = {}): Promise<ImageInfo> {
    if (!isValidRef(ref))
      throw invalidArgument(
        "ref",
        `"${redactRef(ref)}" is not an image reference`,
        "use [REGISTRY/]NAME:TAG (no scheme, no credentials)",
      );
    const full = normalizeRef(ref);
    const argv = ctrArgv(
      this.ep,
      "images",
      "pull",
      "--snapshotter",
      this.ep.snapshotter,
      ...(opts.plainHttp ? ["--plain-http"] : []),
      full,
    );
    const r = await this.runner.run(argv, { allowFailure: true, timeoutMs: this.importTimeoutMs });
    if (r.exitCode !== 0) throw pullError(ref, full, argv, r, this.importTimeoutMs);
    const img = await this.get(full);
    if (!img) throw new CapsuleError(ErrorCode.Internal, `pulled ${full} but the store does not list it`);
    return img;
  }

  /** list returns every image in the store, sorted by name. Read-only. */
  async list(): Promise<ImageInfo[]> {
    const argv = ctrArgv(this.ep, "images", "ls");
    const r = await this.runner.run(argv, { allowFailure: true });
    if (r.exitCode !== 0) throw ctrError(argv, r);
    return parseImageList(r.stdout).sort((a, b) => a.name.localeCompare(b.name));
  }

  /** get returns the image `ref` names (exactly, else by normalized reference), or undefined. Read-only. */
  async get(ref: string): Promise<ImageInfo | undefined> {
    return findImage(await this.list(), ref);
  }

  /** has reports whether the store has the image `ref` names. Read-only. */
  async has(ref: string): Promise<boolean> {
    return (await this.get(ref)) !== undefined;
  }

  /**
   * resolve returns the stored image `ref` names. Read-only. Throws CAPSULE_INVALID_ARGUMENT for
   * a malformed reference, CAPSULE_NOT_FOUND (with the push command as hint) for an unknown one.
   */
  async resolve(ref: string): Promise<ImageInfo> {
    if (!isValidRef(ref))
      throw invalidArgument("image", `"${ref}" is not an image reference`, "use NAME:TAG");
    const img = await this.get(ref);
    if (!img) {
      throw new CapsuleError(ErrorCode.NotFound, `image ${ref} is not in this capsule's image store`, {
        hint: "push it first: capsulectl image push ARCHIVE.tar (see capsulectl image list)",
        details: { image: ref },
      });
    }
    return img;
  }

  /** remove deletes the name `ref` resolves to; content no other name uses is garbage-collected. Idempotent: false when absent. */
  async remove(ref: string): Promise<boolean> {
    const img = await this.get(ref);
    if (!img) return false;
    const argv = ctrArgv(this.ep, "images", "rm", "--sync", img.name);
    const r = await this.runner.run(argv, { allowFailure: true });
    if (r.exitCode !== 0) throw ctrError(argv, r);
    return true;
  }
}

/** registryOf is the registry host of a normalized reference ("docker.io/library/x:1" -> "docker.io"). Pure. */
export function registryOf(full: string): string {
  return full.split("/")[0] ?? full;
}

/**
 * redactRef hides credentials someone put in a reference ("https://user:pw@reg/x:1",
 * "user:pw@reg/x:1" -> "***@reg/x:1") so an error never echoes them. Pure.
 */
export function redactRef(ref: string): string {
  return ref.replace(/^((?:[a-z][a-z0-9+.-]*:\/\/)?)[^/@\s]*@(?=[^/]*\/)/i, "$1***@");
}

/** pullError maps a failed `ctr images pull` to one line naming the image and its registry, with a hint. */
function pullError(
  ref: string,
  full: string,
  argv: string[],
  r: { exitCode: number; stdout: string; stderr: string },
  timeoutMs: number,
): CapsuleError {
  const cause = ctrError(argv, r);
  // The runner reports a process it killed (our timeout) as exit code -1, with no ctr message.
  if (r.exitCode < 0)
    return new CapsuleError(
      ErrorCode.Timeout,
      `pull of ${ref} from registry ${registryOf(full)} did not finish within ${Math.round(timeoutMs / 1000)} s`,
      {
        hint: "check the registry's speed from this capsule; or push an archive: capsulectl image push",
        cause,
      },
    );
  const why = ctrMessage(r.stderr) ?? r.stderr.trim().split("\n").pop() ?? "?";
  // ctrError reads any "connection refused" as containerd's; a registry's names its URL or host.
  if (cause.code === ErrorCode.Unreachable && !/resolve reference|dial tcp|https?:\/\//.test(why))
    return cause;
  const registry = registryOf(full);
  if (/not found|manifest unknown|404/i.test(why))
    return new CapsuleError(ErrorCode.NotFound, `image ${ref} is not in registry ${registry}`, {
      hint: "check the name and tag",
      cause,
    });
  if (/unauthorized|401|403|denied|authorization/i.test(why))
    return new CapsuleError(
      ErrorCode.PermissionDenied,
      `registry ${registry} refused ${ref}: it wants credentials`,
      {
        hint: "push the image as an archive instead: capsulectl image push ARCHIVE.tar",
        cause,
      },
    );
  if (/http: server gave HTTP response to HTTPS client/i.test(why))
    return new CapsuleError(ErrorCode.FailedPrecondition, `registry ${registry} speaks plain HTTP`, {
      hint: "add --plain-http for a LAN registry without TLS",
      cause,
    });
  if (
    /connection refused|no such host|i\/o timeout|dial tcp|network is unreachable|no route to host|timeout/i.test(
      why,
    )
  )
    return new CapsuleError(
      ErrorCode.Unreachable,
      `registry ${registry} cannot be reached from this capsule: ${why}`,
      {
        hint: "check the registry address and the capsule's network; or push an archive: capsulectl image push",
        cause,
      },
    );
  return new CapsuleError(ErrorCode.CommandFailed, `pull of ${ref} failed: ${why}`, { cause });
}
