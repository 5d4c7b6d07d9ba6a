// MicroVM workloads in the lab, end to end through capsuled and capsulectl: a VM (the tiny
// guest of lab/qemu/guest.ts, QEMU under TCG) on homeA with a volume, reached from a container
// on homeB through the fabric once a policy allows it (and not before, nor from another
// container); exec and logs through the guest agent and the serial console; HTTPS and raw TCP
// through the edge with the visitor's address kept; a SIGKILL and restart of homeA's capsuled
// during a request loop (no request fails, the same QEMU process is adopted, no second one);
// a clean stop flushes the volume (read back on the capsule with debugfs) and a start finds the
// file again; delete leaves no QEMU and no TAP.
import { execFileSync } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import t from "tap";
import { labCaRoot } from "../../lab/ca.js";
import { buildGuest } from "../../lab/qemu/guest.js";
import { workloadNetNames } from "../../src/node/runtime/netns.js";
import { ctl, rpc, waitFor } from "../helpers/fabric.js";
import { buildImageArchive, DEFAULT_APPLETS } from "../helpers/images.js";
import { isRoot, killCapsuled, ROOT_SKIP, withLab } from "../helpers/lab.js";
import { waitRuntime } from "../helpers/workloads.js";

const GUEST_DIR = process.env.CAPSULE_GUEST_DIR ?? join(tmpdir(), "capsule-guest");

interface View {
  phase: string;
  address: string;
  pid: number;
  kind: string;
}

/** qemuPids are the pids of every QEMU whose command line names `needle`. */
function qemuPids(needle: string): number[] {
  try {
    return execFileSync("pgrep", ["-f", needle], { encoding: "utf8" })
      .trim()
      .split("\n")
      .filter(Boolean)
      .map(Number);
  } catch {
    return [];
  }
}

if (!isRoot()) {
  t.plan(0, ROOT_SKIP);
} else {
  t.test("microVM: fabric, policy, edge, exec, logs, volumes, restart-safe", async (t) => {
    const guest = await buildGuest(GUEST_DIR);
    const lab = await withLab(t);
    const work = mkdtempSync(join(tmpdir(), "capsule-vm-lab-"));
    t.teardown(() => rmSync(work, { recursive: true, force: true }));
    await ctl(lab, ["fabric", "enroll", "edge", "homeA"]);
    await ctl(lab, ["fabric", "enroll", "edge", "homeB"]);
    await ctl(lab, ["fabric", "enroll", "homeA", "homeB"]);
    await waitRuntime(lab, "homeA");
    await waitRuntime(lab, "homeB");
    const info = await ctl(lab, ["--capsule", "homeA", "capsule", "info", "-o", "json"]);
    t.match(info, /"vmAccel":\s*"(tcg|kvm)"/, "homeA detected an accelerator");

    // The probe containers on homeB, and a volume on homeA.
    const img = await buildImageArchive(work, {
      name: "demo/probe:1",
      applets: [...DEFAULT_APPLETS, "date", "grep"],
    });
    await ctl(lab, ["--capsule", "homeB", "image", "push", img.archive]);
    const sleeper = (name: string) => ({
      kind: "Workload",
      name,
      labels: { app: name },
      container: { image: "demo/probe:1", command: ["sleep", "100000"] },
    });
    const write = (name: string, docs: object[]) => {
      const f = join(work, name);
      writeFileSync(f, docs.map((d) => JSON.stringify(d)).join("\n---\n"));
      return f;
    };
    await ctl(lab, [
      "--capsule",
      "homeB",
      "apply",
      "-f",
      write("probes.json", [sleeper("probe"), sleeper("other")]),
      "--wait",
    ]);
    await ctl(lab, ["--capsule", "homeA", "volume", "create", "vmdata", "--size", "32Mi"]);

    // The VM: apply, then running, then reachable from homeB once allowed.
    const vm = {
      kind: "Workload",
      name: "vm",
      labels: { app: "vm" },
      microvm: { kernel: guest.kernel, initrd: guest.initrd, cpus: 1, memoryMib: 128 },
      ports: [{ port: 8080 }],
      volumes: [{ name: "vmdata", mountPath: "/data" }],
    };
    const t0 = Date.now();
    await ctl(lab, ["--capsule", "homeA", "apply", "-f", write("vm.json", [vm]), "--wait"]);
    const applied = Date.now() - t0;
    const get = () => rpc<View>(lab, "homeA", "Workloads/Get", { name: "vm" });
    const v = await get();
    t.equal(v.kind, "microvm");
    t.match(v.address, /^100\.(6[4-9]|[7-9]\d|1[01]\d|12[0-7])\./, "a fabric address");
    t.ok(v.pid > 0, `QEMU runs (pid ${v.pid})`);
    // busybox nc, not wget: this busybox's wget crashes with -T, and a denied request must time out.
    const GET = `echo -e "GET / HTTP/1.0\\r\\n\\r\\n" | nc -w 3 ${v.address} 8080`;
    const fetch = async (from: string) => {
      const r = await lab.capsulectl(
        ["--capsule", "homeB", "workload", "exec", from, "--", "sh", "-c", GET],
        {
          timeoutMs: 20_000,
        },
      );
      return r.exitCode === 0 ? (r.stdout.split(/\r?\n\r?\n/)[1] ?? "").trim() : "";
    };
    const policy = {
      kind: "Policy",
      name: "probe-to-vm",
      allow: [{ from: { workload: "probe" }, to: { workload: "vm" }, ports: ["8080/tcp"] }],
    };
    const booted = await waitFor(
      async () => /READY|capsule-init/.test(await ctl(lab, ["--capsule", "homeA", "workload", "logs", "vm"])),
      60_000,
      500,
    );
    t.ok(booted >= 0, `the guest booted (console, ${booted} ms after apply returned)`);
    if (booted < 0) {
      const d = join(lab.capsule("homeA").stateDir, "vms", "vm.1");
      for (const f of ["qemu.log", "console.log", "spec.json"])
        t.comment(`--- ${f}\n${execFileSync("tail", ["-c", "3000", join(d, f)], { encoding: "utf8" })}`);
    }
    t.equal(await fetch("probe"), "", "denied before any policy");
    await ctl(lab, ["--capsule", "homeA", "policy", "apply", "-f", write("policy.json", [policy])]);
    const reach = await waitFor(async () => (await fetch("probe")) === "hello from a microvm", 60_000, 250);
    t.ok(
      reach >= 0,
      `probe on homeB reaches the VM through the fabric (apply->reachable ${applied + booted + reach} ms)`,
    );
    t.equal(await fetch("other"), "", "another container on homeB is still denied");

    // exec and logs.
    const uname = await ctl(lab, ["--capsule", "homeA", "workload", "exec", "vm", "--", "uname", "-r"]);
    t.equal(uname.trim(), guest.kernelVersion, "exec runs in the guest");
    const failing = await lab.capsulectl([
      "--capsule",
      "homeA",
      "workload",
      "exec",
      "vm",
      "--",
      "sh",
      "-c",
      "exit 3",
    ]);
    t.equal(failing.exitCode, 3, "exec passes the exit code on");
    const logs = await ctl(lab, ["--capsule", "homeA", "workload", "logs", "vm"]);
    t.match(logs, /capsule-init/, "logs are the serial console");
    await ctl(lab, ["--capsule", "homeA", "workload", "exec", "vm", "--", "sh", "-c", "echo kept > /data/f"]);

    // The edge: HTTPS by name, and raw TCP with the visitor's address.
    const caRoot = labCaRoot(lab.plan.labDir);
    await ctl(lab, [
      "--capsule",
      "homeA",
      "expose",
      "vm",
      "--edge",
      "edge",
      "--host",
      "vm.capsule.test",
      "--port",
      "8080",
    ]);
    const https = await lab.exec(
      "client",
      ["curl", "-sS", "--max-time", "10", "--cacert", caRoot, "https://vm.capsule.test/"],
      { timeoutMs: 30_000 },
    );
    t.equal(https.stdout.trim(), "hello from a microvm", `HTTPS through the edge ${https.stderr}`);
    await ctl(lab, ["--capsule", "homeA", "expose", "vm", "--edge", "edge", "--tcp", "8082:8080"]);
    const tcp = await lab.exec(
      "client",
      ["curl", "-sS", "--max-time", "10", "http://vm.capsule.test:8082/cgi-bin/remote"],
      { timeoutMs: 30_000 },
    );
    t.match(
      tcp.stdout,
      /192\.0\.2\.200/,
      `TCP through the edge keeps the visitor's address (${tcp.stdout.trim()} ${tcp.stderr.trim()})`,
    );

    // capsuled SIGKILLed and restarted under a request loop from homeB.
    const needle = join(lab.capsule("homeA").stateDir, "vms", "sock");
    t.same(qemuPids(needle), [v.pid], "one QEMU for the VM");
    const loop = lab.capsulectl(
      [
        "--capsule",
        "homeB",
        "workload",
        "exec",
        "probe",
        "--",
        "sh",
        "-c",
        `ok=0; bad=0; end=$(($(date +%s)+12)); while [ $(date +%s) -lt $end ]; do if ${GET} | grep -q microvm; then ok=$((ok+1)); else bad=$((bad+1)); fi; done; echo "$ok $bad"`,
      ],
      { timeoutMs: 60_000 },
    );
    await new Promise((r) => setTimeout(r, 2_000));
    await killCapsuled(lab, "homeA");
    await lab.up();
    const [okN, badN] = (await loop).stdout.trim().split(" ").map(Number);
    t.ok((okN ?? 0) > 5, `${okN} requests during the restart`);
    t.equal(badN, 0, "none failed");
    await waitRuntime(lab, "homeA");
    const adopted = await waitFor(async () => (await get()).phase === "running", 20_000, 250);
    t.ok(adopted >= 0, "running after the restart");
    t.equal((await get()).pid, v.pid, "the same QEMU adopted");
    t.same(qemuPids(needle), [v.pid], "no second QEMU");

    // A clean stop flushes the volume; a start finds the file.
    await ctl(lab, ["--capsule", "homeA", "workload", "stop", "vm"]);
    t.same(qemuPids(needle), [], "stopped: QEMU is gone");
    const img2 = join(lab.capsule("homeA").stateDir, "volumes", "vmdata.img");
    const onDisk = execFileSync("debugfs", ["-R", "cat /f", img2], {
      encoding: "utf8",
      stdio: ["ignore", "pipe", "ignore"],
    });
    t.equal(onDisk.trim(), "kept", "the guest's write is on the volume after the stop");
    await ctl(lab, ["--capsule", "homeA", "workload", "start", "vm"]);
    const again = await waitFor(
      async () => {
        const r = await lab.capsulectl([
          "--capsule",
          "homeA",
          "workload",
          "exec",
          "vm",
          "--",
          "cat",
          "/data/f",
        ]);
        return r.stdout.trim() === "kept";
      },
      60_000,
      500,
    );
    t.ok(again >= 0, "the file is there after a start");

    // Delete: no QEMU, no TAP; the edge routes go with unexpose.
    await ctl(lab, ["--capsule", "homeA", "unexpose", "vm", "--edge", "edge", "--host", "vm.capsule.test"]);
    await ctl(lab, ["--capsule", "homeA", "unexpose", "vm", "--edge", "edge", "--tcp", "8082"]);
    await ctl(lab, ["--capsule", "homeA", "workload", "delete", "vm"]);
    t.same(qemuPids(needle), [], "deleted: no QEMU");
    const tap = await lab.exec("homeA", ["ip", "link", "show", "dev", workloadNetNames("vm").hostIface]);
    t.not(tap.exitCode, 0, "deleted: no TAP");
  });
}
