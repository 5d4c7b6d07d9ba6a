// The QMP client against a stand-in QEMU on a unix socket: greeting and qmp_capabilities,
// answers matched by id, error answers as QmpError (named command, stable code), events
// interleaved with answers (also split mid-object), commands serialized on the wire, refused
// and silent sockets, a timed-out command whose late answer is dropped, EOF while waiting;
// plus the framing on hostile chunking and FakeQmp.
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { createServer, type Server, type Socket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import t from "tap";
import { ErrorCode, isCapsuleError } from "../../src/errors.js";
import { connectQmp, FakeQmp, type QmpEvent, QmpError } from "../../src/node/runtime/qmp.js";

const GREETING =
  '{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, "capabilities": ["oob"]}}\r\n';

type Msg = { execute: string; arguments?: Record<string, unknown>; id?: unknown };

/** StandIn is a fake QEMU QMP server: `onCommand` answers each command (return a string to write). */
interface StandIn {
  path: string;
  server: Server;
  got: Msg[];
  sockets: Socket[];
  close(): Promise<void>;
}

let dir = "";
t.before(async () => {
  dir = await mkdtemp(join(tmpdir(), "capsule-qmp-"));
});
t.teardown(() => rm(dir, { recursive: true, force: true }));

let n = 0;
async function standIn(
  onCommand: (m: Msg, sock: Socket, st: StandIn) => void,
  opts: { greeting?: boolean } = {},
): Promise<StandIn> {
  const path = join(dir, `qmp-${n++}.sock`);
  const st: StandIn = {
    path,
    server: createServer(),
    got: [],
    sockets: [],
    close: () =>
      new Promise((r) => {
        for (const s of st.sockets) s.destroy();
        st.server.close(() => r());
      }),
  };
  st.server.on("connection", (sock) => {
    st.sockets.push(sock);
    let buf = "";
    if (opts.greeting !== false) sock.write(GREETING);
    sock.on("data", (d) => {
      buf += d.toString("utf8");
      let i;
      while ((i = buf.indexOf("\n")) >= 0) {
        const line = buf.slice(0, i).trim();
        buf = buf.slice(i + 1);
        if (!line) continue;
        const m = JSON.parse(line) as Msg;
        st.got.push(m);
        if (m.execute === "qmp_capabilities") sock.write(JSON.stringify({ return: {}, id: m.id }) + "\r\n");
        else onCommand(m, sock, st);
      }
    });
    sock.on("error", () => {});
  });
  await new Promise<void>((r) => st.server.listen(path, r));
  return st;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const reply = (sock: Socket, m: Msg, ret: unknown) =>
  sock.write(JSON.stringify({ return: ret, id: m.id }) + "\r\n");

t.test("greeting, qmp_capabilities, then a command with arguments and its answer", async (t) => {
  const st = await standIn((m, sock) => {
    if (m.execute === "query-status") reply(sock, m, { status: "running", running: true });
    if (m.execute === "human-monitor-command")
      reply(sock, m, `echo ${String(m.arguments?.["command-line"])}`);
  });
  t.teardown(() => st.close());
  const q = await connectQmp(st.path);
  t.same(await q.execute("query-status"), { status: "running", running: true });
  t.equal(await q.execute("human-monitor-command", { "command-line": "info version" }), "echo info version");
  t.same(
    st.got.map((m) => m.execute),
    ["qmp_capabilities", "query-status", "human-monitor-command"],
    "capabilities first",
  );
  t.same(st.got[2]?.arguments, { "command-line": "info version" });
  const ids = st.got.map((m) => m.id);
  t.equal(new Set(ids).size, 3, "every command has its own id");
  q.close();
});

t.test("an error answer is a QmpError naming the command, with a stable code", async (t) => {
  const st = await standIn((m, sock) => {
    const cls = m.execute === "nope" ? "CommandNotFound" : "DeviceNotFound";
    const desc = m.execute === "nope" ? "The command nope has not been found" : "Device 'vol-x' not found";
    sock.write(JSON.stringify({ error: { class: cls, desc }, id: m.id }) + "\r\n");
  });
  t.teardown(() => st.close());
  const q = await connectQmp(st.path);
  const e1 = await q.execute("device_del", { id: "vol-x" }).catch((e: unknown) => e);
  t.ok(e1 instanceof QmpError, "QmpError");
  t.ok(isCapsuleError(e1, ErrorCode.CommandFailed), "CAPSULE_COMMAND_FAILED");
  t.match((e1 as QmpError).message, /^QMP device_del: Device 'vol-x' not found \(DeviceNotFound\)$/);
  t.equal((e1 as QmpError).errorClass, "DeviceNotFound");
  const e2 = await q.execute("nope").catch((e: unknown) => e);
  t.ok(isCapsuleError(e2, ErrorCode.Unsupported), "CommandNotFound is CAPSULE_UNSUPPORTED");
  t.same(await q.execute("nope").catch((e: QmpError) => e.command), "nope", "connection still usable");
  q.close();
});

t.test(
  "events between a command and its answer, split mid-object, reach events() and not execute()",
  async (t) => {
    const st = await standIn((m, sock) => {
      const ev1 = '{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP"}\r\n';
      const ev2 =
        '{"timestamp": {"seconds": 1, "microseconds": 3}, "event": "RESUME", "data": {"x": "}}\\"{"}}\r\n';
      const ans = JSON.stringify({ return: { status: "paused" }, id: m.id }) + "\r\n";
      const all = Buffer.from(ev1 + ev2 + ans);
      // Byte-by-byte, so every object is split.
      let i = 0;
      const tick = () => {
        if (i < all.length) {
          sock.write(all.subarray(i, i + 7));
          i += 7;
          setImmediate(tick);
        }
      };
      tick();
    });
    t.teardown(() => st.close());
    const q = await connectQmp(st.path);
    t.same(await q.execute("query-status"), { status: "paused" }, "the answer, not an event");
    const seen: QmpEvent[] = [];
    const it = q.events()[Symbol.asyncIterator]();
    seen.push((await it.next()).value as QmpEvent, (await it.next()).value as QmpEvent);
    t.same(
      seen.map((e) => e.event),
      ["STOP", "RESUME"],
    );
    t.same(seen[1]?.data, { x: '}}"{' }, "braces inside strings do not end the object");
    q.close();
    t.ok((await it.next()).done, "events() ends when the connection closes");
  },
);

t.test("concurrent calls go on the wire one at a time, in call order", async (t) => {
  let outstanding = 0;
  let maxOutstanding = 0;
  const st = await standIn((m, sock) => {
    outstanding++;
    maxOutstanding = Math.max(maxOutstanding, outstanding);
    setTimeout(() => {
      outstanding--;
      reply(sock, m, m.arguments?.n);
    }, 15);
  });
  t.teardown(() => st.close());
  const q = await connectQmp(st.path);
  const got = await Promise.all([1, 2, 3, 4].map((n) => q.execute("echo", { n })));
  t.same(got, [1, 2, 3, 4], "each call gets its own answer");
  t.equal(maxOutstanding, 1, "never two commands outstanding");
  t.same(
    st.got.slice(1).map((m) => m.arguments?.n),
    [1, 2, 3, 4],
  );
  q.close();
});

t.test(
  "a timed-out command fails with CAPSULE_TIMEOUT; its late answer is not taken by the next",
  async (t) => {
    // Answers in order, as QEMU's: fast waits for slow.
    let chain: Promise<unknown> = Promise.resolve();
    const st = await standIn((m, sock) => {
      chain = chain.then(() =>
        m.execute === "slow"
          ? sleep(150).then(() => reply(sock, m, "slow answer"))
          : reply(sock, m, "fast answer"),
      );
    });
    t.teardown(() => st.close());
    const q = await connectQmp(st.path);
    const t0 = Date.now();
    const e = await q.execute("slow", undefined, { timeoutMs: 50 }).catch((e: unknown) => e);
    t.ok(isCapsuleError(e, ErrorCode.Timeout), "CAPSULE_TIMEOUT");
    t.match((e as Error).message, /QMP slow: no answer within 50 ms/);
    t.ok(Date.now() - t0 < 140, "bounded by timeoutMs");
    t.equal(await q.execute("fast"), "fast answer", "the late answer to slow was dropped");
    q.close();
  },
);

t.test("connect: missing socket, refused socket, silent server", async (t) => {
  const e1 = await connectQmp(join(dir, "missing.sock")).catch((e: unknown) => e);
  t.ok(isCapsuleError(e1, ErrorCode.Unreachable), "missing: CAPSULE_UNREACHABLE");
  t.match((e1 as { hint?: string }).hint, /nothing listens/);

  const stale = join(dir, "stale.sock");
  const s = createServer();
  await new Promise<void>((r) => s.listen(stale, r));
  await new Promise<void>((r) => s.close(() => r()));
  await writeFile(stale, ""); // a plain file where the socket was: connect fails (ECONNREFUSED)
  const e2 = await connectQmp(stale).catch((e: unknown) => e);
  t.ok(isCapsuleError(e2, ErrorCode.Unreachable), "refused: CAPSULE_UNREACHABLE");

  const silent = await standIn(() => {}, { greeting: false });
  t.teardown(() => silent.close());
  const t0 = Date.now();
  const e3 = await connectQmp(silent.path, { timeoutMs: 120 }).catch((e: unknown) => e);
  t.ok(isCapsuleError(e3, ErrorCode.Timeout), "no greeting: CAPSULE_TIMEOUT");
  t.match((e3 as { hint?: string }).hint, /one QMP client at a time/);
  t.ok(Date.now() - t0 < 1000, `bounded (${Date.now() - t0} ms)`);
});

t.test("EOF while waiting (QEMU exited) fails the call with CAPSULE_UNREACHABLE", async (t) => {
  const st = await standIn((_m, sock) => sock.destroy());
  t.teardown(() => st.close());
  const q = await connectQmp(st.path);
  const e = await q.execute("quit").catch((e: unknown) => e);
  t.ok(isCapsuleError(e, ErrorCode.Unreachable), "CAPSULE_UNREACHABLE");
  const e2 = await q.execute("query-status").catch((e: unknown) => e);
  t.ok(isCapsuleError(e2, ErrorCode.Unreachable), "and every later call");
});

t.test("FakeQmp: scripted answers, errors, events, canonical command text", async (t) => {
  const q = new FakeQmp()
    .on("query-status", { status: "running", running: true })
    .on("echo", (a: Record<string, unknown> | undefined) => a?.v)
    .fail("device_del", "Device 'x' not found", "DeviceNotFound");
  t.same(await q.execute("query-status"), { status: "running", running: true });
  t.equal(await q.execute("echo", { v: 7 }), 7);
  const e = await q.execute("device_del", { id: "x" }).catch((e: unknown) => e);
  t.ok(e instanceof QmpError && e.errorClass === "DeviceNotFound");
  const e2 = await q.execute("stop").catch((e: unknown) => e);
  t.ok(isCapsuleError(e2, ErrorCode.Unsupported), "unscripted: CommandNotFound");
  q.emit({ event: "SHUTDOWN", data: { guest: true } });
  const it = q.events()[Symbol.asyncIterator]();
  t.same((await it.next()).value, { event: "SHUTDOWN", data: { guest: true } });
  q.close();
  t.ok((await it.next()).done);
  t.same(q.commands, ["query-status", 'echo {"v":7}', 'device_del {"id":"x"}', "stop"]);
});
