// End-to-end: real capsuled processes on loopback driven by the real capsulectl binary
// (dist/src/cli/main.js; `npm run build` first), each run with its own --config-dir. Every
// wait is bounded; every process and temp dir is removed in teardown, and the last test
// checks that nothing is left running.
import { type ChildProcess, spawn } from "node:child_process";
import { rmSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { join } from "node:path";
import { pathToFileURL } from "node:url";
import t, { type Test } from "tap";
import {
  CAPSULECTL,
  type Daemon,
  removeDir,
  type StartOptions,
  startDaemon,
  tempDir,
} from "../helpers/capsuled.js";

/** CTL_KILL_MS bounds one capsulectl run: a hung CLI is killed and fails its test. */
const CTL_KILL_MS = 30_000;

/** Every process this file starts, so the last test can check that none is left. */
const started: ChildProcess[] = [];

interface CtlResult {
  code: number | null;
  out: string;
  err: string;
  ms: number;
}

/**
 * BARE runs capsulectl's run() without main.ts, so without its exit timer: the process ends
 * only when nothing holds the event loop, which is what a leaked socket would break.
 */
const BARE = `import { run } from ${JSON.stringify(pathToFileURL(CAPSULECTL.replace(/main\.js$/, "program.js")).href)};
process.exitCode = await run(process.argv.slice(1));`;

/**
 * ctl runs capsulectl with `--config-dir dir` and resolves with its exit code, output and run
 * time; `bare` runs it without the exit timer of main.ts (see BARE).
 */
function ctl(dir: string, args: string[], opts: { bare?: boolean } = {}): Promise<CtlResult> {
  const t0 = Date.now();
  const env: NodeJS.ProcessEnv = { ...process.env, USER: "e2e", HOME: dir };
  delete env.CAPSULE_CONFIG_DIR;
  delete env.CAPSULE_HOST;
  const entry = opts.bare ? ["--input-type=module", "-e", BARE, "--"] : [CAPSULECTL];
  const p = spawn(process.execPath, [...entry, "--config-dir", dir, ...args], {
    stdio: ["ignore", "pipe", "pipe"],
    env,
  });
  started.push(p);
  let out = "";
  let err = "";
  p.stdout?.on("data", (d) => {
    out += String(d);
  });
  p.stderr?.on("data", (d) => {
    err += String(d);
  });
  return new Promise((resolve) => {
    const kill = setTimeout(() => p.kill("SIGKILL"), CTL_KILL_MS);
    p.once("close", (code) => {
      clearTimeout(kill);
      resolve({ code, out, err, ms: Date.now() - t0 });
    });
  });
}

/** errorLines are the `error:` lines of a run's stderr. */
const errorLines = (r: CtlResult) => r.err.split("\n").filter((l) => l.startsWith("error: "));

/** start starts a capsuled and registers it for the final check. */
async function start(opts: StartOptions): Promise<Daemon> {
  const d = await startDaemon(opts);
  started.push(d.proc);
  return d;
}

/** freePort asks the kernel for a free loopback port. */
async function freePort(): Promise<number> {
  const srv = createServer();
  await new Promise<void>((r) => srv.listen(0, "127.0.0.1", r));
  const port = (srv.address() as { port: number }).port;
  await new Promise((r) => srv.close(r));
  return port;
}

/** START_TIMEOUT_MS bounds one capsuled start: 20 starting at once on a small machine take a while. */
const START_TIMEOUT_MS = 60_000;

/**
 * fleet keeps a test's daemons and temp dirs and removes them all in teardown, after waiting
 * for starts still in flight (a test that failed while others were starting leaks nothing).
 */
function fleet(t: Test) {
  const daemons: Daemon[] = [];
  const dirs: string[] = [];
  const pending = new Set<Promise<unknown>>();
  t.teardown(async () => {
    await Promise.allSettled([...pending]);
    await Promise.all(daemons.map((d) => d.kill("SIGKILL")));
    for (const d of dirs) removeDir(d);
  });
  const dir = (prefix = "capsulectl-e2e-"): string => {
    const d = tempDir(prefix);
    dirs.push(d);
    return d;
  };
  const track = (opts: StartOptions): Promise<Daemon> => {
    const p = start({ timeoutMs: START_TIMEOUT_MS, ...opts }).then((d) => {
      daemons.push(d);
      return d;
    });
    const settled: Promise<unknown> = p.then(
      () => pending.delete(settled),
      () => pending.delete(settled),
    );
    pending.add(settled);
    return p;
  };
  return {
    dir,
    /** start starts a capsuled on a state dir of its own (removed in teardown). */
    start: (opts: StartOptions = {}): Promise<Daemon> =>
      track({ ...opts, stateDir: opts.stateDir ?? dir("capsule-test-") }),
    /** restart SIGKILLs `d` and starts it again on its state dir and port. */
    async restart(d: Daemon, args: string[] = []): Promise<Daemon> {
      await d.kill("SIGKILL");
      return track({ name: d.name, stateDir: d.stateDir, port: d.port, args });
    },
  };
}

t.test("adopt (--yes, --fingerprint), capsule info, contexts", async (t) => {
  const f = fleet(t);
  const [alpha, beta] = await Promise.all([f.start({ name: "alpha" }), f.start({ name: "beta" })]);
  const dir = f.dir();

  const a = await ctl(dir, ["adopt", alpha.address, "--name", "alpha", "--yes"]);
  t.equal(a.code, 0, a.err);
  t.equal(a.out, `adopted alpha (${alpha.id}) at ${alpha.address}, fingerprint ${alpha.fingerprint}\n`);
  t.match(a.err, `${alpha.address} presents key fingerprint ${alpha.fingerprint}`);
  const b = await ctl(dir, ["adopt", beta.address, "--name", "beta", "--fingerprint", beta.fingerprint]);
  t.equal(b.code, 0, b.err);
  const wrong = await ctl(dir, [
    "adopt",
    beta.address,
    "--name",
    "beta2",
    "--fingerprint",
    alpha.fingerprint,
  ]);
  t.equal(wrong.code, 1, "a --fingerprint that does not match refuses");
  t.equal(errorLines(wrong).length, 1);

  const info = await ctl(dir, ["capsule", "info"]);
  t.equal(info.code, 0, info.err);
  const [header, row, ...rest] = info.out.trimEnd().split("\n");
  t.match(header, /^NAME\s+ID\s+VERSION\s+FABRIC-ADDRESS\s+UPTIME\s+KERNEL\s+WIREGUARD$/);
  t.match(row, new RegExp(`^alpha\\s+${alpha.id}\\s+\\d+\\.\\d+\\.\\d+\\s`));
  t.same(rest, [], "one capsule, one row");
  const json = await ctl(dir, ["capsule", "info", "-o", "json"]);
  t.equal(json.code, 0, json.err);
  const o = JSON.parse(json.out) as { id: string; name: string; fingerprint: string; operatorCount: number };
  t.same(
    { id: o.id, name: o.name, fingerprint: o.fingerprint, operatorCount: o.operatorCount },
    { id: alpha.id, name: "alpha", fingerprint: alpha.fingerprint, operatorCount: 1 },
  );
  const wide = await ctl(dir, ["--capsule", "beta", "capsule", "info", "-o", "wide"]);
  t.match(wide.out, new RegExp(`beta .*${beta.fingerprint.replace(/[+/]/g, "\\$&")}\\s+closed\\s+1\\n`));

  const list = await ctl(dir, ["context", "list"]);
  t.equal(list.code, 0, list.err);
  t.match(list.out, /^CURRENT\s+NAME\s+ADDRESS\s+CAPSULE-ID\s+FINGERPRINT\n\*\s+alpha\s/);
  t.match(list.out, new RegExp(`\\n\\s+beta\\s+${beta.address}\\s+${beta.id}\\s`));
  t.equal((await ctl(dir, ["context", "use", "beta"])).out, 'switched to context "beta"\n');
  const show = await ctl(dir, ["context", "show", "-o", "json"]);
  t.match(JSON.parse(show.out), { name: "beta", address: beta.address, capsuleId: beta.id, current: true });
  const del = await ctl(dir, ["context", "delete", "beta"]);
  t.equal(del.code, 0, del.err);
  t.equal(del.err, "hint: no current context now; pick one: capsulectl context use NAME\n");
  const after = await ctl(dir, ["context", "list", "-o", "json"]);
  t.same(
    (JSON.parse(after.out) as { name: string }[]).map((c) => c.name),
    ["alpha"],
  );
});

t.test("adopt after the claim window closed: one error line and a hint; nothing saved", async (t) => {
  const f = fleet(t);
  const d = await f.start({ name: "late", args: ["--claim-window", "1s"] });
  await new Promise((r) => setTimeout(r, 1300));
  const dir = f.dir();
  const r = await ctl(dir, ["adopt", d.address, "--name", "late", "--yes"]);
  t.equal(r.code, 1);
  t.equal(errorLines(r).length, 1, r.err);
  t.match(r.err, /\nerror: claim window is closed[^\n]*\nhint: [^\n]+\n$/);
  t.equal(r.out, "");
  t.equal((await ctl(dir, ["context", "list", "-o", "json"])).out, "[]\n", "no context saved");
});

t.test("a capsule that regenerated its key is refused, naming both keys and how to re-pin", async (t) => {
  const f = fleet(t);
  const d = await f.start({ name: "rekeyed" });
  const dir = f.dir();
  t.equal((await ctl(dir, ["adopt", d.address, "--name", "rekeyed", "--yes"])).code, 0);
  await d.kill("SIGKILL");
  rmSync(join(d.stateDir, "tls.key"));
  rmSync(join(d.stateDir, "tls.crt"));
  const d2 = await f.restart(d);
  t.not(d2.fingerprint, d.fingerprint, "a new key");
  const r = await ctl(dir, ["capsule", "info"]);
  t.equal(r.code, 1);
  t.equal(r.out, "");
  t.equal(
    r.err,
    `error: rekeyed: server presents key ${d2.fingerprint}, but ${d.fingerprint} is pinned\n` +
      `hint: if the capsule was reinstalled on purpose, re-pin: capsulectl context delete rekeyed && capsulectl adopt ${d.address} --name rekeyed --fingerprint ${d2.fingerprint}\n`,
  );
});

t.test(
  "unknown context, malformed config, unreachable capsule: one error line and a hint, bounded",
  async (t) => {
    const f = fleet(t);
    const d = await f.start({ name: "gone" });
    const dir = f.dir();
    t.equal((await ctl(dir, ["adopt", d.address, "--name", "gone", "--yes"])).code, 0);

    const unknown = await ctl(dir, ["--capsule", "ghost", "capsule", "info"]);
    t.equal(unknown.code, 1);
    t.equal(unknown.err, 'error: unknown context "ghost"\nhint: known contexts: gone\n');

    const bad = f.dir();
    writeFileSync(join(bad, "config.yaml"), "contexts: [\n  - name: x\n");
    const malformed = await ctl(bad, ["capsule", "info"]);
    t.equal(malformed.code, 1);
    t.match(
      malformed.err,
      new RegExp(
        `^error: ${join(bad, "config.yaml")}: not valid YAML: [^\\n]+\\nhint: fix or remove [^\\n]+\\n$`,
      ),
    );

    // The Fabric service answers through the CLI; this capsule runs without one (--no-fabric).
    const fabric = await ctl(dir, ["fabric", "status"]);
    t.equal(fabric.code, 1);
    t.match(fabric.err, /^error: the fabric is not running on this capsule\nhint: [^\n]+\n$/);
    const self = await ctl(dir, ["fabric", "enroll", "gone", "gone"]);
    t.equal(self.code, 1);
    t.match(self.err, /^error: fabric: gone and gone are the same capsule\nhint: /);

    await d.kill("SIGKILL");
    const down = await ctl(dir, ["--timeout", "2s", "capsule", "info"]);
    t.equal(down.code, 1);
    t.ok(down.ms < 5000, `failed within the deadline (${down.ms} ms)`);
    t.equal(errorLines(down).length, 1, down.err);
    t.match(down.err, /^error: gone: [^\n]+\nhint: check that capsuled runs there[^\n]*\n$/);

    // Something that accepts TCP on the capsule's port but never speaks TLS: the target is
    // dropped at its deadline, stuck in the handshake, and the command still ends promptly.
    const mute = createServer((sock) => {
      sock.on("error", () => {});
      sock.resume();
    });
    await new Promise<void>((r) => mute.listen(d.port, "127.0.0.1", r));
    t.teardown(() => new Promise((r) => mute.close(r)));
    // Bare: no exit timer to hide a socket left open (the handshake is closed by RpcClient.close).
    const stuck = await ctl(dir, ["--timeout", "1s", "capsule", "info"], { bare: true });
    t.equal(stuck.code, 1);
    t.ok(stuck.ms < 4000, `ended ${stuck.ms} ms after start with a 1 s deadline`);
    // The fan-out deadline and the call's own fire together; either names the target.
    t.match(
      stuck.err,
      /^error: gone: no answer (within 1s|before the deadline)\nhint: check that capsuled runs there[^\n]*\n$/,
    );
  },
);

t.test("fan-out over 20 capsules, 2 killed: one table, 18 rows of data, 2 errors, exit 1", async (t) => {
  const f = fleet(t);
  const names = Array.from({ length: 20 }, (_, i) => `c${i + 1}`);
  const daemons = await Promise.all(names.map((name) => f.start({ name })));
  const dir = f.dir();
  // Parallel adopts into one config dir: the config lock keeps every context.
  const adopts = await Promise.all(
    daemons.map((d) => ctl(dir, ["adopt", d.address, "--name", d.name, "--yes"])),
  );
  t.same(
    adopts.filter((r) => r.code !== 0).map((r) => r.err),
    [],
    "every adopt succeeds",
  );
  const all = await ctl(dir, ["context", "list", "-o", "json"]);
  t.same((JSON.parse(all.out) as { name: string }[]).map((c) => c.name).sort(), [...names].sort());

  const healthy = await ctl(dir, ["--all", "capsule", "info"]);
  t.equal(healthy.code, 0, healthy.err);

  const dead = [daemons[3], daemons[16]] as Daemon[];
  await Promise.all(dead.map((d) => d.kill("SIGKILL")));
  const r = await ctl(dir, ["--all", "--timeout", "5s", "capsule", "info"]);
  t.equal(r.code, 1);
  t.ok(r.ms < 10_000, `bounded (${r.ms} ms)`);
  const lines = r.out.trimEnd().split("\n");
  t.match(lines[0], /^CAPSULE\s+NAME\s+ID\s+VERSION\s/, "one table with a CAPSULE column");
  t.equal(lines.filter((l) => /^CAPSULE\s/.test(l)).length, 1, "one header");
  const rows = lines.slice(1);
  t.equal(rows.length, 20);
  const errors = rows.filter((l) => /^c\d+\s+error: /.test(l));
  t.same(errors.map((l) => l.split(/\s+/)[0]).sort(), dead.map((d) => d.name).sort());
  const ok = rows.filter((l) => !/\serror: /.test(l));
  t.equal(ok.length, 18);
  for (const d of daemons.filter((x) => !dead.includes(x))) {
    t.ok(
      ok.some((l) => new RegExp(`^${d.name}\\s+${d.name}\\s+${d.id}\\s`).test(l)),
      `${d.name} has its own row`,
    );
  }

  const j = await ctl(dir, ["--all", "--timeout", "5s", "capsule", "info", "-o", "json"]);
  t.equal(j.code, 1);
  const list = JSON.parse(j.out) as { capsule: string; id?: string; error?: { code: string } }[];
  t.equal(list.length, 20);
  t.same(
    list
      .filter((x) => x.error)
      .map((x) => x.capsule)
      .sort(),
    dead.map((d) => d.name).sort(),
  );
  t.ok(list.filter((x) => !x.error).every((x) => x.id === daemons.find((d) => d.name === x.capsule)?.id));
  for (const e of list.filter((x) => x.error)) t.match(e.error?.code, /^CAPSULE_(UNREACHABLE|TIMEOUT)$/);
});

t.test("SIGKILL + restart of capsuled keeps the context working", async (t) => {
  const f = fleet(t);
  const d = await f.start({ name: "sturdy" });
  const dir = f.dir();
  t.equal((await ctl(dir, ["adopt", d.address, "--name", "sturdy", "--yes"])).code, 0);
  const d2 = await f.restart(d);
  t.equal(d2.fingerprint, d.fingerprint, "same key");
  const info = await ctl(dir, ["capsule", "info", "-o", "json"]);
  t.equal(info.code, 0, info.err);
  t.match(JSON.parse(info.out), { id: d.id, fingerprint: d.fingerprint, operatorCount: 1, claimOpen: false });
  const ops = await ctl(dir, ["operator", "list", "-o", "json"]);
  t.equal(ops.code, 0, ops.err);
  t.equal((JSON.parse(ops.out) as { operators: unknown[] }).operators.length, 1, "the operator survived");
});

t.test("metrics count the CLI's calls, refused ones by their CAPSULE_* code", async (t) => {
  const f = fleet(t);
  const port = await freePort();
  const d = await f.start({ name: "counted", args: ["--metrics", `127.0.0.1:${port}`] });
  const dir = f.dir();
  t.equal((await ctl(dir, ["adopt", d.address, "--name", "counted", "--yes"])).code, 0);
  const calls = 3;
  for (let i = 0; i < calls; i++) t.equal((await ctl(dir, ["capsule", "info"])).code, 0);
  // A second operator's adopt is refused: the claim window closed with the first.
  const other = await ctl(f.dir(), ["adopt", d.address, "--name", "counted", "--yes"]);
  t.equal(other.code, 1);

  const res = await fetch(`http://127.0.0.1:${port}/metrics`, { signal: AbortSignal.timeout(5000) });
  t.equal(res.status, 200);
  const text = await res.text();
  const count = (method: string, code: string): number => {
    const line = text
      .split("\n")
      .find(
        (l) =>
          l.startsWith("capsule_rpc_requests_total{") &&
          l.includes(`method="${method}"`) &&
          l.includes(`code="${code}"`),
      );
    return line ? Number(line.split(" ").pop()) : 0;
  };
  t.ok(
    count("/capsule.v1.Capsule/Info", "OK") >= calls,
    `Info OK ${count("/capsule.v1.Capsule/Info", "OK")} >= ${calls}`,
  );
  t.equal(count("/capsule.v1.Capsule/Claim", "OK"), 1);
  t.equal(count("/capsule.v1.Capsule/Claim", "CAPSULE_CLAIM_CLOSED"), 1, "the refused call, by its code");
});

t.test("workload exec -i/-t: a streamed call, refused with the capsule's reason", async (t) => {
  const f = fleet(t);
  // --no-fabric: no workload runtime, so ExecStream answers FAILED_PRECONDITION after the token check.
  const d = await f.start({ name: "bare" });
  const dir = f.dir();
  t.equal((await ctl(dir, ["adopt", d.address, "--name", "bare", "--yes"])).code, 0);
  for (const flags of [["-i"], ["-t"], ["-ti"]]) {
    // bare: no exit timer, so a stdin listener or channel left open would hang it (and fail).
    const r = await ctl(dir, ["workload", "exec", ...flags, "web", "--", "cat"], { bare: true });
    t.equal(r.code, 1, `${flags.join(" ")}: exit 1`);
    t.match(errorLines(r), ["error: workloads are not available on this capsule"]);
    t.match(r.err, /\nhint: they need the fabric/);
  }
});

t.test("nothing is left running", async (t) => {
  t.ok(started.length > 20, `${started.length} processes started`);
  t.same(
    started.filter((p) => p.exitCode === null && p.signalCode === null).map((p) => p.pid),
    [],
    "every capsuled and capsulectl this file started has exited",
  );
});
