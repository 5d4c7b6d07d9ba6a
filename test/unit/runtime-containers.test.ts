// Containers over a FakeRunner: the exact ctr lines (golden), the parsers of ctr's output, and the
// run/stop/status/exec/logs flows against scripted answers.
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { appendFile, readFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import t, { type Test } from "tap";
import type { Clock } from "../../src/node/host/clock.js";
import { FakeRunner, type RunResult } from "../../src/node/host/runner.js";
import {
  type ContainerSpec,
  Containers,
  containerId,
  defaultCgroupParent,
  deleteContainerArgv,
  deleteTaskArgv,
  execArgv,
  killArgv,
  listContainersArgv,
  parseContainerId,
  parseDeletedExitCode,
  parseTasks,
  runArgv,
  specHash,
  startArgv,
  validateSpec,
} from "../../src/node/runtime/containers.js";
import { type CtrEndpoint, ctrError, parseHumanBytes, parseTable } from "../../src/node/runtime/ctr.js";
import { Images } from "../../src/node/runtime/images.js";

const EP: CtrEndpoint = { address: "/s/containerd.sock", namespace: "capsule", snapshotter: "overlayfs" };
const CTR = "ctr -a /s/containerd.sock -n capsule";

class InstantClock implements Clock {
  t = 0;
  now() {
    return this.t;
  }
  async sleep(ms: number) {
    this.t += ms;
  }
}

const WEB: ContainerSpec = {
  workload: "web",
  generation: 3,
  image: "demo/httpd:1",
  command: ["httpd", "-f", "-p", "8080"],
  env: { Z: "last", A: "a=b c" },
  netns: "/run/netns/cw-web",
  mounts: [
    { source: "/state/volumes/data", target: "/data" },
    { source: "/state/conf", target: "/etc/app", readOnly: true },
  ],
};

t.test("ids: workload.generation, parsed back, bad ones refused", async (t) => {
  t.equal(containerId("web", 3), "web.3");
  t.equal(containerId("a-b-1", 999_999_999), "a-b-1.999999999");
  t.same(parseContainerId("web.3"), { workload: "web", generation: 3 });
  t.same(parseContainerId("a-b-1.12"), { workload: "a-b-1", generation: 12 });
  for (const bad of ["web", "web.0", "web.03", "Web.1", "-web.1", "web.1.2", "web-.1", "x".repeat(64) + ".1"])
    t.equal(parseContainerId(bad), undefined, bad);
  for (const [w, g] of [
    ["Web", 1],
    ["web.x", 1],
    ["", 1],
    ["web", 0],
    ["web", 1.5],
    ["web", 1e10],
  ] as const)
    t.throws(() => containerId(w, g), { code: "CAPSULE_INVALID_ARGUMENT" }, `${w} ${g}`);
});

t.test("validateSpec names the bad field before any effect", async (t) => {
  t.doesNotThrow(() => validateSpec(WEB));
  const bad: [Partial<ContainerSpec>, RegExp][] = [
    [{ image: "" }, /^image/],
    [{ netns: "cw-web" }, /^netns/],
    [{ env: { "1X": "v" } }, /^env/],
    [{ env: { X: "a\0b" } }, /^env/],
    [{ command: ["a\0"] }, /^command/],
    [{ mounts: [{ source: "rel", target: "/d" }] }, /^mounts\.source/],
    [{ mounts: [{ source: "/a,b", target: "/d" }] }, /^mounts\.source/],
    [{ mounts: [{ source: "/a", target: "/d=x" }] }, /^mounts\.target/],
  ];
  for (const [patch, msg] of bad)
    t.throws(() => validateSpec({ ...WEB, ...patch }), { code: "CAPSULE_INVALID_ARGUMENT", message: msg });
});

t.test("specHash is stable across key order and changes with any field", async (t) => {
  const h = specHash(WEB);
  t.match(h, /^[0-9a-f]{32}$/);
  t.equal(specHash({ ...WEB, env: { A: "a=b c", Z: "last" } }), h, "env order does not matter");
  for (const patch of [
    { generation: 4 },
    { image: "demo/httpd:2" },
    { command: ["httpd"] },
    { env: {} },
    { netns: "/run/netns/cw-x" },
    { mounts: [] },
    { mounts: [{ source: "/state/volumes/data", target: "/data", readOnly: true }] },
  ])
    t.not(specHash({ ...WEB, ...patch }), h, JSON.stringify(patch));
  t.equal(specHash({ ...WEB, command: undefined }), specHash({ ...WEB, command: [] }), "unset = empty");
});

t.test("defaultCgroupParent: one per containerd, under /capsule", async (t) => {
  t.match(defaultCgroupParent(EP), /^\/capsule\/[0-9a-f]{12}$/);
  t.equal(defaultCgroupParent({ ...EP, namespace: "x" }), defaultCgroupParent(EP), "by address");
  t.not(defaultCgroupParent({ ...EP, address: "/t/containerd.sock" }), defaultCgroupParent(EP));
});

t.test("golden ctr lines", async (t) => {
  const o = {
    imageName: "docker.io/demo/httpd:1",
    logPath: "/state/containers/web.3.log",
    cgroupPath: "/capsule/web.3",
  };
  t.equal(
    runArgv(EP, WEB, o).join(" "),
    `${CTR} run -d --snapshotter overlayfs --cgroup /capsule/web.3` +
      " --log-uri file:///state/containers/web.3.log --with-ns network:/run/netns/cw-web" +
      ` --label capsule.workload=web --label capsule.generation=3 --label capsule.spec=${specHash(WEB)}` +
      " --env A=a=b c --env Z=last" +
      " --mount type=bind,src=/state/volumes/data,dst=/data,options=rbind:rw" +
      " --mount type=bind,src=/state/conf,dst=/etc/app,options=rbind:ro" +
      " docker.io/demo/httpd:1 web.3 httpd -f -p 8080",
  );
  const bare = runArgv(EP, { workload: "job", generation: 1, image: "x:1", netns: "/n" }, o);
  t.same(bare.slice(-2), ["docker.io/demo/httpd:1", "job.1"], "no command: the image's");
  t.ok(runArgv(EP, WEB, o).includes("A=a=b c"), "an env value is one argument, spaces and all");
  t.equal(
    runArgv(EP, WEB, { ...o, logPath: "/state dir/web.3.log" })[runArgv(EP, WEB, o).indexOf("--log-uri") + 1],
    "file:///state%20dir/web.3.log",
    "the log URI is a URL",
  );
  t.equal(
    startArgv(EP, "web.3", "/l/web.3.log").join(" "),
    `${CTR} tasks start -d --log-uri file:///l/web.3.log web.3`,
  );
  t.equal(killArgv(EP, "web.3", "SIGTERM").join(" "), `${CTR} tasks kill -s SIGTERM web.3`);
  t.equal(deleteTaskArgv(EP, "web.3").join(" "), `${CTR} tasks rm web.3`);
  t.equal(deleteTaskArgv(EP, "web.3", true).join(" "), `${CTR} tasks rm -f web.3`);
  t.equal(deleteContainerArgv(EP, "web.3").join(" "), `${CTR} containers rm web.3`);
  t.equal(
    execArgv(EP, "web.3", "exec-1", ["sh", "-c", "echo hi"], "/s/fifo").join(" "),
    `${CTR} tasks exec --exec-id exec-1 --fifo-dir /s/fifo web.3 sh -c echo hi`,
  );
  t.equal(execArgv(EP, "web.3", "e", ["true"]).join(" "), `${CTR} tasks exec --exec-id e web.3 true`);
  t.equal(listContainersArgv(EP).join(" "), `${CTR} containers ls labels."capsule.workload"`);
});

// What ctr 1.6 prints, verbatim (tabwriter, trailing spaces included).
const TASKS = "TASK     PID      STATUS    \nweb.3    16864    RUNNING\njob.1    16915    STOPPED\n";
const IMAGES =
  "REF                    TYPE                                                 DIGEST                                                                  SIZE    PLATFORMS   LABELS \n" +
  "demo/httpd:1           application/vnd.oci.image.manifest.v1+json           sha256:8eafb98ad06108e3488cbbda52c25470682d002b672517856d74b1a547811ccd 1.9 MiB linux/amd64 -      \n";

t.test("parsers of ctr output", async (t) => {
  t.same(
    [...parseTasks(TASKS)],
    [
      ["web.3", { pid: 16864, status: "RUNNING" }],
      ["job.1", { pid: 16915, status: "STOPPED" }],
    ],
  );
  t.same(parseTasks("TASK    PID    STATUS    \n").size, 0);
  t.same(parseTable(IMAGES)[0], {
    REF: "demo/httpd:1",
    TYPE: "application/vnd.oci.image.manifest.v1+json",
    DIGEST: "sha256:8eafb98ad06108e3488cbbda52c25470682d002b672517856d74b1a547811ccd",
    SIZE: "1.9 MiB",
    PLATFORMS: "linux/amd64",
    LABELS: "-",
  });
  t.same(parseTable(""), []);
  t.equal(parseHumanBytes("1.9 MiB"), Math.round(1.9 * 1024 * 1024));
  t.equal(parseHumanBytes("512 B"), 512);
  t.equal(parseHumanBytes("2.0 GiB"), 2 * 1024 ** 3);
  t.equal(parseHumanBytes("lots"), undefined);
  t.equal(
    parseDeletedExitCode(
      'time="2026-11-23T08:56:12Z" level=warning msg="task web.1 exit with non-zero exit code 137"\n',
    ),
    137,
  );
  t.equal(parseDeletedExitCode(""), 0);
});

t.test("ctrError: containerd down is CAPSULE_UNREACHABLE, anything else a CommandError", async (t) => {
  const argv = [...CTR.split(" "), "tasks", "ls"];
  const down = ctrError(argv, {
    exitCode: 1,
    stdout: "",
    stderr: 'ctr: failed to dial "/s/containerd.sock": context deadline exceeded\n',
  });
  t.match(down, {
    code: "CAPSULE_UNREACHABLE",
    message: "containerd at /s/containerd.sock is not answering",
  });
  t.match(ctrError(argv, { exitCode: 1, stdout: "", stderr: "ctr: something else\n" }), {
    code: "CAPSULE_COMMAND_FAILED",
    name: "CommandError",
  });
});

// --- Containers over a FakeRunner --------------------------------------------------------------

type Answer = Partial<RunResult>;
const NOT_FOUND: Answer = {
  exitCode: 1,
  stderr: 'ctr: container "web.3" in namespace "capsule": not found\n',
};
const info = (spec: ContainerSpec) =>
  JSON.stringify({
    ID: containerId(spec.workload, spec.generation),
    Labels: { "capsule.workload": spec.workload, "capsule.spec": specHash(spec) },
    Image: spec.image,
  });
/** table renders rows as Go's tabwriter does for ctr: columns padded to the widest cell plus one space. */
const table = (rows: string[][]) => {
  const widths = rows[0]!.map((_, i) => Math.max(...rows.map((r) => r[i]!.length)) + 1);
  return rows.map((r) => r.map((c, i) => c.padEnd(widths[i]!)).join("")).join("\n") + "\n";
};
const tasksLs = (...rows: [string, number, string][]) =>
  table([["TASK", "PID", "STATUS"], ...rows.map(([id, pid, st]) => [id, String(pid), st])]);
const IMAGE_LS = (name: string) =>
  table([
    ["REF", "TYPE", "DIGEST", "SIZE", "PLATFORMS", "LABELS"],
    [
      name,
      "application/vnd.oci.image.manifest.v1+json",
      `sha256:${"a".repeat(64)}`,
      "1.9 MiB",
      "linux/amd64",
      "-",
    ],
  ]);

/** World scripts ctr's answers: `tasks` is what `ctr tasks ls` prints, `exists` whether the container does. */
function world(t: Test) {
  const dir = mkdtempSync(join(tmpdir(), "rt-unit-"));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const state = { exists: false, tasks: tasksLs(), spec: WEB, images: IMAGE_LS("demo/httpd:1") };
  const runner = new FakeRunner();
  runner.on((argv) => {
    const c = argv.join(" ");
    if (c.startsWith(`${CTR} containers info`))
      return state.exists && argv.at(-1) === "web.3" ? { stdout: info(state.spec) } : NOT_FOUND;
    if (c === `${CTR} tasks ls`) return { stdout: state.tasks };
    if (c === `${CTR} images ls`) return { stdout: state.images };
    return undefined;
  });
  const clock = new InstantClock();
  let n = 0;
  const containers = new Containers({
    runner,
    clock,
    endpoint: EP,
    images: new Images({ runner, endpoint: EP }),
    dataDir: join(dir, "containers"),
    fifoDir: join(dir, "fifo"),
    newExecId: () => `exec-${++n}`,
  });
  return { dir, state, runner, clock, containers };
}

t.test("run creates once, then finds it running: no duplicate", async (t) => {
  const w = world(t);
  w.runner.on((argv) => {
    if (argv.includes("run")) {
      w.state.exists = true;
      w.state.tasks = tasksLs(["web.3", 4242, "RUNNING"]);
    }
    return undefined;
  });
  t.same(await w.containers.run(WEB), { id: "web.3", action: "created", pid: 4242 });
  const log = join(w.dir, "containers", "web.3.log");
  t.same(w.runner.commands, [
    `${CTR} containers info web.3`,
    `${CTR} images ls`,
    runArgv(EP, WEB, {
      imageName: "demo/httpd:1",
      logPath: log,
      cgroupPath: "/capsule/c2e17f2a99de/web.3",
    }).join(" "),
    `${CTR} tasks ls`,
  ]);
  w.runner.commands.length = 0;
  t.same(await w.containers.run(WEB), { id: "web.3", action: "running", pid: 4242 });
  t.same(
    w.runner.commands,
    [`${CTR} containers info web.3`, `${CTR} tasks ls`, `${CTR} tasks ls`],
    "reads only",
  );
});

t.test("run: unknown image, changed spec, and a command that cannot start", async (t) => {
  const w = world(t);
  w.state.images = "REF TYPE DIGEST SIZE PLATFORMS LABELS\n";
  await t.rejects(w.containers.run(WEB), { code: "CAPSULE_NOT_FOUND", hint: /image push/ });
  t.notOk(
    w.runner.commands.some((c) => c.includes(" run ")),
    "nothing run",
  );

  w.state.exists = true;
  await t.rejects(w.containers.run({ ...WEB, command: ["other"] }), {
    code: "CAPSULE_FAILED_PRECONDITION",
    hint: /generation/,
  });

  const x = world(t);
  x.runner.on((argv) =>
    argv.includes("run")
      ? {
          exitCode: 1,
          stderr:
            'ctr: failed to create shim task: OCI runtime create failed: runc create failed: unable to start container process: exec: "nope": executable file not found in $PATH: unknown\n',
        }
      : undefined,
  );
  await t.rejects(x.containers.run(WEB), {
    code: "CAPSULE_INVALID_ARGUMENT",
    message: /cannot start: .*nope/,
  });
  t.same(
    x.runner.commands.slice(-2),
    [`${CTR} tasks rm -f web.3`, `${CTR} containers rm web.3`],
    "the half-made container is removed",
  );
});

t.test("run starts an existing container's task: reaps a stopped one first", async (t) => {
  const w = world(t);
  w.state.exists = true;
  w.state.tasks = tasksLs(["web.3", 4242, "STOPPED"]);
  w.runner.on((argv) => {
    const c = argv.join(" ");
    if (c === `${CTR} tasks rm web.3`) {
      w.state.tasks = tasksLs();
      return { stderr: 'level=warning msg="task web.3 exit with non-zero exit code 2"\n' };
    }
    if (c.startsWith(`${CTR} tasks start`)) w.state.tasks = tasksLs(["web.3", 5000, "RUNNING"]);
    return undefined;
  });
  t.same(await w.containers.run(WEB), { id: "web.3", action: "started", pid: 5000 });
  t.same(w.runner.commands, [
    `${CTR} containers info web.3`,
    `${CTR} tasks ls`,
    `${CTR} tasks rm web.3`,
    `${CTR} tasks start -d --log-uri file://${join(w.dir, "containers", "web.3.log")} web.3`,
    `${CTR} tasks ls`,
  ]);
});

t.test("stop: SIGTERM, wait, SIGKILL when ignored, reap and record the exit code", async (t) => {
  const w = world(t);
  w.state.exists = true;
  w.state.tasks = tasksLs(["web.3", 4242, "RUNNING"]);
  w.runner.on((argv) => {
    const c = argv.join(" ");
    if (c === `${CTR} tasks kill -s SIGKILL web.3`) w.state.tasks = tasksLs(["web.3", 4242, "STOPPED"]);
    if (c === `${CTR} tasks rm web.3`) {
      w.state.tasks = tasksLs();
      return { stderr: 'level=warning msg="task web.3 exit with non-zero exit code 137"\n' };
    }
    return undefined;
  });
  const t0 = w.clock.now();
  t.same(await w.containers.stop("web.3", { timeoutMs: 1_000 }), {
    stopped: true,
    killed: true,
    exitCode: 137,
  });
  t.ok(w.clock.now() - t0 >= 1_000, "waited the grace period");
  const cmds = w.runner.commands.filter((c, i, a) => c !== a[i - 1]);
  t.same(cmds, [
    `${CTR} containers info web.3`,
    `${CTR} tasks ls`,
    `${CTR} tasks kill -s SIGTERM web.3`,
    `${CTR} tasks ls`,
    `${CTR} tasks kill -s SIGKILL web.3`,
    `${CTR} tasks ls`,
    `${CTR} tasks rm web.3`,
  ]);
  t.equal(await readFile(join(w.dir, "containers", "web.3.exit"), "utf8"), "137\n");
  t.same(
    await w.containers.status("web.3"),
    { id: "web.3", state: "stopped", exitCode: 137 },
    "from the record",
  );
  t.same(await w.containers.stop("web.3"), { stopped: false, killed: false, exitCode: 137 }, "idempotent");
});

t.test("stop gives up with CAPSULE_TIMEOUT when even SIGKILL does not work (bounded)", async (t) => {
  const w = world(t);
  w.state.exists = true;
  w.state.tasks = tasksLs(["web.3", 4242, "RUNNING"]);
  await t.rejects(w.containers.stop("web.3", { timeoutMs: 100 }), { code: "CAPSULE_TIMEOUT" });
  await t.rejects(w.containers.stop("nope.1"), { code: "CAPSULE_NOT_FOUND" });
});

t.test("status: absent, running, stopped (reaped), stopped without a task", async (t) => {
  const w = world(t);
  t.same(await w.containers.status("web.3"), { id: "web.3", state: "absent" });
  w.state.exists = true;
  t.same(await w.containers.status("web.3"), { id: "web.3", state: "stopped" }, "never ran: no exit code");
  w.state.tasks = tasksLs(["web.3", 7, "PAUSED"]);
  t.same(await w.containers.status("web.3"), { id: "web.3", state: "running", pid: 7 });
  w.state.tasks = tasksLs(["web.3", 7, "STOPPED"]);
  w.runner.on((argv) => (argv.join(" ") === `${CTR} tasks rm web.3` ? { stderr: "" } : undefined));
  t.same(await w.containers.status("web.3"), { id: "web.3", state: "stopped", exitCode: 0 });
});

t.test("list: our containers with their tasks, ids that are not ours skipped", async (t) => {
  const w = world(t);
  w.state.tasks = tasksLs(["web.3", 4242, "RUNNING"], ["job.1", 9, "STOPPED"]);
  w.runner.on((argv) =>
    argv.join(" ") === listContainersArgv(EP).join(" ")
      ? {
          stdout:
            "CONTAINER    IMAGE                     RUNTIME                  \n" +
            "web.3        demo/httpd:1              io.containerd.runc.v2    \n" +
            "job.1        docker.io/demo/job:1      io.containerd.runc.v2    \n" +
            "stray        demo/httpd:1              io.containerd.runc.v2    \n",
        }
      : undefined,
  );
  t.same(await w.containers.list(), [
    { id: "job.1", workload: "job", generation: 1, image: "docker.io/demo/job:1", state: "stopped" },
    { id: "web.3", workload: "web", generation: 3, image: "demo/httpd:1", state: "running", pid: 4242 },
  ]);
});

t.test("exec: the process's exit code is a result; ctr's own failures are errors", async (t) => {
  const w = world(t);
  w.state.exists = true;
  await t.rejects(w.containers.exec("web.3", ["true"]), { code: "CAPSULE_FAILED_PRECONDITION" });
  w.state.tasks = tasksLs(["web.3", 4242, "RUNNING"]);
  w.runner.on((argv) => {
    if (!argv.includes("exec")) return undefined;
    const cmd = argv.slice(argv.indexOf("web.3") + 1).join(" ");
    if (cmd === "sh -c exit 3") return { exitCode: 3, stderr: "oops\n" };
    if (cmd === "/bin/nope")
      return { exitCode: 1, stderr: 'ctr: OCI runtime exec failed: exec: "/bin/nope": not found\n' };
    return { stdout: "hi\n" };
  });
  t.same(await w.containers.exec("web.3", ["echo", "hi"]), { exitCode: 0, stdout: "hi\n", stderr: "" });
  t.same(await w.containers.exec("web.3", ["sh", "-c", "exit 3"]), {
    exitCode: 3,
    stdout: "",
    stderr: "oops\n",
  });
  await t.rejects(w.containers.exec("web.3", ["/bin/nope"]), { code: "CAPSULE_COMMAND_FAILED" });
  await t.rejects(w.containers.exec("web.3", []), { code: "CAPSULE_INVALID_ARGUMENT" });
  const execs = w.runner.commands.filter((c) => c.includes(" exec "));
  t.equal(execs[0], `${CTR} tasks exec --exec-id exec-1 --fifo-dir ${join(w.dir, "fifo")} web.3 echo hi`);
  t.equal(w.runner.inputs[w.runner.commands.indexOf(execs[0]!)], "", "stdin closed, not inherited");
});

t.test("remove: stop, delete, files gone; idempotent", async (t) => {
  const w = world(t);
  w.state.exists = true;
  w.runner.on((argv) => {
    if (argv.join(" ") === `${CTR} containers rm web.3`) w.state.exists = false;
    return undefined;
  });
  const { mkdirSync } = await import("node:fs");
  mkdirSync(join(w.dir, "containers"));
  writeFileSync(join(w.dir, "containers", "web.3.log"), "x\n");
  writeFileSync(join(w.dir, "containers", "web.3.exit"), "0\n");
  t.equal(await w.containers.remove("web.3"), true);
  t.same(w.runner.commands, [
    `${CTR} containers info web.3`,
    `${CTR} tasks ls`,
    `${CTR} containers rm web.3`,
  ]);
  await t.rejects(readFile(join(w.dir, "containers", "web.3.log")), { code: "ENOENT" });
  t.equal(await w.containers.remove("web.3"), false);
});

t.test(
  "logs: read to the end, or follow until aborted; unknown container is CAPSULE_NOT_FOUND",
  async (t) => {
    const w = world(t);
    await t.rejects(w.containers.logs("web.3").next(), { code: "CAPSULE_NOT_FOUND" });
    const { mkdirSync } = await import("node:fs");
    mkdirSync(join(w.dir, "containers"));
    const file = join(w.dir, "containers", "web.3.log");
    writeFileSync(file, "one\ntwo é\n");
    let all = "";
    for await (const c of w.containers.logs("web.3")) all += c;
    t.equal(all, "one\ntwo é\n");

    const ac = new AbortController();
    const got: string[] = [];
    // The instant clock's sleeps return at once: each poll is a turn of the event loop.
    const sleeps: number[] = [];
    w.clock.sleep = async (ms) => {
      sleeps.push(ms);
      if (sleeps.length === 2) await appendFile(file, "three\n");
      if (sleeps.length === 4) ac.abort();
    };
    for await (const c of w.containers.logs("web.3", { follow: true, signal: ac.signal, pollMs: 10 }))
      got.push(c);
    t.same(got, ["one\ntwo é\n", "three\n"]);
    t.same(sleeps, [10, 10, 10, 10]);
  },
);
