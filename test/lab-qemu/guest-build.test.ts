// The guest builder (lab/qemu/guest.ts): a Debian kernel and a busybox initramfs, cached.
// Needs apt (a Debian host with its mirror), cpio and busybox-static; skipped otherwise.
import { existsSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import t from "tap";
import { buildGuest, guestCmdline } from "../../lab/qemu/guest.js";

const OUT = process.env.CAPSULE_GUEST_DIR ?? join(tmpdir(), "capsule-guest");
const missing = ["/usr/bin/apt-get", "/usr/bin/dpkg-deb", "/bin/busybox"].filter((f) => !existsSync(f));

if (missing.length > 0) {
  t.plan(0, `needs ${missing.join(", ")}`);
} else {
  t.test("builds a kernel and an initramfs, then reuses them", async (t) => {
    const a = await buildGuest(OUT);
    t.comment(
      `build ${a.buildMs} ms (cached=${a.cached}), kernel ${a.kernelVersion}, modules ${a.modules.join(" ")}`,
    );
    t.ok(statSync(a.kernel).size > 1_000_000, "kernel is a bzImage-sized file");
    t.ok(statSync(a.initrd).size > 100_000, "initrd written");
    t.match(a.kernelVersion, /^\d+\.\d+\.\d+-\d+-amd64$/);
    t.ok(a.modules.includes("virtio_net") && a.modules.includes("virtio_mmio"), "virtio modules included");
    t.ok(a.modules.indexOf("virtio") < a.modules.indexOf("virtio_net"), "dependencies first");
    const b = await buildGuest(OUT);
    t.comment(`second build ${b.buildMs} ms (cached=${b.cached})`);
    t.equal(b.initrd, a.initrd, "same inputs, same initrd");
    t.ok(b.cached, "second build reused everything");
  });

  t.test("guestCmdline", async (t) => {
    t.match(
      guestCmdline({ ip: "100.64.5.2/32", gw: "169.254.1.1" }),
      /capsule\.ip=100\.64\.5\.2\/32 capsule\.gw=169\.254\.1\.1/,
    );
  });
}
