// The qemu-ga client against a stand-in agent on a unix socket (one client at a time, like
// QEMU's chardev): the 0xFF + guest-sync-delimited resync with stale bytes and answers before
// the sentinel, one connection per call, guest-exec with base64 input and output polled until
// exit, a signal, the exec deadline (the error names the pid left running), error answers,
// guest-shutdown's silent success (EOF or silence) and its error answer, an agent that never
// answers; plus FakeGuestAgent.
import { mkdtemp, rm } from "node:fs/promises";
import { createServer, type Server, type Socket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import t from "tap";
import { ErrorCode, isCapsuleError } from "../../src/errors.js";
import { FakeGuestAgent, guestAgent } from "../../src/node/runtime/guest-agent.js";
import { QmpError } from "../../src/node/runtime/qmp.js";

type Msg = { execute: string; arguments?: Record<string, unknown>; id?: unknown };
type Answer = (m: Msg, sock: Socket) => void;

interface Agent {
  path: string;
  server: Server;
  /** got is every command, as "execute" or "execute <arguments JSON>". */
  got: string[];
  /** sawFF counts 0xFF bytes received. */
  sawFF: number;
  connections: number;
  /** onSync runs when a guest-sync-delimited arrives. */
  onSync?: () => void;
  close(): Promise<void>;
}

let dir = "";
t.before(async () => {
  dir = await mkdtemp(join(tmpdir(), "capsule-ga-"));
});
t.teardown(() => rm(dir, { recursive: true, force: true }));

const send = (sock: Socket, obj: unknown) => sock.write(JSON.stringify(obj) + "\n");
const ret = (sock: Socket, m: Msg, v: unknown) =>
  send(sock, { return: v, ...(m.id !== undefined ? { id: m.id } : {}) });

let n = 0;
/** agent starts a stand-in qemu-ga; `answer` handles everything but guest-sync-delimited. */
async function agent(answer: Answer, opts: { stale?: boolean; silent?: boolean } = {}): Promise<Agent> {
  const path = join(dir, `ga-${n++}.sock`);
  const socks: Socket[] = [];
  const a: Agent = {
    path,
    server: createServer(),
    got: [],
    sawFF: 0,
    connections: 0,
    close: () =>
      new Promise((r) => {
        for (const s of socks) s.destroy();
        a.server.close(() => r());
      }),
  };
  a.server.on("connection", (sock) => {
    socks.push(sock);
    a.connections++;
    sock.on("error", () => {});
    let buf = Buffer.alloc(0);
    sock.on("data", (d: Buffer) => {
      buf = Buffer.concat([buf, d]);
      for (;;) {
        const ff = buf.indexOf(0xff);
        if (ff >= 0) {
          a.sawFF++;
          buf = buf.subarray(ff + 1); // the agent's parser reset
          continue;
        }
        const i = buf.indexOf(10);
        if (i < 0) break;
        const line = buf.subarray(0, i).toString("utf8").trim();
        buf = buf.subarray(i + 1);
        if (!line) continue;
        const m = JSON.parse(line) as Msg;
        a.got.push(m.arguments ? `${m.execute} ${JSON.stringify(m.arguments)}` : m.execute);
        if (opts.silent) continue;
        if (m.execute === "guest-sync-delimited") {
          a.onSync?.();
          // Stale bytes a previous client left: a half object and a whole stale answer.
          if (opts.stale) sock.write('{"return": {"pid": 9}}\n{"return": [1, {"half": ');
          sock.write(
            Buffer.concat([
              Buffer.from([0xff]),
              Buffer.from(JSON.stringify({ return: m.arguments?.id }) + "\n"),
            ]),
          );
        } else answer(m, sock);
      }
    });
  });
  await new Promise<void>((r) => a.server.listen(path, r));
  return a;
}

t.test(
  "ping: 0xFF, guest-sync-delimited past stale bytes, then guest-ping; one connection per call",
  async (t) => {
    const a = await agent((m, sock) => (m.execute === "guest-ping" ? ret(sock, m, {}) : undefined), {
      stale: true,
    });
    t.teardown(() => a.close());
    const ga = guestAgent(a.path);
    await ga.ping();
    await ga.ping();
    t.equal(a.sawFF, 2, "the client sent 0xFF before each sync");
    t.match(a.got, [
      /^guest-sync-delimited \{"id":\d+\}$/,
      "guest-ping",
      /^guest-sync-delimited/,
      "guest-ping",
    ]);
    t.equal(a.connections, 2, "a connection per call");
  },
);

t.test("calls on one client are serialized: a session starts only after the last one's answer", async (t) => {
  let outstanding = 0;
  let overlapped = 0;
  const a = await agent((m, sock) => {
    outstanding++;
    setTimeout(() => {
      outstanding--;
      ret(sock, m, {});
    }, 20);
  });
  a.onSync = () => {
    if (outstanding > 0) overlapped++;
  };
  t.teardown(() => a.close());
  const ga = guestAgent(a.path);
  await Promise.all([ga.ping(), ga.ping(), ga.ping()]);
  t.equal(a.connections, 3);
  t.equal(overlapped, 0, "no sync while another call's answer was pending");
});

t.test("exec: base64 input, polls guest-exec-status until exited, decodes output", async (t) => {
  let polls = 0;
  const a = await agent((m, sock) => {
    if (m.execute === "guest-exec") ret(sock, m, { pid: 42 });
    else if (m.execute === "guest-exec-status") {
      polls++;
      if (polls < 3) ret(sock, m, { exited: false });
      else
        ret(sock, m, {
          exited: true,
          exitcode: 3,
          "out-data": Buffer.from("hi\ncapsule-guest\n").toString("base64"),
          "err-data": Buffer.from("wärning\n").toString("base64"),
        });
    }
  });
  t.teardown(() => a.close());
  const ga = guestAgent(a.path, { pollMs: 5 });
  const r = await ga.exec(["/bin/sh", "-c", "echo hi; cat /etc/hostname; exit 3"], {
    input: "abc",
    env: ["PATH=/bin"],
  });
  t.same(r, { pid: 42, exitCode: 3, stdout: "hi\ncapsule-guest\n", stderr: "wärning\n" });
  t.equal(polls, 3, "polled until exited");
  t.same(JSON.parse(a.got[1]!.slice("guest-exec ".length)), {
    path: "/bin/sh",
    arg: ["-c", "echo hi; cat /etc/hostname; exit 3"],
    env: ["PATH=/bin"],
    "input-data": Buffer.from("abc").toString("base64"),
    "capture-output": true,
  });
  t.equal(a.got[2], 'guest-exec-status {"pid":42}');
  t.equal(a.connections, 1, "start and polls share one connection");
});

t.test("exec: a signal, and truncated output", async (t) => {
  const a = await agent((m, sock) => {
    if (m.execute === "guest-exec") ret(sock, m, { pid: 7 });
    else ret(sock, m, { exited: true, signal: 9, "out-truncated": true });
  });
  t.teardown(() => a.close());
  const r = await guestAgent(a.path).exec(["sleep", "100"]);
  t.same(r, { pid: 7, exitCode: 137, stdout: "", stderr: "", signal: 9, truncated: true });
});

t.test("exec: past the deadline, CAPSULE_TIMEOUT naming the pid left running", async (t) => {
  const a = await agent((m, sock) => {
    if (m.execute === "guest-exec") ret(sock, m, { pid: 77 });
    else ret(sock, m, { exited: false });
  });
  t.teardown(() => a.close());
  const t0 = Date.now();
  const e = await guestAgent(a.path, { pollMs: 10 })
    .exec(["sleep", "1000"], { timeoutMs: 150 })
    .catch((e: unknown) => e);
  const ms = Date.now() - t0;
  t.ok(isCapsuleError(e, ErrorCode.Timeout), "CAPSULE_TIMEOUT");
  t.match(
    (e as Error).message,
    /sleep 1000: not finished after 150 ms; it keeps running in the guest as pid 77/,
  );
  t.ok(ms >= 140 && ms < 1000, `bounded (${ms} ms)`);
  t.ok(a.got.filter((g) => g.startsWith("guest-exec-status")).length >= 3, "polled meanwhile");
});

t.test("exec: an error answer is a QmpError naming guest-exec", async (t) => {
  const a = await agent((m, sock) =>
    send(sock, {
      error: {
        class: "GenericError",
        desc: "Guest agent command failed, error was 'Failed to execute child process “nope” (No such file or directory)'",
      },
      id: m.id,
    }),
  );
  t.teardown(() => a.close());
  const e = await guestAgent(a.path)
    .exec(["nope"])
    .catch((e: unknown) => e);
  t.ok(e instanceof QmpError && isCapsuleError(e, ErrorCode.CommandFailed));
  t.match((e as Error).message, /^guest agent guest-exec: .*No such file/);
});

t.test("shutdown: EOF after sending is success; silence is success; an error answer throws", async (t) => {
  const eof = await agent((m, sock) => (m.execute === "guest-shutdown" ? sock.destroy() : undefined));
  t.teardown(() => eof.close());
  await guestAgent(eof.path).shutdown();
  t.equal(eof.got[1], 'guest-shutdown {"mode":"powerdown"}');

  const silent = await agent(() => {});
  t.teardown(() => silent.close());
  const t0 = Date.now();
  await guestAgent(silent.path, { shutdownWaitMs: 100 }).shutdown("reboot");
  t.ok(Date.now() - t0 < 1000, "silence: resolves after shutdownWaitMs");
  t.equal(silent.got[1], 'guest-shutdown {"mode":"reboot"}');

  const fails = await agent((m, sock) =>
    send(sock, { error: { class: "GenericError", desc: "child process has failed to shutdown" } }),
  );
  t.teardown(() => fails.close());
  const e = await guestAgent(fails.path)
    .shutdown()
    .catch((e: unknown) => e);
  t.ok(e instanceof QmpError, "error answer: QmpError");
  t.match((e as Error).message, /guest-shutdown: child process has failed to shutdown/);
});

t.test("no agent: missing socket is CAPSULE_UNREACHABLE, a silent agent CAPSULE_TIMEOUT", async (t) => {
  const e1 = await guestAgent(join(dir, "none.sock"))
    .ping()
    .catch((e: unknown) => e);
  t.ok(isCapsuleError(e1, ErrorCode.Unreachable));
  const silent = await agent(() => {}, { silent: true });
  t.teardown(() => silent.close());
  const e2 = await guestAgent(silent.path, { connectTimeoutMs: 100 })
    .ping()
    .catch((e: unknown) => e);
  t.ok(isCapsuleError(e2, ErrorCode.Timeout), "CAPSULE_TIMEOUT");
  t.match((e2 as { hint?: string }).hint, /is qemu-ga running/);
});

t.test("FakeGuestAgent: canonical calls, scripted exec, down", async (t) => {
  const ga = new FakeGuestAgent().onExec((argv) =>
    argv[0] === "cat" ? { stdout: "capsule-guest\n" } : argv[0] === "false" ? { exitCode: 1 } : undefined,
  );
  await ga.ping();
  t.equal((await ga.exec(["cat", "/etc/hostname"])).stdout, "capsule-guest\n");
  t.equal((await ga.exec(["false"])).exitCode, 1);
  t.equal((await ga.exec(["sh"], { input: "echo hi" })).exitCode, 0);
  await ga.shutdown();
  t.equal(ga.shutdownMode, "powerdown");
  ga.down = true;
  t.ok(isCapsuleError(await ga.ping().catch((e: unknown) => e), ErrorCode.Unreachable));
  t.same(ga.calls, [
    "ping",
    "exec cat /etc/hostname",
    "exec false",
    "exec sh <<<echo hi",
    "shutdown powerdown",
    "ping",
  ]);
});
