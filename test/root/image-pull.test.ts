// `capsulectl image pull` against a real registry in the lab: Debian's docker-registry
// (distribution) listening on 127.0.0.1:5000 inside homeA, seeded by pushing a busybox image
// with ctr; the capsule pulls it by reference over plain HTTP and runs a workload from it.
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import t from "tap";
import { containerdPaths } from "../../src/node/runtime/containerd.js";
import { ctl, waitFor } from "../helpers/fabric.js";
import { buildImageArchive } from "../helpers/images.js";
import { isRoot, ROOT_SKIP, withLab } from "../helpers/lab.js";
import { waitRuntime } from "../helpers/workloads.js";

const REF = "127.0.0.1:5000/demo/httpd:1";

if (!isRoot()) {
  t.plan(0, ROOT_SKIP);
} else {
  t.test("image pull by reference from a registry the capsule reaches", async (t) => {
    const lab = await withLab(t);
    const dir = mkdtempSync(join(tmpdir(), "capsule-pull-"));
    t.teardown(() => rmSync(dir, { recursive: true, force: true }));

    // The registry runs in homeA's namespaces with its files under the lab dir: `lab down` stops it.
    const regDir = join(lab.plan.labDir, "registry");
    const cfg = join(lab.plan.labDir, "registry.yml");
    writeFileSync(
      cfg,
      `version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: ${regDir}\nhttp:\n  addr: 127.0.0.1:5000\n`,
    );
    const started = await lab.exec("homeA", [
      "setsid",
      "-f",
      "sh",
      "-c",
      `exec docker-registry serve ${cfg} >${join(lab.plan.labDir, "registry.log")} 2>&1 </dev/null`,
    ]);
    t.equal(started.exitCode, 0, started.stderr);
    const up = await waitFor(
      async () =>
        (await lab.exec("homeA", ["curl", "-sf", "--max-time", "2", "http://127.0.0.1:5000/v2/"]))
          .exitCode === 0,
      15_000,
      100,
    );
    t.ok(up >= 0, `registry answering after ${up} ms`);
    t.ok((await waitRuntime(lab, "homeA")) >= 0, "workload runtime up");

    // Seed the registry with the capsule's own containerd, then forget the image locally.
    const sock = containerdPaths(lab.capsule("homeA").stateDir).address;
    const ctr = (...args: string[]) =>
      lab.exec("homeA", ["ctr", "-a", sock, "-n", "capsule", ...args], { timeoutMs: 60_000 });
    const img = await buildImageArchive(dir, { name: REF });
    for (const args of [
      ["images", "import", img.archive],
      ["images", "push", "--plain-http", REF],
      ["images", "rm", "--sync", REF],
    ]) {
      const r = await ctr(...args);
      t.equal(r.exitCode, 0, `ctr ${args.join(" ")}: ${r.stderr.trim()}`);
    }
    t.notMatch(await ctl(lab, ["--capsule", "homeA", "image", "list"]), /demo\/httpd/, "not in the store");

    const t0 = Date.now();
    const out = await ctl(lab, ["--capsule", "homeA", "image", "pull", REF, "--plain-http"]);
    t.match(out, /127\.0\.0\.1:5000\/demo\/httpd:1\s+sha256:/, `pulled in ${Date.now() - t0} ms`);
    t.match(await ctl(lab, ["--capsule", "homeA", "image", "list"]), /127\.0\.0\.1:5000\/demo\/httpd:1/);

    const wl = join(dir, "web.json");
    writeFileSync(
      wl,
      JSON.stringify({
        kind: "Workload",
        name: "pulled",
        container: { image: REF, command: ["sh", "-c", "echo from the registry; exec sleep 3600"] },
      }),
    );
    t.match(
      await ctl(lab, ["--capsule", "homeA", "apply", "-f", wl, "--wait"]),
      /workload\/pulled running at 100\./,
      "a workload runs from the pulled image",
    );

    const before = await ctl(lab, ["--capsule", "homeA", "-o", "json", "image", "list"]);
    const missing = await lab.capsulectl([
      "--capsule",
      "homeA",
      "image",
      "pull",
      "127.0.0.1:5000/demo/httpd:9",
      "--plain-http",
    ]);
    t.equal(missing.exitCode, 1);
    t.match(missing.stderr, /image 127\.0\.0\.1:5000\/demo\/httpd:9 is not in registry 127\.0\.0\.1:5000/);
    const bad = await lab.capsulectl(["--capsule", "homeA", "image", "pull", "Bad Ref"]);
    t.equal(bad.exitCode, 1);
    t.match(bad.stderr, /ref: "Bad Ref" is not an image reference/);
    for (const r of [missing, bad])
      t.ok(r.stderr.trim().split("\n").length <= 2, `one line and a hint: ${r.stderr.trim()}`);
    t.equal(
      await ctl(lab, ["--capsule", "homeA", "-o", "json", "image", "list"]),
      before,
      "failed pulls change nothing",
    );
  });
}
