// Boots the lab guest (lab/qemu/guest.ts) under TCG on QEMU's microvm machine in a throwaway
// network namespace: virtio-net on a TAP whose host side is 169.254.1.1/32 with a route to the
// guest's 100.64.5.2/32, the serial console to a file, QMP and the guest agent on unix sockets.
// Waits for the READY marker, curls the guest's httpd from the namespace, asks QMP for
// query-status and qemu-ga for guest-ping, then quits through QMP and checks that no QEMU is
// left. Teardown kills QEMU and deletes the namespace even when a step fails.
import { type ChildProcess, spawn } from "node:child_process";
import { existsSync, readFileSync } from "node:fs";
import { mkdtemp, rm } from "node:fs/promises";
import { createConnection, type Socket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import t from "tap";
import {
  buildGuest,
  GUEST_HTTP_BODY,
  GUEST_HTTP_PORT,
  guestCmdline,
  QGA_PORT_NAME,
  READY_MARKER,
} from "../../lab/qemu/guest.js";
import { ExecaRunner } from "../../src/node/host/runner.js";

const QEMU = "/usr/bin/qemu-system-x86_64";
const OUT = process.env.CAPSULE_GUEST_DIR ?? join(tmpdir(), "capsule-guest");
const GUEST_IP = "100.64.5.2";
const HOST_IP = "169.254.1.1";
const BOOT_TIMEOUT_MS = 90_000;

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** JsonLines is a tiny client for QMP / qemu-ga: one JSON object per line, events skipped. */
class JsonLines {
  private buf = "";
  private waiters: ((v: Record<string, unknown>) => void)[] = [];
  private queue: Record<string, unknown>[] = [];
  private constructor(private readonly sock: Socket) {
    sock.setEncoding("utf8");
    sock.on("data", (d: string) => {
      this.buf += d;
      let i;
      while ((i = this.buf.indexOf("\n")) >= 0) {
        const line = this.buf.slice(0, i).trim();
        this.buf = this.buf.slice(i + 1);
        if (!line) continue;
        const msg = JSON.parse(line) as Record<string, unknown>;
        if ("event" in msg) continue;
        const w = this.waiters.shift();
        if (w) w(msg);
        else this.queue.push(msg);
      }
    });
    sock.on("error", () => {});
  }
  static connect(path: string): Promise<JsonLines> {
    return new Promise((resolve, reject) => {
      const s = createConnection(path, () => resolve(new JsonLines(s)));
      s.once("error", reject);
    });
  }
  next(timeoutMs = 10_000): Promise<Record<string, unknown>> {
    const q = this.queue.shift();
    if (q) return Promise.resolve(q);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error("no answer")), timeoutMs);
      this.waiters.push((v) => {
        clearTimeout(timer);
        resolve(v);
      });
    });
  }
  send(execute: string, args?: object): void {
    this.sock.write(JSON.stringify({ execute, ...(args ? { arguments: args } : {}) }) + "\n");
  }
  async cmd(execute: string, args?: object): Promise<Record<string, unknown>> {
    this.send(execute, args);
    return this.next();
  }
  close() {
    this.sock.destroy();
  }
}

const alive = (pid: number | undefined) => {
  if (!pid) return false;
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
};

if (process.getuid?.() !== 0) {
  t.plan(0, "requires superuser privileges (network namespace, TAP)");
} else if (!existsSync(QEMU)) {
  t.plan(0, `${QEMU} is missing (apt-get install qemu-system-x86)`);
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

  t.test("the guest boots under TCG, serves HTTP, answers QMP and qemu-ga, and quits", async (t) => {
    const g = await buildGuest(OUT);
    t.comment(
      `guest build ${g.buildMs} ms (cached=${g.cached}), kernel ${g.kernelVersion}, qemu-ga=${g.qemuGa}`,
    );
    work = await mkdtemp(join(tmpdir(), "capq-"));
    const consoleLog = join(work, "console.log");
    const qmpSock = join(work, "qmp.sock");
    const qgaSock = join(work, "qga.sock");

    await host.run(["ip", "netns", "add", ns]);
    await host.run(["ip", "-n", ns, "link", "set", "lo", "up"]);
    await host.run(["ip", "-n", ns, "tuntap", "add", "dev", "tap0", "mode", "tap"]);
    await host.run(["ip", "-n", ns, "addr", "add", `${HOST_IP}/32`, "dev", "tap0"]);
    await host.run(["ip", "-n", ns, "link", "set", "tap0", "up"]);
    await host.run(["ip", "-n", ns, "route", "add", `${GUEST_IP}/32`, "dev", "tap0"]);

    // prettier-ignore
    const argv = [
      "ip", "netns", "exec", ns, QEMU,
      "-accel", "tcg", "-M", "microvm", "-cpu", "max", "-m", "128", "-smp", "1",
      "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
      "-kernel", g.kernel, "-initrd", g.initrd,
      "-append", guestCmdline({ ip: `${GUEST_IP}/32`, gw: HOST_IP }),
      "-serial", `file:${consoleLog}`,
      "-qmp", `unix:${qmpSock},server=on,wait=off`,
      "-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no",
      "-device", "virtio-net-device,netdev=n0",
      "-device", "virtio-serial-device",
      "-chardev", `socket,id=qga0,path=${qgaSock},server=on,wait=off`,
      "-device", `virtserialport,chardev=qga0,name=${QGA_PORT_NAME}`,
    ];
    const started = Date.now();
    qemu = spawn(argv[0] as string, argv.slice(1), { stdio: ["ignore", "ignore", "pipe"] });
    let stderr = "";
    qemu.stderr?.on("data", (d: Buffer) => (stderr += d.toString()));
    const exited = new Promise<number | null>((r) => qemu?.once("exit", (code) => r(code)));
    let exitedEarly = false;
    void exited.then(() => (exitedEarly = true));

    const con = () => (existsSync(consoleLog) ? readFileSync(consoleLog, "utf8") : "");
    let bootMs = -1;
    while (Date.now() - started < BOOT_TIMEOUT_MS && !exitedEarly) {
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

    let body = "";
    for (let i = 0; i < 20 && body !== GUEST_HTTP_BODY; i++) {
      const r = await host.run(
        ["ip", "netns", "exec", ns, "curl", "-sS", "-m", "5", `http://${GUEST_IP}:${GUEST_HTTP_PORT}/`],
        { allowFailure: true },
      );
      body = r.stdout;
      if (body !== GUEST_HTTP_BODY) await sleep(500);
    }
    t.equal(body, GUEST_HTTP_BODY, "curl from the namespace gets the guest's page");
    t.comment(`curl: ${JSON.stringify(body)}`);

    if (g.qemuGa) {
      const ga = await JsonLines.connect(qgaSock);
      t.same(await ga.cmd("guest-sync", { id: 4711 }), { return: 4711 }, "qemu-ga answers guest-sync");
      t.same(await ga.cmd("guest-ping"), { return: {} }, "qemu-ga answers guest-ping");
      ga.close();
    }

    const qmp = await JsonLines.connect(qmpSock);
    t.ok("QMP" in (await qmp.next()), "QMP greeting");
    t.same(await qmp.cmd("qmp_capabilities"), { return: {} });
    const st = await qmp.cmd("query-status");
    t.match(st, { return: { status: "running", running: true } }, "query-status: running");
    // quit: QEMU may close the socket before or after its { return: {} }; the exit is what counts.
    qmp.send("quit");
    const code = await Promise.race([exited, sleep(15_000).then(() => "timeout" as const)]);
    qmp.close();
    t.equal(code, 0, "QEMU exits 0 after QMP quit");
    t.notOk(alive(qemu.pid), "no QEMU process left");
    const left = (await host.run(["ip", "netns", "pids", ns], { allowFailure: true })).stdout.trim();
    t.equal(left, "", "nothing left running in the namespace");
  });
}
