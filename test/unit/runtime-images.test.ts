// The image store over a FakeRunner: reference normalization, archive inspection (format, names),
// the import flow's exact commands, and the errors for bad archives and unknown images.
import t from "tap";
import { FakeRunner, type RunResult } from "../../src/node/host/runner.js";
import type { CtrEndpoint } from "../../src/node/runtime/ctr.js";
import {
  archiveFormat,
  archiveNames,
  findImage,
  type ImageInfo,
  Images,
  isValidRef,
  normalizeRef,
  parseImageList,
  redactRef,
} from "../../src/node/runtime/images.js";

const EP: CtrEndpoint = { address: "/s/containerd.sock", namespace: "capsule", snapshotter: "native" };
const CTR = "ctr -a /s/containerd.sock -n capsule";
const D1 = `sha256:${"1".repeat(64)}`;

t.test("normalizeRef spells references as Docker does", async (t) => {
  const cases: [string, string][] = [
    ["demo/httpd:1", "docker.io/demo/httpd:1"],
    ["docker.io/demo/httpd:1", "docker.io/demo/httpd:1"],
    ["busybox", "docker.io/library/busybox:latest"],
    ["busybox:1.36", "docker.io/library/busybox:1.36"],
    ["library/busybox", "docker.io/library/busybox:latest"],
    ["ghcr.io/a/b:2", "ghcr.io/a/b:2"],
    ["localhost:5000/a", "localhost:5000/a:latest"],
    ["localhost/a:1", "localhost/a:1"],
    [`demo/httpd@${D1}`, `docker.io/demo/httpd@${D1}`],
    [`demo/httpd:1@${D1}`, `docker.io/demo/httpd:1@${D1}`],
  ];
  for (const [ref, want] of cases) t.equal(normalizeRef(ref), want, ref);
});

t.test("isValidRef", async (t) => {
  for (const ok of ["demo/httpd:1", "busybox", "ghcr.io/a/b-c_d.e:v1.2", "localhost:5000/a/b", `a@${D1}`])
    t.ok(isValidRef(ok), ok);
  for (const bad of ["", "Demo/x", "a b", "a:", "a//b", ":1", "-a", `a@sha256:zz`, "a".repeat(256)])
    t.notOk(isValidRef(bad), bad);
});

t.test("archiveFormat: docker manifest.json wins, OCI needs oci-layout; ./ prefixes are fine", async (t) => {
  t.same(archiveFormat(["oci-layout", "index.json", "blobs/", "blobs/sha256/x"]), {
    format: "oci",
    member: "index.json",
  });
  t.same(archiveFormat(["./", "./oci-layout", "./index.json"]), { format: "oci", member: "./index.json" });
  t.same(archiveFormat(["./manifest.json", "./abc.json", "oci-layout", "index.json"]), {
    format: "docker",
    member: "./manifest.json",
  });
  t.equal(archiveFormat(["index.json"]), undefined, "index.json alone is not a layout");
  t.equal(archiveFormat(["etc/passwd"]), undefined);
});

t.test("archiveNames: what ctr will name the images", async (t) => {
  const idx = (annotations: Record<string, string>[]) =>
    JSON.stringify({ schemaVersion: 2, manifests: annotations.map((a) => ({ digest: D1, annotations: a })) });
  t.same(archiveNames("oci", idx([{ "org.opencontainers.image.ref.name": "demo/httpd:1" }])), [
    "demo/httpd:1",
  ]);
  t.same(
    archiveNames(
      "oci",
      idx([
        {
          "io.containerd.image.name": "docker.io/library/nginx:1.27",
          "org.opencontainers.image.ref.name": "1.27",
        },
      ]),
    ),
    ["docker.io/library/nginx:1.27"],
    "containerd's full name annotation first",
  );
  t.same(
    archiveNames("oci", idx([{ "org.opencontainers.image.ref.name": "latest" }])),
    [],
    "a bare tag names nothing",
  );
  t.same(archiveNames("oci", idx([{}])), []);
  t.same(
    archiveNames("docker", JSON.stringify([{ RepoTags: ["demo/httpd:2", "busybox"] }, { RepoTags: null }])),
    ["docker.io/demo/httpd:2", "docker.io/library/busybox:latest"],
  );
  t.throws(() => archiveNames("oci", "{"), { code: "CAPSULE_INVALID_ARGUMENT", message: /not JSON/ });
  t.throws(() => archiveNames("oci", "{}"), { code: "CAPSULE_INVALID_ARGUMENT" });
  t.throws(() => archiveNames("docker", "{}"), { code: "CAPSULE_INVALID_ARGUMENT" });
});

const LS =
  "REF                    TYPE                                                 DIGEST                                                                  SIZE    PLATFORMS   LABELS \n" +
  `demo/httpd:1           application/vnd.oci.image.manifest.v1+json           ${D1} 1.9 MiB linux/amd64 -      \n` +
  `docker.io/demo/httpd:2 application/vnd.docker.distribution.manifest.v2+json ${D1} 1.9 MiB linux/amd64 -      \n`;

t.test("parseImageList and findImage", async (t) => {
  const list = parseImageList(LS);
  t.same(list[0], {
    name: "demo/httpd:1",
    digest: D1,
    size: Math.round(1.9 * 1024 * 1024),
    mediaType: "application/vnd.oci.image.manifest.v1+json",
    platforms: ["linux/amd64"],
  });
  const find = (ref: string) => findImage(list, ref)?.name;
  t.equal(find("demo/httpd:1"), "demo/httpd:1");
  t.equal(find("docker.io/demo/httpd:1"), "demo/httpd:1");
  t.equal(find("demo/httpd:2"), "docker.io/demo/httpd:2");
  t.equal(find("demo/httpd"), undefined, "no :latest");
});

function store(answers: (c: string) => Partial<RunResult> | undefined) {
  const runner = new FakeRunner();
  runner.on((argv) => answers(argv.join(" ")));
  return { runner, images: new Images({ runner, endpoint: EP }) };
}

const OCI_INDEX = JSON.stringify({
  schemaVersion: 2,
  manifests: [{ digest: D1, annotations: { "org.opencontainers.image.ref.name": "demo/httpd:1" } }],
});

t.test(
  "import: inspect, then ctr import into the endpoint's snapshotter, then the imported images",
  async (t) => {
    let imported = false;
    const { runner, images } = store((c) => {
      if (c === "tar -tf /a/x.tar") return { stdout: "oci-layout\nindex.json\nblobs/\n" };
      if (c === "tar -xOf /a/x.tar index.json") return { stdout: OCI_INDEX };
      if (c.startsWith(`${CTR} images import`)) {
        imported = true;
        return { stdout: `unpacking demo/httpd:1 (${D1})...done\n` };
      }
      if (c === `${CTR} images ls`) return { stdout: imported ? LS : LS.split("\n")[0]! };
      return undefined;
    });
    const got: ImageInfo[] = await images.import("/a/x.tar");
    t.same(
      got.map((i) => i.name),
      ["demo/httpd:1"],
    );
    t.same(runner.commands, [
      "test -f /a/x.tar",
      "tar -tf /a/x.tar",
      "tar -xOf /a/x.tar index.json",
      `${CTR} images import --snapshotter native /a/x.tar`,
      `${CTR} images ls`,
    ]);
  },
);

t.test("import refuses bad archives before changing anything", async (t) => {
  const cases: [
    string,
    (c: string) => Partial<RunResult> | undefined,
    { code: string; message?: RegExp; hint?: RegExp },
  ][] = [
    [
      "missing",
      (c) => (c.startsWith("test -f") ? { exitCode: 1 } : undefined),
      { code: "CAPSULE_NOT_FOUND" },
    ],
    [
      "not a tar",
      (c) =>
        c.startsWith("tar -tf")
          ? { exitCode: 2, stderr: "tar: This does not look like a tar archive\n" }
          : undefined,
      { code: "CAPSULE_INVALID_ARGUMENT", message: /not a tar archive/, hint: /docker save/ },
    ],
    [
      "not an image",
      (c) => (c.startsWith("tar -tf") ? { stdout: "etc/passwd\n" } : undefined),
      { code: "CAPSULE_INVALID_ARGUMENT", message: /not an image archive/ },
    ],
    [
      "unnamed",
      (c) =>
        c.startsWith("tar -tf")
          ? { stdout: "oci-layout\nindex.json\n" }
          : c.startsWith("tar -xOf")
            ? {
                stdout: JSON.stringify({
                  manifests: [{ annotations: { "org.opencontainers.image.ref.name": "1" } }],
                }),
              }
            : undefined,
      { code: "CAPSULE_INVALID_ARGUMENT", message: /names no image/, hint: /ref\.name/ },
    ],
  ];
  for (const [name, answers, want] of cases) {
    const { runner, images } = store(answers);
    await t.rejects(images.import("/a/x.tar"), want, name);
    t.notOk(
      runner.commands.some((c) => c.includes("images import")),
      `${name}: nothing imported`,
    );
  }
});

t.test(
  "import: ctr's failure is CAPSULE_INVALID_ARGUMENT; containerd down is CAPSULE_UNREACHABLE",
  async (t) => {
    const base = (c: string) =>
      c.startsWith("tar -tf")
        ? { stdout: "oci-layout\nindex.json\n" }
        : c.startsWith("tar -xOf")
          ? { stdout: OCI_INDEX }
          : undefined;
    const broken = store((c) =>
      c.includes("images import") ? { exitCode: 1, stderr: "ctr: unexpected EOF\n" } : base(c),
    );
    await t.rejects(broken.images.import("/a/x.tar"), {
      code: "CAPSULE_INVALID_ARGUMENT",
      message: "import of /a/x.tar failed: unexpected EOF",
    });
    const down = store((c) =>
      c.includes("images import")
        ? { exitCode: 1, stderr: 'ctr: failed to dial "/s/containerd.sock": context deadline exceeded\n' }
        : base(c),
    );
    await t.rejects(down.images.import("/a/x.tar"), { code: "CAPSULE_UNREACHABLE" });
    const wrongPlatform = store((c) => (c === `${CTR} images ls` ? { stdout: LS.split("\n")[0]! } : base(c)));
    await t.rejects(wrongPlatform.images.import("/a/x.tar"), {
      message: /was not imported/,
      hint: /platform/,
    });
  },
);

t.test("resolve, has, remove", async (t) => {
  const { runner, images } = store((c) => (c === `${CTR} images ls` ? { stdout: LS } : undefined));
  t.equal((await images.resolve("demo/httpd:2")).name, "docker.io/demo/httpd:2");
  t.equal(await images.has("demo/httpd:1"), true);
  await t.rejects(images.resolve("demo/none:1"), {
    code: "CAPSULE_NOT_FOUND",
    hint: /capsulectl image push/,
  });
  await t.rejects(images.resolve("Bad Ref"), { code: "CAPSULE_INVALID_ARGUMENT" });
  runner.commands.length = 0;
  t.equal(await images.remove("demo/httpd:2"), true);
  t.same(runner.commands, [`${CTR} images ls`, `${CTR} images rm --sync docker.io/demo/httpd:2`]);
  t.equal(await images.remove("demo/none:1"), false);
  t.same(
    (await images.list()).map((i) => i.name),
    ["demo/httpd:1", "docker.io/demo/httpd:2"],
  );
});

t.test(
  "pull: ctr images pull of the normalized reference into the snapshotter, then the image",
  async (t) => {
    let pulled = false;
    const { runner, images } = store((c) => {
      if (c.startsWith(`${CTR} images pull`)) {
        pulled = true;
        return { stdout: "done\n" };
      }
      if (c === `${CTR} images ls`) return { stdout: pulled ? LS : LS.split("\n")[0]! };
      return undefined;
    });
    const got = await images.pull("demo/httpd:2", { plainHttp: true });
    t.equal(got.name, "docker.io/demo/httpd:2");
    t.same(runner.commands, [
      `${CTR} images pull --snapshotter native --plain-http docker.io/demo/httpd:2`,
      `${CTR} images ls`,
    ]);
  },
);

t.test("pull: bad references and registry failures are one clear line each, nothing stored", async (t) => {
  await t.rejects(store(() => undefined).images.pull("Not A Ref"), {
    code: "CAPSULE_INVALID_ARGUMENT",
    message: /ref: "Not A Ref" is not an image reference/,
  });
  const cases: [string, string, { code: string; message: RegExp; hint?: RegExp }][] = [
    [
      "not found",
      'ctr: failed to resolve reference "127.0.0.1:5000/x:9": 127.0.0.1:5000/x:9: not found',
      {
        code: "CAPSULE_NOT_FOUND",
        message: /image 127\.0\.0\.1:5000\/x:9 is not in registry 127\.0\.0\.1:5000/,
      },
    ],
    [
      "unauthorized",
      "ctr: failed to resolve reference: pulling from host r.example failed with status code [manifests 1]: 401 Unauthorized",
      { code: "CAPSULE_PERMISSION_DENIED", message: /wants credentials/ },
    ],
    [
      "plain http",
      'ctr: failed to resolve reference: failed to do request: Head "https://127.0.0.1:5000/v2/x/manifests/9": http: server gave HTTP response to HTTPS client',
      { code: "CAPSULE_FAILED_PRECONDITION", message: /speaks plain HTTP/, hint: /--plain-http/ },
    ],
    [
      "unreachable",
      'ctr: failed to resolve reference: failed to do request: Head "http://127.0.0.1:5999/v2/x/manifests/9": dial tcp 127.0.0.1:5999: connect: connection refused',
      { code: "CAPSULE_UNREACHABLE", message: /registry 127\.0\.0\.1:5999 cannot be reached/ },
    ],
  ];
  for (const [name, stderr, want] of cases) {
    const ref =
      name === "unauthorized"
        ? "r.example/x:1"
        : name === "unreachable"
          ? "127.0.0.1:5999/x:9"
          : "127.0.0.1:5000/x:9";
    const { runner, images } = store((c) =>
      c.startsWith(`${CTR} images pull`) ? { exitCode: 1, stderr } : undefined,
    );
    await t.rejects(images.pull(ref), want, name);
    t.notOk(
      runner.commands.some((c) => c.includes("images ls")),
      `${name}: nothing listed as stored`,
    );
  }
});

t.test("pull: without --plain-http; a digest reference is stored as given", async (t) => {
  const ref = `reg.lan:5000/demo/httpd@${D1}`;
  const w = ref.length + 1;
  const ls =
    `${"REF".padEnd(w)}${"TYPE".padEnd(44)}${"DIGEST".padEnd(72)}SIZE    PLATFORMS   LABELS\n` +
    `${ref.padEnd(w)}${"application/vnd.oci.image.manifest.v1+json".padEnd(44)}${D1} 1.9 MiB linux/amd64 -\n`;
  const { runner, images } = store((c) => (c === `${CTR} images ls` ? { stdout: ls } : undefined));
  t.equal((await images.pull(ref)).name, ref);
  t.same(runner.commands, [`${CTR} images pull --snapshotter native ${ref}`, `${CTR} images ls`]);
});

t.test("pull: a killed pull is one CAPSULE_TIMEOUT line; a bad ref never echoes credentials", async (t) => {
  const { images } = store((c) =>
    c.startsWith(`${CTR} images pull`) ? { exitCode: -1, stdout: "fetching...\n" } : undefined,
  );
  await t.rejects(images.pull("reg.lan/x:1"), {
    code: "CAPSULE_TIMEOUT",
    message: "pull of reg.lan/x:1 from registry reg.lan did not finish within 600 s",
  });
  for (const bad of ["user:s3cret@reg.lan/x:1", "https://user:s3cret@reg.lan/x:1"]) {
    const err = await store(() => undefined)
      .images.pull(bad)
      .catch((e: unknown) => e as Error);
    t.match(
      err,
      { code: "CAPSULE_INVALID_ARGUMENT", message: /^ref: "(https:\/\/)?\*\*\*@reg\.lan\/x:1"/ },
      bad,
    );
    t.notMatch(
      JSON.stringify({ m: (err as Error).message, ...(err as object) }),
      /s3cret/,
      `${bad}: redacted`,
    );
  }
  t.equal(redactRef(`reg.lan/x@${D1}`), `reg.lan/x@${D1}`, "a digest is not credentials");
  t.equal(redactRef(`x@${D1}`), `x@${D1}`);
});
