/**
 * dm-clone for the lab's Debian guest kernel, which is built without it (CONFIG_DM_CLONE unset):
 * `dm-clone.ko` compiled out of tree from Debian's `linux-source-6.1` (drivers/md) against the
 * headers of exactly the guest kernel's build. Nothing is installed on the host: the packages
 * (`linux-source-<major.minor>`, `linux-headers-<release>`, `linux-headers-<abi>-common`,
 * `linux-kbuild-<major.minor>`) are fetched with `apt-get download` and unpacked with
 * `dpkg-deb -x` into a scratch dir; only gcc and make come from the host.
 *
 * The module is cached in `<cacheDir>/dm-clone-<release>_<version>.ko`, so the slow part
 * (about 140 MB from the mirror, unpacking drivers/md from the source tarball, compiling) runs
 * once per kernel build.
 */
import { existsSync } from "node:fs";
import { copyFile, mkdir, mkdtemp, readdir, rename, rm, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { type CommandRunner, ExecaRunner } from "../../src/node/host/runner.js";

/** DM_CLONE_OBJS are the objects that make up dm-clone.ko (drivers/md/Makefile). */
export const DM_CLONE_OBJS = ["dm-clone-target.o", "dm-clone-metadata.o"];

/** DM_CLONE_DEPENDS are the in-tree modules dm-clone.ko needs loaded first. */
export const DM_CLONE_DEPENDS = ["dm_mod", "dm_persistent_data"];

/** KernelBuildPackages names the Debian packages a module build for one kernel release needs. */
export interface KernelBuildPackages {
  /** source is the source package's binary ("linux-source-6.1"). */
  source: string;
  /** headers is the flavour's headers ("linux-headers-6.1.0-56-amd64"). */
  headers: string;
  /** common is the flavour-independent headers ("linux-headers-6.1.0-56-common"). */
  common: string;
  /** kbuild carries scripts/ and tools/ ("linux-kbuild-6.1"). */
  kbuild: string;
}

/**
 * kernelBuildPackages maps a Debian kernel release ("6.1.0-56-amd64") to the packages a module
 * build needs. Throws for a release that is not `<major>.<minor>.<n>-<abi>-<flavour>`.
 */
export function kernelBuildPackages(release: string): KernelBuildPackages {
  const m = /^(\d+)\.(\d+)\.\d+-(\d+)-(.+)$/.exec(release);
  if (!m) throw new Error(`kernel release ${release} is not <major>.<minor>.<n>-<abi>-<flavour>`);
  const mm = `${m[1]}.${m[2]}`;
  const abi = `${m[1]}.${m[2]}.0-${m[3]}`;
  return {
    source: `linux-source-${mm}`,
    headers: `linux-headers-${release}`,
    common: `linux-headers-${abi}-common`,
    kbuild: `linux-kbuild-${mm}`,
  };
}

/** dmCloneKbuild is the Kbuild file of the out-of-tree build. */
export function dmCloneKbuild(): string {
  return `obj-m := dm-clone.o\ndm-clone-y := ${DM_CLONE_OBJS.join(" ")}\n`;
}

/**
 * dmCloneTable is a dm-clone table line: `clone <metadata> <destination> <source> <region>`
 * plus feature args (e.g. `no_hydration`) and core args (e.g. `hydration_threshold 1`), see
 * Documentation/admin-guide/device-mapper/dm-clone.rst. `sectors` is the device length.
 */
export function dmCloneTable(opts: {
  sectors: number;
  metadata: string;
  destination: string;
  source: string;
  regionSectors: number;
  features?: string[];
  core?: string[];
}): string {
  const f = opts.features ?? [];
  const c = opts.core ?? [];
  return [
    0,
    opts.sectors,
    "clone",
    opts.metadata,
    opts.destination,
    opts.source,
    opts.regionSectors,
    ...(f.length || c.length ? [f.length, ...f] : []),
    ...(c.length ? [c.length, ...c] : []),
  ].join(" ");
}

/** DmCloneStatus is the parsed `dmsetup status` of a clone device. */
export interface DmCloneStatus {
  /** hydrated and total are the region counts. */
  hydrated: number;
  total: number;
  /** hydrating is the number of regions being copied right now. */
  hydrating: number;
  /** raw is the status line as printed. */
  raw: string;
}

/** parseDmCloneStatus parses `0 <len> clone <mbs> <used>/<total> <rs> <hyd>/<regions> <hydrating> ...`. */
export function parseDmCloneStatus(line: string): DmCloneStatus {
  const w = line.trim().split(/\s+/);
  const i = w.indexOf("clone");
  const regions = w[i + 4]?.split("/");
  if (i < 0 || !regions || regions.length !== 2) throw new Error(`not a dm-clone status: ${line}`);
  return {
    hydrated: Number(regions[0]),
    total: Number(regions[1]),
    hydrating: Number(w[i + 5]),
    raw: line.trim(),
  };
}

/** packageVersion is apt's candidate version of `pkg`; throws when there is none. */
async function packageVersion(host: CommandRunner, pkg: string): Promise<string> {
  const out = (await host.run(["apt-cache", "policy", pkg])).stdout;
  const v = /Candidate:\s*(\S+)/.exec(out)?.[1];
  if (!v || v === "(none)") throw new Error(`${pkg} has no installable version (apt-get update?)`);
  return v;
}

/** BuiltModule is what {@link buildDmClone} produced. */
export interface BuiltModule {
  /** ko is the module's path. */
  ko: string;
  /** cached says whether it existed already. */
  cached: boolean;
  /** buildMs is how long this call took. */
  buildMs: number;
}

/**
 * buildDmClone returns `dm-clone.ko` for kernel `release` whose Debian package version is
 * `version` (the headers, kbuild and source packages must have that same version; an error
 * says which one does not). Cached in `cacheDir`.
 */
export async function buildDmClone(
  cacheDir: string,
  release: string,
  version: string,
  host: CommandRunner = new ExecaRunner(),
): Promise<BuiltModule> {
  const t0 = Date.now();
  const ko = join(cacheDir, `dm-clone-${release}_${version}.ko`.replace(/[^A-Za-z0-9._+-]/g, "_"));
  if (existsSync(ko)) return { ko, cached: true, buildMs: Date.now() - t0 };
  const pkgs = kernelBuildPackages(release);
  for (const p of Object.values(pkgs)) {
    const v = await packageVersion(host, p);
    if (v !== version)
      throw new Error(
        `${p} is at ${v} in the mirror but the guest kernel is ${version}: versions must match`,
      );
  }
  await mkdir(cacheDir, { recursive: true });
  const work = await mkdtemp(join(cacheDir, "dm-clone-build-"));
  try {
    const dl = join(work, "dl");
    const tree = join(work, "tree");
    await mkdir(dl);
    // apt-get download writes into the working directory; _apt cannot write there, hence the sh.
    await host.run(
      [
        "sh",
        "-c",
        'cd "$1" && shift && apt-get download "$@"',
        "sh",
        dl,
        ...Object.values(pkgs).map((p) => `${p}=${version}`),
      ],
      { timeoutMs: 900_000 },
    );
    const debs = await readdir(dl);
    const debOf = (p: string) => {
      const d = debs.find((f) => f.startsWith(`${p}_`));
      if (!d) throw new Error(`apt-get download ${p} wrote no .deb`);
      return join(dl, d);
    };
    for (const p of [pkgs.headers, pkgs.common, pkgs.kbuild])
      await host.run(["dpkg-deb", "-x", debOf(p), tree], { timeoutMs: 300_000 });
    // The flavour's Makefile includes the common one by absolute path; point it into the tree.
    const hdr = join(tree, "usr/src", pkgs.headers);
    await writeFile(join(hdr, "Makefile"), `include ${join(tree, "usr/src", pkgs.common, "Makefile")}\n`);
    // Only drivers/md is needed (dm-clone, dm.h and the persistent-data headers).
    const src = join(work, "src");
    await mkdir(src);
    const top = pkgs.source;
    await host.run(
      [
        "sh",
        "-c",
        'dpkg-deb --fsys-tarfile "$1" | tar -xO "./usr/src/$2.tar.xz" | ' +
          'tar -xJ -C "$3" --strip-components=3 --wildcards "$2/drivers/md/*"',
        "sh",
        debOf(pkgs.source),
        top,
        src,
      ],
      { timeoutMs: 600_000 },
    );
    await rm(join(src, "Makefile"), { force: true });
    await rm(join(src, "Kconfig"), { force: true });
    await writeFile(join(src, "Kbuild"), dmCloneKbuild());
    await host.run(["make", "-C", hdr, `M=${src}`, "modules", "-j2"], { timeoutMs: 900_000 });
    await copyFile(join(src, "dm-clone.ko"), `${ko}.tmp`);
    await rename(`${ko}.tmp`, ko);
  } finally {
    await rm(work, { recursive: true, force: true });
  }
  return { ko, cached: false, buildMs: Date.now() - t0 };
}
