// `capsulectl workload exec -t/-i` in the lab, through the real CLI and capsuled: capsulectl runs
// on a pseudo-terminal (util-linux `script`) in the operator's namespace, so -t finds a terminal
// of a known size. Checked: the command gets a /dev/pts terminal of that size from its first
// instruction, a resize reaches it, typed input (raw mode) reaches it, -i pipes stdin to EOF,
// stdout and stderr stay apart without -t, exit codes come back, a capsulectl killed mid-session
// takes the command with it, and no exec process or FIFO is left behind.
import { mkdtempSync, readdirSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import t from "tap";
import { capsulectlArgv } from "../../lab/lab.js";
import { ExecaRunner } from "../../src/node/host/runner.js";
import { containerdPaths } from "../../src/node/runtime/containerd.js";
import { ctl } from "../helpers/fabric.js";
import { buildImageArchive } from "../helpers/images.js";
import { isRoot, ROOT_SKIP, withLab } from "../helpers/lab.js";
import { shellQuote, waitRuntime } from "../helpers/workloads.js";

if (!isRoot()) {
  t.plan(0, ROOT_SKIP);
} else {
  t.test("workload exec -t and -i through capsulectl", async (t) => {
    const lab = await withLab(t, { edge: false, homes: 1 });
    const imgDir = mkdtempSync(join(tmpdir(), "capsule-exec-img-"));
    t.teardown(() => rmSync(imgDir, { recursive: true, force: true }));

    const up = await waitRuntime(lab, "homeA");
    t.ok(up >= 0, `workload runtime up after ${up} ms`);
    const img = await buildImageArchive(imgDir, {
      name: "demo/shell:1",
      applets: ["sh", "sleep", "cat", "echo", "tty", "stty", "true", "false"],
    });
    await ctl(lab, ["--capsule", "homeA", "image", "push", img.archive]);
    const manifest = join(imgDir, "box.yaml");
    writeFileSync(
      manifest,
      "kind: Workload\nname: box\ncontainer:\n  image: demo/shell:1\n  command: [sleep, '3600']\n",
    );
    t.match(
      await ctl(lab, ["--capsule", "homeA", "apply", "-f", manifest, "--wait"]),
      /workload\/box running/,
    );

    // capsulectl as the operator, as one shell word list (NODE_OPTIONS of the test runner dropped).
    const ctlWords = capsulectlArgv(lab.plan, ["--capsule", "homeA"])
      .slice(4) // after `ip netns exec <ns>`: env -u ... node main.js --config-dir DIR ...
      .map(shellQuote)
      .join(" ");
    /** onTty runs `shell` ($CTL in it is capsulectl) on a fresh pseudo-terminal in the operator namespace. */
    const onTty = (shell: string, input?: string) =>
      lab.exec(
        "op",
        ["script", "-q", "-e", "-c", shell.replaceAll("$CTL", ctlWords), "/dev/null"],
        input === undefined ? { timeoutMs: 60_000 } : { timeoutMs: 60_000, input },
      );

    // -t: a terminal, of the caller's size from the first instruction on.
    const tty = await onTty("stty rows 33 cols 101; $CTL workload exec -t box -- sh -c 'tty; stty size'");
    t.equal(tty.exitCode, 0, tty.stderr);
    t.match(tty.stdout, /^\/dev\/pts\/\d+\r+\n33 101\r+\n$/, `tty and size: ${JSON.stringify(tty.stdout)}`);

    // A resize of the caller's terminal (SIGWINCH) reaches the command's.
    const rs = await onTty(
      "stty rows 30 cols 90; (sleep 1.5; stty rows 50 cols 150 </dev/tty) & " +
        "$CTL workload exec -t box -- sh -c 'stty size; sleep 4; stty size'",
    );
    t.match(rs.stdout, /^30 90\r+\n50 150\r+\n$/, `resized: ${JSON.stringify(rs.stdout)}`);

    // -ti: raw mode, so what is typed reaches the command's terminal (its echo included).
    const typed = await onTty(
      "stty rows 24 cols 80; $CTL workload exec -ti box -- sh -c 'read line; echo \"got $line\"; exit 5'",
      "hello\r",
    );
    t.equal(typed.exitCode, 5, "the exit code through script -e");
    t.match(typed.stdout, /hello\r+\ngot hello\r+\n/, `typed: ${JSON.stringify(typed.stdout)}`);

    // -i without -t: stdin piped to EOF; stdout and stderr apart; the exit code.
    const runner = new ExecaRunner();
    const piped = await runner.run(capsulectlArgv(lab.plan, ["workload", "exec", "-i", "box", "--", "cat"]), {
      input: "hi\n",
      allowFailure: true,
      timeoutMs: 30_000,
    });
    t.same(
      piped,
      { exitCode: 0, stdout: "hi\n", stderr: "" },
      "echo hi | capsulectl workload exec -i box -- cat",
    );
    const split = await runner.run(
      capsulectlArgv(lab.plan, [
        "workload",
        "exec",
        "-i",
        "box",
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 3",
      ]),
      { input: "", allowFailure: true, timeoutMs: 30_000 },
    );
    t.same(split, { exitCode: 3, stdout: "out\n", stderr: "err\n" });
    const seven = await onTty("$CTL workload exec -t box -- sh -c 'exit 7'");
    t.equal(seven.exitCode, 7, "sh -c 'exit 7' -> 7");

    // capsulectl killed mid-session: the command goes too (the call is cancelled).
    const sock = containerdPaths(lab.capsule("homeA").stateDir).address;
    const ps = async () =>
      (await lab.exec("homeA", ["ctr", "-a", sock, "-n", "capsule", "tasks", "ps", "box.1"])).stdout
        .trim()
        .split("\n")
        .slice(1);
    const killed = await lab.exec(
      "op",
      [
        "sh",
        "-c",
        `${ctlWords} workload exec -i box -- sleep 300 </dev/zero & pid=$!; sleep 2; kill -TERM $pid; wait $pid; echo "rc=$?"`,
      ],
      { timeoutMs: 30_000 },
    );
    t.match(killed.stdout, /rc=130/, "interrupted: exit 130");
    let left = await ps();
    for (let i = 0; i < 20 && left.length > 1; i++) {
      await new Promise((r) => setTimeout(r, 100));
      left = await ps();
    }
    t.equal(left.length, 1, `only the workload's own process is left: ${left.join(" | ")}`);
    const fifos = readdirSync(containerdPaths(lab.capsule("homeA").stateDir).fifoDir).filter((f) =>
      /^exec-/.test(f),
    );
    t.same(fifos, [], "no exec FIFO left behind");
  });
}
