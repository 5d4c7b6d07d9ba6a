// Boots the lab guest (lab/qemu/guest.ts) under TCG on QEMU's microvm machine, with the argv of
// src/node/runtime/qemu-plan.ts, in a throwaway network namespace wired like a capsule: the TAP's
// host side has the MAC ee:ee:ee:ee:ee:ee and no IPv4 address (so nothing answers ARP for the
// guest's gateway 169.254.1.1: capsule.gwmac pins it), the namespace's own address
// 100.64.0.1/32 sits on lo, with a route to the guest's 100.64.5.2/32 over the TAP. An ext4
// image is the guest's volume "data" at /data (capsule.vol).
// Then: curl the page and the REMOTE_ADDR CGI; QMP (connectQmp) query-status; qemu-ga
// (guestAgent) ping, exec (output, exit codes, stdin, the pinned neighbour, the mount), a file
// written on the volume; guest-shutdown, after which QEMU must exit by itself within 10 s, the
// image must be unmounted cleanly and the file readable with debugfs. Teardown kills QEMU and
// deletes the namespace even when a step fails.
import { type ChildProcess, spawn } from "node:child_process";
import { existsSync, readFileSync } from "node:fs";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import t from "tap";
import {
  buildGuest,
  GUEST_HTTP_BODY,
  GUEST_HTTP_PORT,
  READY_MARKER,
  tcgClockCmdline,
} from "../../lab/qemu/guest.js";
import { ErrorCode, isCapsuleError } from "../../src/errors.js";
import { ExecaRunner } from "../../src/node/host/runner.js";
import { guestAgent } from "../../src/node/runtime/guest-agent.js";
import { planQemuArgv } from "../../src/node/runtime/qemu-plan.js";
import { connectQmp, type QmpEvent } from "../../src/node/runtime/qmp.js";

const QEMU = "/usr/bin/qemu-system-x86_64";
const OUT = process.env.CAPSULE_GUEST_DIR ?? join(tmpdir(), "capsule-guest");
const NAME = "capq-guest";
const GUEST_IP = "100.64.5.2";
const HOST_IP = "100.64.0.1";
const GATEWAY = "169.254.1.1";
const GATEWAY_MAC = "ee:ee:ee:ee:ee:ee";
const GUEST_MAC = "02:00:64:40:05:02";
const BOOT_TIMEOUT_MS = 120_000;
const STOP_TIMEOUT_MS = 10_000;

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

const alive = (pid: number | undefined) => {
  if (!pid) return false;
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
};

const missing = [QEMU, "/usr/sbin/mkfs.ext4", "/usr/sbin/debugfs", "/usr/sbin/dumpe2fs"].filter(
  (f) => !existsSync(f),
);

if (process.getuid?.() !== 0) {
  t.plan(0, "requires superuser privileges (network namespace, TAP)");
} else if (missing.length > 0) {
  t.plan(0, `${missing.join(", ")} missing (apt-get install qemu-system-x86 e2fsprogs)`);
} else {
  const host = new ExecaRunner();
  const ns = `capq-${process.pid}`;
  let qemu: ChildProcess | undefined;
  let work = "";

  t.teardown(async () => {
    if (qemu?.pid && alive(qemu.pid)) {
      qemu.kill("SIGKILL");
      await sleep(200);
    }
    const pids = (await host.run(["ip", "netns", "pids", ns], { allowFailure: true })).stdout.split(/\s+/);
    for (const p of pids.filter(Boolean)) await host.run(["kill", "-9", p], { allowFailure: true });
    await host.run(["ip", "netns", "del", ns], { allowFailure: true });
    if (work) await rm(work, { recursive: true, force: true });
  });

  t.test(
    "the guest boots under TCG with a volume, serves HTTP, answers QMP and qemu-ga, and stops cleanly",
    async (t) => {
      const g = await buildGuest(OUT);
      t.comment(
        `guest build ${g.buildMs} ms (cached=${g.cached}), kernel ${g.kernelVersion}, qemu-ga=${g.qemuGa}`,
      );
      t.ok(
        g.modules.includes("ext4") && g.modules.includes("jbd2"),
        "ext4 and its modules are in the initramfs",
      );
      work = await mkdtemp(join(tmpdir(), "capq-"));
      const consoleLog = join(work, "console.log");
      const qmpSock = join(work, "qmp.sock");
      const gaSock = join(work, "ga.sock");
      const image = join(work, "data.img");
      await host.run(["truncate", "-s", "32M", image]);
      await host.run(["mkfs.ext4", "-q", "-F", image]);

      await host.run(["ip", "netns", "add", ns]);
      await host.run(["ip", "-n", ns, "link", "set", "lo", "up"]);
      await host.run(["ip", "-n", ns, "addr", "add", `${HOST_IP}/32`, "dev", "lo"]);
      await host.run(["ip", "-n", ns, "tuntap", "add", "dev", "tap0", "mode", "tap"]);
      await host.run(["ip", "-n", ns, "link", "set", "tap0", "address", GATEWAY_MAC]);
      await host.run(["ip", "-n", ns, "link", "set", "tap0", "up"]);
      await host.run(["ip", "-n", ns, "route", "add", `${GUEST_IP}/32`, "dev", "tap0", "src", HOST_IP]);

      const argv = planQemuArgv({
        name: NAME,
        accel: "tcg",
        cpus: 1,
        memoryMib: 128,
        kernel: g.kernel,
        initrd: g.initrd,
        // Quiet console, one UART, and the clock given rather than measured (see tcgClockCmdline).
        cmdline: `quiet loglevel=3 8250.nr_uarts=1 tsc=reliable no_timer_check ${tcgClockCmdline()}`,
        tap: "tap0",
        mac: GUEST_MAC,
        address: GUEST_IP,
        gateway: GATEWAY,
        gatewayMac: GATEWAY_MAC,
        volumes: [{ name: "data", path: image, mountPath: "/data" }],
        qmpSocket: qmpSock,
        gaSocket: gaSock,
        serialLog: consoleLog,
        sandbox: true,
      });
      t.comment(`kernel command line: ${argv[argv.indexOf("-append") + 1]}`);
      const started = Date.now();
      qemu = spawn("ip", ["netns", "exec", ns, QEMU, ...argv.slice(1)], {
        stdio: ["ignore", "ignore", "pipe"],
      });
      let stderr = "";
      qemu.stderr?.on("data", (d: Buffer) => (stderr += d.toString()));
      let exitedAt = 0;
      const exited = new Promise<number | null>((r) =>
        qemu?.once("exit", (code) => {
          exitedAt = Date.now();
          r(code);
        }),
      );

      const con = () => (existsSync(consoleLog) ? readFileSync(consoleLog, "utf8") : "");
      let bootMs = -1;
      while (Date.now() - started < BOOT_TIMEOUT_MS && !exitedAt) {
        if (con().includes(READY_MARKER)) {
          bootMs = Date.now() - started;
          break;
        }
        await sleep(100);
      }
      t.ok(bootMs >= 0, `READY on the console (QEMU start -> READY: ${bootMs} ms)`, {
        console: con().slice(-2000),
        stderr,
      });
      if (bootMs < 0) return;
      t.comment(`boot under TCG (QEMU start -> READY): ${bootMs} ms`);
      t.match(
        con(),
        /capsule-init: volume data: \/dev\/vd[a-z] mounted at \/data \(rw\)/,
        "the volume is mounted",
      );
      t.match(
        con(),
        /capsule-init: eth0 02:00:64:40:05:02 address 100\.64\.5\.2\/32 gateway 169\.254\.1\.1 at ee:ee/,
      );

      const curl = async (path: string, want: string) => {
        let body = "";
        for (let i = 0; i < 20 && body !== want; i++) {
          const r = await host.run(
            [
              "ip",
              "netns",
              "exec",
              ns,
              "curl",
              "-sS",
              "-m",
              "5",
              `http://${GUEST_IP}:${GUEST_HTTP_PORT}${path}`,
            ],
            { allowFailure: true },
          );
          body = r.stdout;
          if (body !== want) await sleep(500);
        }
        return body;
      };
      t.equal(
        await curl("/", GUEST_HTTP_BODY),
        GUEST_HTTP_BODY,
        "curl gets the page (replies go through the pinned gateway MAC)",
      );
      t.equal(
        await curl("/cgi-bin/remote", `${HOST_IP}\n`),
        `${HOST_IP}\n`,
        "the CGI sees the client's address",
      );

      const qmp = await connectQmp(qmpSock);
      t.match(
        await qmp.execute("query-status"),
        { status: "running", running: true },
        "QMP query-status: running",
      );
      const events: QmpEvent[] = [];
      const collecting = (async () => {
        for await (const ev of qmp.events()) events.push(ev);
      })();

      if (!g.qemuGa) {
        // No agent: stop through QMP instead.
        void qmp.execute("quit").catch(() => undefined);
        t.equal(await exited, 0, "QEMU exits 0 after QMP quit");
        return;
      }
      const ga = guestAgent(gaSock);
      let t0 = Date.now();
      for (let i = 0; ; i++) {
        try {
          await ga.ping({ timeoutMs: 2000 });
          break;
        } catch (e) {
          if (i >= 10) throw e;
          await sleep(500);
        }
      }
      t.pass(`qemu-ga answers guest-ping (${Date.now() - t0} ms)`);

      t0 = Date.now();
      const hi = await ga.exec(["/bin/sh", "-c", "echo hi; cat /etc/hostname"]);
      t.comment(`exec round trip: ${Date.now() - t0} ms`);
      t.same(
        { exitCode: hi.exitCode, stdout: hi.stdout },
        { exitCode: 0, stdout: `hi\n${NAME}\n` },
        "exec output",
      );
      const three = await ga.exec(["/bin/sh", "-c", "echo oops >&2; exit 3"]);
      t.same(
        { exitCode: three.exitCode, stderr: three.stderr },
        { exitCode: 3, stderr: "oops\n" },
        "exit code, stderr",
      );
      t.equal((await ga.exec(["cat"], { input: "from stdin\n" })).stdout, "from stdin\n", "stdin");
      const nope = await ga.exec(["/no/such/program"]).catch((e: unknown) => e);
      t.ok(isCapsuleError(nope, ErrorCode.CommandFailed), "a missing program is an error answer", { nope });
      const slow = await ga.exec(["sleep", "30"], { timeoutMs: 500 }).catch((e: unknown) => e);
      t.ok(isCapsuleError(slow, ErrorCode.Timeout), "exec past its deadline: CAPSULE_TIMEOUT");
      t.match((slow as Error).message, /keeps running in the guest as pid \d+/);

      const neigh = await ga.exec(["ip", "neigh", "show"]);
      t.match(
        neigh.stdout,
        /169\.254\.1\.1 dev eth0 lladdr ee:ee:ee:ee:ee:ee .*PERMANENT/,
        "the gateway's MAC is pinned",
        {
          neigh,
        },
      );
      const mounts = await ga.exec(["cat", "/proc/mounts"]);
      t.match(mounts.stdout, /^\/dev\/vd[a-z] \/data ext4 rw/m, "/data is the ext4 volume");
      const wrote = await ga.exec([
        "/bin/sh",
        "-c",
        "echo written-in-the-guest > /data/hello.txt && cat /data/hello.txt",
      ]);
      t.same([wrote.exitCode, wrote.stdout], [0, "written-in-the-guest\n"], "a file written on the volume");

      t0 = Date.now();
      await ga.shutdown();
      const sent = Date.now() - t0;
      const code = await Promise.race([exited, sleep(STOP_TIMEOUT_MS).then(() => "timeout" as const)]);
      const stopMs = exitedAt ? exitedAt - t0 : -1;
      t.equal(
        code,
        0,
        `QEMU exits 0 by itself after guest-shutdown (shutdown() took ${sent} ms, exit after ${stopMs} ms)`,
        {
          console: con().slice(-1500),
        },
      );
      t.comment(`guest-shutdown -> QEMU exit: ${stopMs} ms`);
      qmp.close();
      await collecting;
      const shutdown = events.find((e) => e.event === "SHUTDOWN");
      t.ok(shutdown, "QMP saw SHUTDOWN", { events });
      t.comment(`QMP events: ${JSON.stringify(events.map((e) => [e.event, e.data]))}`);
      t.match(
        con(),
        /capsule-init: shutting down \(poweroff\)[\s\S]*capsule-init: unmounted \/data/,
        "the console tells the stop",
      );
      t.notOk(alive(qemu.pid), "no QEMU process left");
      const left = (await host.run(["ip", "netns", "pids", ns], { allowFailure: true })).stdout.trim();
      t.equal(left, "", "nothing left running in the namespace");

      // The image after the stop: unmounted cleanly (no journal to replay) and holding the file.
      const sb = (await host.run(["dumpe2fs", "-h", image])).stdout;
      t.notMatch(sb, /needs_recovery/, "unmounted cleanly: no journal to replay");
      t.match(sb, /Filesystem state:\s+clean/);
      const cat = await host.run(["debugfs", "-R", "cat /hello.txt", image]);
      t.equal(cat.stdout, "written-in-the-guest\n", "the file is on the image (debugfs)");
    },
  );
}
