// capsulectl apply and workload commands driven in-process through run() with a fake dialer
// (the pattern of cli-fabric.test.ts, extended with the two streaming calls): what is sent,
// what is printed, and the exit code.
import { mkdir, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { PassThrough, Readable } from "node:stream";
import t from "tap";
import { ageText, portsText } from "../../src/cli/commands/workload.js";
import { FakeTerminal } from "../../src/cli/terminal.js";
import { CapsuleError, ErrorCode } from "../../src/errors.js";
import { NOW, harness, steps } from "../helpers/cli-harness.js";

// ---------------------------------------------------------------- harness (fake dialer)

const WEB = `kind: Workload
name: web
labels: { app: web }
container:
  image: demo/httpd:1
  command: ["httpd", "-f", "-p", "8080"]
ports:
  - port: 8080
    hostPort: 18080
---
kind: Workload
name: db
container:
  image: demo/db:1
`;

async function manifestFile(root: string, name: string, text: string): Promise<string> {
  const p = join(root, name);
  await writeFile(p, text);
  return p;
}

function workload(name: string, phase: string, extra: Record<string, unknown> = {}) {
  return {
    name,
    labels: { app: name, tier: "front" },
    kind: "container",
    image: `demo/${name}:1`,
    desired: "running",
    phase,
    message: "",
    address: "100.64.7.2",
    ports: [{ port: 8080, hostPort: 18080, protocol: "tcp" }],
    restarts: 2,
    events: [
      { time: "2026-11-23T11:55:00.000Z", type: "created", message: "container created" },
      { time: "2026-11-23T11:59:30.000Z", type: "started", message: "pid 4242" },
    ],
    createdAt: "2026-11-23T11:55:00.000Z",
    generation: "1",
    specJson: "{}",
    volumes: [],
    pid: 4242,
    ...extra,
  };
}

const applied = (req: Record<string, unknown>, action = "created") => ({
  results: (req.manifestsJson as string[]).map((j) => {
    const m = JSON.parse(j) as { kind: string; name: string };
    return { kind: m.kind, name: m.name, action };
  }),
});

// ---------------------------------------------------------------- apply

t.test("apply -f FILE: validated JSON of every document, kubectl-style lines", async (t) => {
  const h = await harness(async (method, req) => {
    t.equal(method, "Workloads/Apply");
    return applied(req);
  });
  const file = await manifestFile(h.root, "web.yaml", WEB);
  const r = await h.cli(["apply", "-f", file]);
  t.equal(r.code, 0, r.err);
  t.equal(r.out, "workload/web created\nworkload/db created\n");
  t.same(steps(h.calls), ["homeA Workloads/Apply"]);
  const req = h.calls[0]?.req as { manifestsJson: string[]; dryRun: boolean };
  t.equal(req.dryRun, false);
  t.same(
    JSON.parse(req.manifestsJson[0] as string),
    {
      kind: "Workload",
      name: "web",
      labels: { app: "web" },
      container: { image: "demo/httpd:1", command: ["httpd", "-f", "-p", "8080"] },
      ports: [{ port: 8080, hostPort: 18080, protocol: "tcp" }],
      volumes: [],
      restartPolicy: "Always",
    },
    "defaults applied client-side",
  );
  t.match(JSON.parse(req.manifestsJson[1] as string), { kind: "Workload", name: "db" });

  const dry = await h.cli(["apply", "-f", file, "--dry-run"]);
  t.equal(dry.out, "workload/web created (dry run)\nworkload/db created (dry run)\n");
  t.equal(h.calls.at(-1)?.req.dryRun, true);
});

t.test("apply -f DIR: every *.yaml, *.yml, *.json in name order; other files ignored", async (t) => {
  const h = await harness(async (_m, req) => applied(req, "unchanged"));
  const dir = join(h.root, "manifests");
  await mkdir(dir);
  await writeFile(join(dir, "b.yml"), "kind: Workload\nname: b\ncontainer: { image: x/b:1 }\n");
  await writeFile(
    join(dir, "a.json"),
    JSON.stringify({ kind: "Workload", name: "a", container: { image: "x/a:1" } }),
  );
  await writeFile(join(dir, "c.yaml"), "kind: Workload\nname: c\ncontainer: { image: x/c:1 }\n");
  await writeFile(join(dir, "README.md"), "not a manifest: [");
  const r = await h.cli(["apply", "-f", dir]);
  t.equal(r.code, 0, r.err);
  t.equal(r.out, "workload/a unchanged\nworkload/b unchanged\nworkload/c unchanged\n");

  const empty = join(h.root, "empty");
  await mkdir(empty);
  const e = await h.cli(["apply", "-f", empty]);
  t.equal(e.code, 1);
  t.match(e.err, "no *.yaml, *.yml or *.json files");
  t.equal(h.calls.length, 1);
});

t.test("apply: an invalid manifest sends nothing and names file, document and field", async (t) => {
  const h = await harness(async () => t.fail("nothing may be sent"));
  const file = await manifestFile(
    h.root,
    "bad.yaml",
    `${WEB}---\nkind: Workload\nname: api\ncontainer: { command: [x] }\n`,
  );
  const r = await h.cli(["apply", "-f", file]);
  t.equal(r.code, 1);
  t.equal(h.calls.length, 0);
  t.equal(r.out, "");
  t.match(r.err, /^error: .*bad\.yaml: api: container\.image: is required\n/);

  const unknown = await manifestFile(
    h.root,
    "typo.yaml",
    "kind: Workload\nname: web\ncontainer: { image: x }\nprots: []\n",
  );
  const u = await h.cli(["apply", "-f", unknown]);
  t.equal(u.code, 1);
  t.match(u.err, /typo\.yaml: web: prots: is not a known field/);

  const syntax = await manifestFile(h.root, "syntax.yaml", "kind: Workload\nname: [\n");
  const s = await h.cli(["apply", "-f", syntax]);
  t.equal(s.code, 1);
  t.match(s.err, /syntax\.yaml: document 1: /);

  const missing = await h.cli(["apply", "-f", join(h.root, "nope.yaml")]);
  t.equal(missing.code, 1);
  t.match(missing.err, "nope.yaml: no such file or directory");
  t.equal(h.calls.length, 0);
});

t.test("apply to several capsules: one table with a CAPSULE column; a failure exits 1", async (t) => {
  const h = await harness(async (_m, req, label) => {
    if (label === "homeB")
      throw new CapsuleError(ErrorCode.FailedPrecondition, "hostPort 18080 is taken by nginx");
    return applied(req, "configured");
  });
  const file = await manifestFile(h.root, "web.yaml", WEB);
  const r = await h.cli(["--capsule", "homeA,homeB", "apply", "-f", file]);
  t.equal(r.code, 1);
  t.equal(
    r.out,
    [
      "CAPSULE   RESOURCE       RESULT",
      "homeA     workload/web   configured",
      "homeA     workload/db    configured",
      "homeB     error: hostPort 18080 is taken by nginx",
      "",
    ].join("\n"),
  );
});

t.test("apply --wait: polls Get until every workload runs", async (t) => {
  const polls: Record<string, number> = {};
  const h = await harness(async (method, req) => {
    if (method === "Workloads/Apply") return applied(req);
    t.equal(method, "Workloads/Get");
    const name = req.name as string;
    polls[name] = (polls[name] ?? 0) + 1;
    return workload(name, (polls[name] ?? 0) < 3 ? "pending" : "running", {
      address: `100.64.7.${name.length}`,
    });
  });
  const file = await manifestFile(h.root, "web.yaml", WEB);
  const r = await h.cli(["apply", "-f", file, "--wait"]);
  t.equal(r.code, 0, r.err);
  t.equal(
    r.out,
    "workload/web created\nworkload/db created\nworkload/web running at 100.64.7.3\nworkload/db running at 100.64.7.2\n",
  );
  t.same(polls, { web: 3, db: 3 });
  t.equal(h.calls[1]?.opts?.deadlineMs, 10_000, "each poll has the --timeout deadline");
});

t.test("apply --wait: failed or backoff ends the wait with the capsule's reason", async (t) => {
  const h = await harness(async (method, req) => {
    if (method === "Workloads/Apply") return applied(req);
    if (req.name === "db")
      return workload("db", "backoff", { message: "exited 1: missing POSTGRES_PASSWORD" });
    return workload("web", "running");
  });
  const file = await manifestFile(h.root, "web.yaml", WEB);
  const r = await h.cli(["apply", "-f", file, "--wait"]);
  t.equal(r.code, 1);
  t.equal(r.out, "workload/web created\nworkload/db created\n");
  t.match(
    r.err,
    /^error: workload\/db backoff: exited 1: missing POSTGRES_PASSWORD\nhint: .*workload logs db/,
  );
});

t.test("apply --wait: gives up after --wait-timeout naming the phase", async (t) => {
  const h = await harness(async (method, req) =>
    method === "Workloads/Apply" ? applied(req) : workload(String(req.name), "pending"),
  );
  const file = await manifestFile(h.root, "web.yaml", "kind: Workload\nname: web\ncontainer: { image: x }\n");
  const r = await h.cli(["apply", "-f", file, "--wait", "--wait-timeout", "50ms"], {
    sleep: (ms) => new Promise((res) => setTimeout(res, Math.min(ms, 10))),
  });
  t.equal(r.code, 1);
  t.match(r.err, /^error: workload\/web pending after 0s, not running\nhint: raise --wait-timeout/);
});

// ---------------------------------------------------------------- list, get, lifecycle

t.test("workload list: table, wide, json; several capsules in one table", async (t) => {
  const h = await harness(async (method) => {
    t.equal(method, "Workloads/List");
    return {
      workloads: [
        workload("web", "running"),
        workload("db", "backoff", { ports: [], restarts: 7, address: "100.64.7.3" }),
      ],
    };
  });
  const r = await h.cli(["workload", "list"]);
  t.equal(r.code, 0, r.err);
  t.equal(
    r.out,
    [
      "NAME   PHASE     ADDRESS      IMAGE        RESTARTS   AGE",
      "web    running   100.64.7.2   demo/web:1   2          5m",
      "db     backoff   100.64.7.3   demo/db:1    7          5m",
      "",
    ].join("\n"),
  );
  const wide = await h.cli(["workload", "list", "-o", "wide"]);
  t.match(wide.out, /AGE\s+PORTS\s+LABELS\s+DESIRED\n/);
  t.match(wide.out, /web .* 5m\s+18080:8080\/tcp\s+app=web,tier=front\s+running\n/);
  const json = await h.cli(["workload", "list", "-o", "json"]);
  t.equal(JSON.parse(json.out).workloads[0].name, "web");
  const multi = await h.cli(["--all", "workload", "list"]);
  t.match(multi.out, /^CAPSULE\s+NAME\s+PHASE/);
  t.match(multi.out, /\nhomeB\s+db\s+backoff/);
});

t.test("workload get: key/values, ports and events; -o json the raw object", async (t) => {
  const w = workload("web", "running");
  const h = await harness(async (method, req) => {
    t.equal(method, "Workloads/Get");
    t.same(req, { name: "web" });
    return w;
  });
  const r = await h.cli(["workload", "get", "web"]);
  t.equal(r.code, 0, r.err);
  t.match(r.out, /^Name:\s+web\n/);
  t.match(r.out, /\nAddress:\s+100\.64\.7\.2\n/);
  t.match(r.out, /\nCreated:\s+2026-11-23T11:55:00\.000Z \(5m ago\)\n/);
  t.match(r.out, /\nPorts:\n {2}PORT\s+HOST-PORT\n {2}8080\/tcp\s+18080\n/);
  t.match(
    r.out,
    /\nEvents:\n {2}AGE\s+TYPE\s+MESSAGE\n {2}5m\s+created\s+container created\n {2}30s\s+started\s+pid 4242\n$/,
  );
  const j = await h.cli(["workload", "get", "web", "-o", "json"]);
  t.same(JSON.parse(j.out), w);
  const y = await h.cli(["workload", "get", "web", "-o", "yaml"]);
  t.match(y.out, /^name: web\n/);
});

t.test("workload start|stop|restart|delete: one RPC each, a kubectl-style line", async (t) => {
  const h = await harness(async (method, req) => {
    if (method === "Workloads/Delete") return { deleted: req.name === "web" };
    return workload(String(req.name), method === "Workloads/Stop" ? "stopped" : "running");
  });
  for (const [verb, method, said] of [
    ["start", "Workloads/Start", "started"],
    ["stop", "Workloads/Stop", "stopped"],
    ["restart", "Workloads/Restart", "restarted"],
    ["delete", "Workloads/Delete", "deleted"],
  ]) {
    const r = await h.cli(["workload", verb as string, "web"]);
    t.equal(r.code, 0, r.err);
    t.equal(r.out, `workload/web ${said}\n`);
    t.equal(h.calls.at(-1)?.method, method);
    t.same(h.calls.at(-1)?.req, { name: "web" });
  }
  const gone = await h.cli(["workload", "delete", "ghost"]);
  t.equal(gone.code, 0);
  t.equal(gone.out, "workload/ghost not found\n");

  const multi = await h.cli(["--all", "workload", "stop", "web"]);
  t.equal(
    multi.out,
    "CAPSULE   WORKLOAD   RESULT    PHASE\nhomeA     web        stopped   stopped\nhomeB     web        stopped   stopped\n",
  );

  const nf = await harness(async () => {
    throw new CapsuleError(ErrorCode.NotFound, "workload ghost does not exist", {
      hint: "capsulectl workload list",
    });
  });
  const e = await nf.cli(["workload", "stop", "ghost"]);
  t.equal(e.code, 1);
  t.equal(e.err, "error: workload ghost does not exist\nhint: capsulectl workload list\n");
});

// ---------------------------------------------------------------- logs

t.test("workload logs: streams chunks to stdout as they come, bounded by --timeout", async (t) => {
  const h = await harness(
    async () => t.fail("no unary call"),
    async function* (method, req) {
      t.equal(method, "Workloads/Logs");
      t.same(req, { name: "web", follow: false, tailLines: 20 });
      yield { data: Buffer.from("line 1\nline ") };
      yield { data: Buffer.from("2\n") };
    },
  );
  const r = await h.cli(["workload", "logs", "web", "--tail", "20"]);
  t.equal(r.code, 0, r.err);
  t.equal(r.out, "line 1\nline 2\n");
  t.equal(h.calls[0]?.opts?.deadlineMs, 10_000);

  const bad = await h.cli(["workload", "logs", "web", "--tail", "x"]);
  t.equal(bad.code, 2);
  const two = await h.cli(["--all", "workload", "logs", "web"]);
  t.equal(two.code, 1);
  t.match(two.err, "workload logs talks to one capsule, 2 selected");
});

t.test("workload logs -f: no deadline, follows until Ctrl-C, then exits 0", async (t) => {
  let interrupt: (() => void) | undefined;
  let undone = false;
  const h = await harness(
    async () => t.fail("no unary call"),
    async function* (_method, req, _label, signal) {
      t.equal(req.follow, true);
      yield { data: Buffer.from("hello\n") };
      // The user presses Ctrl-C while the stream waits for more.
      setImmediate(() => interrupt?.());
      await new Promise((_, reject) =>
        signal?.addEventListener("abort", () => reject(new Error("cancelled"))),
      );
    },
  );
  const r = await h.cli(["workload", "logs", "web", "-f"], {
    onInterrupt: (fn) => {
      interrupt = fn;
      return () => {
        undone = true;
      };
    },
  });
  t.equal(r.code, 0, r.err);
  t.equal(r.out, "hello\n");
  t.equal(r.err, "");
  t.equal(h.calls[0]?.opts?.deadlineMs, null, "a follow has no deadline");
  t.ok(undone, "the Ctrl-C handler is removed");
});

t.test("workload logs: a stream error is the command's error", async (t) => {
  const h = await harness(
    async () => t.fail("no unary call"),
    async function* () {
      yield { data: Buffer.from("partial\n") };
      throw new CapsuleError(ErrorCode.NotFound, "workload web does not exist");
    },
  );
  const r = await h.cli(["workload", "logs", "web"]);
  t.equal(r.code, 1);
  t.equal(r.out, "partial\n");
  t.equal(r.err, "error: workload web does not exist\n");
});

// ---------------------------------------------------------------- exec

t.test("workload exec: argv after --, output printed, the command's exit code", async (t) => {
  const h = await harness(async (method, req) => {
    t.equal(method, "Workloads/Exec");
    const argv = req.argv as string[];
    return {
      exitCode: argv[0] === "false" ? 3 : 0,
      stdout: Buffer.from(argv[0] === "false" ? "" : "a\nb\n"),
      stderr: Buffer.from(argv[0] === "false" ? "nope\n" : ""),
    };
  });
  const r = await h.cli(["workload", "exec", "web", "--", "ls", "-la", "/data"]);
  t.equal(r.code, 0, r.err);
  t.same(h.calls[0]?.req, { name: "web", argv: ["ls", "-la", "/data"], timeoutSeconds: 60 });
  t.equal(h.calls[0]?.opts?.deadlineMs, 70_000, "the call outlives the command");
  t.equal(r.out, "a\nb\n");
  const f = await h.cli(["workload", "exec", "web", "--exec-timeout", "5s", "--", "false"]);
  t.equal(f.code, 3);
  t.equal(f.err, "nope\n");
  t.equal(h.calls.at(-1)?.req.timeoutSeconds, 5);
  const j = await h.cli(["workload", "exec", "web", "-o", "json", "--", "false"]);
  t.same(JSON.parse(j.out), { exitCode: 3, stdout: "", stderr: "nope\n" });
  t.equal(j.code, 3);
});

// ---------------------------------------------------------------- exec -t / -i (ExecStream)

type Msg = Record<string, unknown>;

/** execServer plays Workloads/ExecStream: `script` gets the start message and the rest of the input. */
function execServer(script: (start: Msg, rest: AsyncIterator<Msg>) => AsyncIterable<Msg>) {
  return async function* (method: string, req: Record<string, unknown>) {
    if (method !== "Workloads/ExecStream") throw new Error(`unexpected ${method}`);
    const it = (req.input as AsyncIterable<Msg>)[Symbol.asyncIterator]();
    const first = await it.next();
    yield* script(first.value as Msg, it);
  };
}

const out = (s: string) => ({ msg: "stdout", stdout: Buffer.from(s) });
const noUnary = async () => {
  throw new Error("no unary call");
};

t.test("exec -t: a terminal of the local size, resizes forwarded, the exit code", async (t) => {
  const term = new FakeTerminal({ rows: 33, cols: 101 });
  const h = await harness(
    noUnary,
    execServer(async function* (start, rest) {
      t.same(start, {
        start: {
          name: "web",
          argv: ["sh", "-c", "tty; stty size"],
          tty: true,
          stdin: false,
          rows: 33,
          cols: 101,
        },
      });
      yield out("/dev/pts/0\r\n33 101\r\n");
      term.resize({ rows: 40, cols: 120 });
      t.same((await rest.next()).value, { resize: { rows: 40, cols: 120 } });
      yield { msg: "exitCode", exitCode: 7 };
    }),
  );
  const r = await h.cli(["workload", "exec", "-t", "web", "--", "sh", "-c", "tty; stty size"], {
    terminal: term,
  });
  t.equal(r.code, 7, r.err);
  t.equal(r.out, "/dev/pts/0\r\n33 101\r\n");
  t.same(term.events, [], "no raw mode without -i");
  t.equal(term.listeners, 0, "every handler removed");
});

t.test("exec -i: stdin forwarded, its end sent as stdin_closed, stderr apart", async (t) => {
  const h = await harness(
    noUnary,
    execServer(async function* (start, rest) {
      t.match(start, { start: { argv: ["cat"], tty: false, stdin: true, rows: 0, cols: 0 } });
      let input = "";
      for (;;) {
        const m = (await rest.next()).value as Msg;
        if (m.stdinClosed) break;
        input += (m.stdin as Buffer).toString();
      }
      yield out(input);
      yield { msg: "stderr", stderr: Buffer.from("warn\n") };
      yield { msg: "exitCode", exitCode: 0 };
    }),
  );
  const r = await h.cli(["workload", "exec", "-i", "web", "--", "cat"], {
    stdin: Object.assign(Readable.from([Buffer.from("hi\n"), Buffer.from("there\n")]), { isTTY: false }),
  });
  t.equal(r.code, 0, r.err);
  t.equal(r.out, "hi\nthere\n");
  t.equal(r.err, "warn\n");
  t.same(steps(h.calls), ["homeA Workloads/ExecStream"]);
  t.equal(h.calls[0]?.opts?.deadlineMs, null, "no deadline on a session");
});

t.test("exec -ti on a terminal: raw mode on, and off again even when the call fails", async (t) => {
  const term = new FakeTerminal({ rows: 24, cols: 80 });
  const h = await harness(
    noUnary,
    execServer(async function* () {
      t.same(term.events, ["raw on"]);
      yield* [];
      throw new CapsuleError(ErrorCode.FailedPrecondition, "container web.1 is not running", {
        hint: "start the workload first",
      });
    }),
  );
  const stdin = Object.assign(new PassThrough(), { isTTY: true });
  const r = await h.cli(["workload", "exec", "-ti", "web", "--", "sh"], { terminal: term, stdin });
  t.equal(r.code, 1);
  t.equal(r.err, "error: container web.1 is not running\nhint: start the workload first\n");
  t.same(term.events, ["raw on", "raw off"]);
  t.equal(term.listeners, 0);
  t.equal(stdin.listenerCount("data"), 0, "stdin let go");
});

t.test("exec -i: SIGTERM cancels the session (the capsule kills the command), exit 130", async (t) => {
  const term = new FakeTerminal();
  const h = await harness(
    noUnary,
    async function* (_m: string, req: Record<string, unknown>, _l: string, signal?: AbortSignal) {
      const it = (req.input as AsyncIterable<Msg>)[Symbol.asyncIterator]();
      await it.next();
      yield out("started\n");
      term.terminate();
      t.ok(signal?.aborted, "the call is cancelled");
      throw new CapsuleError(ErrorCode.Internal, "cancelled");
    },
  );
  const stdin = Object.assign(new PassThrough(), { isTTY: false });
  const r = await h.cli(["workload", "exec", "-i", "web", "--", "sleep", "100"], { terminal: term, stdin });
  t.equal(r.code, 130);
  t.equal(r.out, "started\n");
  t.equal(term.listeners, 0);
});

t.test("exec -t: a session that ends without an exit code is an error", async (t) => {
  const h = await harness(
    noUnary,
    execServer(async function* () {
      yield out("x");
    }),
  );
  const r = await h.cli(["workload", "exec", "-t", "web", "--", "true"]);
  t.equal(r.code, 1);
  t.match(r.err, /ended without an exit code/);
});

t.test("ports and ages render as the tables show them", async (t) => {
  t.equal(
    portsText([
      { port: 8080, hostPort: 0, protocol: "tcp" },
      { port: 53, hostPort: 5353, protocol: "udp" },
    ]),
    "8080/tcp,5353:53/udp",
  );
  t.equal(ageText("", NOW), "");
  t.equal(ageText("garbage", NOW), "");
  t.equal(ageText("2026-11-23T09:00:00Z", NOW), "3h");
});
