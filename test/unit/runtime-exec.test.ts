// Interactive exec without containerd: the process spec built from the container's (golden), a
// session's calls on FakeContainerdApi and MemoryPipes as canonical lines (phases, undo on a
// failed start, kill, resize, stdin), the drain bound after the exit, and real FIFOs opened in
// the order the module promises (a stand-in "shim" on the far ends; no root needed).
import { closeSync, constants, existsSync, openSync, readSync, writeSync } from "node:fs";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import t from "tap";
import { ExecaRunner, type RunOptions } from "../../src/node/host/runner.js";
import {
  execProcessSpec,
  FakeContainerdApi,
  PROCESS_TYPE_URL,
  SIGKILL,
} from "../../src/node/runtime/containerd-api.js";
import { type ExecOutput, type ExecSession, startExec } from "../../src/node/runtime/exec.js";
import { FifoPipes, MemoryPipes, pipePaths } from "../../src/node/runtime/exec-pipes.js";

const SPEC = {
  ociVersion: "1.0.2",
  process: {
    terminal: false,
    user: { uid: 0, gid: 0 },
    args: ["httpd", "-f"],
    env: ["PATH=/bin", "GREETING=1"],
    cwd: "/www",
    capabilities: { bounding: ["CAP_CHOWN"] },
  },
  root: { path: "rootfs" },
};

t.test("execProcessSpec: the container's process with our argv, terminal and size", async (t) => {
  t.same(execProcessSpec(SPEC, ["sh", "-c", "tty"], { tty: true, size: { rows: 33, cols: 101 } }), {
    terminal: true,
    user: { uid: 0, gid: 0 },
    args: ["sh", "-c", "tty"],
    env: ["PATH=/bin", "GREETING=1"],
    cwd: "/www",
    capabilities: { bounding: ["CAP_CHOWN"] },
    consoleSize: { height: 33, width: 101 },
  });
  t.notOk("consoleSize" in execProcessSpec(SPEC, ["ls"], { tty: false, size: { rows: 33, cols: 101 } }));
  t.notOk("consoleSize" in execProcessSpec(SPEC, ["ls"], { tty: true, size: { rows: 0, cols: 80 } }));
  t.notOk("consoleSize" in execProcessSpec(SPEC, ["ls"], { tty: true }));
  t.same(SPEC.process.args, ["httpd", "-f"], "the container's spec is not changed");
  t.throws(() => execProcessSpec({}, ["ls"], { tty: false }), { code: "CAPSULE_INTERNAL" });
  t.equal(PROCESS_TYPE_URL, "types.containerd.io/opencontainers/runtime-spec/1/Process");
});

t.test("pipePaths: one FIFO per stream asked for", async (t) => {
  t.same(pipePaths("/s/fifo", "e1", { stdin: true, stderr: true }), {
    stdin: "/s/fifo/e1-stdin",
    stdout: "/s/fifo/e1-stdout",
    stderr: "/s/fifo/e1-stderr",
  });
  t.same(pipePaths("/s/fifo", "e1", { stdin: false, stderr: false }), {
    stdin: "",
    stdout: "/s/fifo/e1-stdout",
    stderr: "",
  });
});

async function collect(s: ExecSession): Promise<ExecOutput[]> {
  const out: ExecOutput[] = [];
  for await (const o of s.output) out.push(o);
  return out;
}

const text = (os: ExecOutput[], stream: string) =>
  os
    .filter((o) => o.stream === stream)
    .map((o) => o.data.toString())
    .join("");

t.test("a terminal session: phases in order, resize, output, exit, cleanup", async (t) => {
  const api = new FakeContainerdApi();
  api.spec = SPEC;
  const pipes = new MemoryPipes();
  api.onStart = (id) => pipes.pipes.get(id)?.stdout.write("/dev/pts/0\r\n");
  const s = await startExec({ api, pipes, execId: "e1" }, "web.1", ["sh", "-c", "tty"], {
    tty: true,
    stdin: true,
    size: { rows: 33, cols: 101 },
  });
  t.equal(s.pid, 4242);
  const out = collect(s);
  await s.resize({ rows: 40, cols: 120 });
  await s.write(Buffer.from("ls\r"));
  const p = pipes.pipes.get("e1")!;
  p.stdout.end("bye\r\n");
  api.exit("e1", 7);
  t.equal(await s.exit, 7);
  t.equal(text(await out, "stdout"), "/dev/pts/0\r\nbye\r\n");
  t.equal(p.input, "ls\r");
  t.same(api.calls, [
    "Containers.Get web.1",
    "Exec web.1 e1 tty 33x101 stdin=/fifo/e1-stdin stdout=/fifo/e1-stdout stderr=: sh -c tty",
    "Wait web.1 e1",
    "Start web.1 e1",
    "ResizePty web.1 e1 40x120",
    "DeleteProcess web.1 e1",
  ]);
  t.same(pipes.calls, ["make e1 stdin", "attach e1", "dispose e1"]);
  t.equal(api.closed, 1, "the API connection is closed");
  await s.resize({ rows: 1, cols: 1 });
  await s.kill();
  t.equal(api.calls.length, 6, "resize and kill after the exit do nothing");
});

t.test("without a terminal: stdout and stderr apart, stdin closed on request", async (t) => {
  const api = new FakeContainerdApi();
  const pipes = new MemoryPipes();
  const s = await startExec({ api, pipes, execId: "e2" }, "web.1", ["cat"], { stdin: true });
  const out = collect(s);
  const p = pipes.pipes.get("e2")!;
  await s.write(Buffer.from("hi\n"));
  await s.closeStdin();
  await s.closeStdin();
  await s.resize({ rows: 10, cols: 10 });
  await new Promise((r) => setImmediate(r));
  t.ok(p.stdinEnded, "stdin ended");
  p.stdout.end("hi\n");
  p.stderr.end("warn\n");
  api.exit("e2", 0);
  t.equal(await s.exit, 0);
  const got = await out;
  t.equal(text(got, "stdout"), "hi\n");
  t.equal(text(got, "stderr"), "warn\n");
  t.same(api.calls, [
    "Containers.Get web.1",
    "Exec web.1 e2 notty stdin=/fifo/e2-stdin stdout=/fifo/e2-stdout stderr=/fifo/e2-stderr: cat",
    "Wait web.1 e2",
    "Start web.1 e2",
    "CloseIO web.1 e2 stdin",
    "DeleteProcess web.1 e2",
  ]);
  t.same(pipes.calls, ["make e2 stdin stderr", "attach e2", "dispose e2"]);
});

t.test("a command that cannot start: a clear error, nothing left behind", async (t) => {
  const api = new FakeContainerdApi();
  api.failStart = new Error('exec: "nope": executable file not found in $PATH');
  const pipes = new MemoryPipes();
  await t.rejects(startExec({ api, pipes, execId: "e3" }, "web.1", ["nope"]), {
    code: "CAPSULE_COMMAND_FAILED",
    message: /cannot run nope in web\.1: .*executable file not found/,
    hint: "check the command against the image",
  });
  t.same(api.calls.slice(-2), ["Start web.1 e3", "DeleteProcess web.1 e3"]);
  t.same(pipes.calls, ["make e3 stderr", "dispose e3"]);
  t.equal(api.closed, 1);
  await t.rejects(startExec({ api, pipes, execId: "e4" }, "web.1", []), { code: "CAPSULE_INVALID_ARGUMENT" });
  t.equal(api.calls.length, 5, "an empty argv reaches nothing");
});

t.test("kill: SIGKILL once, the exit follows; a held-open output is cut after drainMs", async (t) => {
  const api = new FakeContainerdApi();
  const pipes = new MemoryPipes();
  const s = await startExec({ api, pipes, execId: "e5", drainMs: 150 }, "web.1", ["sleep", "9"]);
  const out = collect(s);
  await s.kill();
  const t0 = Date.now();
  // The stdout FIFO is never closed (a background child would hold it): cut after 150 ms idle.
  t.equal(await s.exit, 128 + SIGKILL);
  t.ok(Date.now() - t0 >= 100, "waited for the output first");
  t.same(await out, []);
  t.same(api.calls.slice(-2), ["Kill web.1 e5 9", "DeleteProcess web.1 e5"]);
  t.same(pipes.calls.at(-1), "dispose e5");
});

t.test("FifoPipes: real FIFOs, the far ends opened like the shim does", async (t) => {
  const dir = await mkdtemp(join(tmpdir(), "capsule-fifo-"));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  // mkfifo runs for real; the command line is recorded on the way.
  const real = new ExecaRunner();
  const commands: string[] = [];
  const recording = {
    run: (argv: readonly string[], o?: RunOptions) => {
      commands.push(argv.join(" "));
      return real.run(argv, o);
    },
  };
  const pipes = await new FifoPipes(recording, join(dir, "fifo")).make("e1", { stdin: true, stderr: true });
  const p = pipes.paths;
  t.same(commands, [`mkfifo -m 600 ${p.stdin} ${p.stdout} ${p.stderr}`]);
  // The shim: blocking opens succeed at once (we hold every FIFO open).
  const shimIn = openSync(p.stdin, constants.O_RDONLY);
  const shimOut = openSync(p.stdout, constants.O_WRONLY);
  const shimErr = openSync(p.stderr, constants.O_WRONLY);
  writeSync(shimOut, "early ");
  const { stdout, stderr } = pipes.attach();
  t.throws(() => pipes.attach(), /twice/);
  const read = (s: NodeJS.ReadableStream) =>
    new Promise<string>((r) => {
      let acc = "";
      s.on("data", (d) => (acc += String(d)));
      s.on("end", () => r(acc));
    });
  const outText = read(stdout);
  const errText = read(stderr!);
  await new Promise<void>((r) => pipes.stdin!.write("typed", () => r()));
  const buf = Buffer.alloc(16);
  t.equal(buf.subarray(0, readSync(shimIn, buf)).toString(), "typed", "stdin reaches the shim");
  writeSync(shimOut, "late");
  writeSync(shimErr, "oops");
  closeSync(shimOut);
  closeSync(shimErr);
  closeSync(shimIn);
  t.equal(await outText, "early late", "output written before attach is kept, EOF when the shim closes");
  t.equal(await errText, "oops");
  await pipes.dispose();
  await pipes.dispose();
  t.notOk(existsSync(p.stdin) || existsSync(p.stdout) || existsSync(p.stderr), "FIFOs removed");
});
