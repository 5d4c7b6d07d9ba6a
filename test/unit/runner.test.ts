import t from "tap";
import { ExecaRunner, FakeRunner } from "../../src/node/host/runner.js";

t.test("FakeRunner records canonical command lines and answers", async (t) => {
  const r = new FakeRunner().on((argv) =>
    argv[0] === "false" ? { exitCode: 1, stderr: "nope" } : undefined,
  );
  await r.run(["nft", "-f", "-"], { input: "table inet capsule {}" });
  await t.rejects(r.run(["false"]), { code: "CAPSULE_COMMAND_FAILED", message: /false: exit 1: nope/ });
  const res = await r.run(["false"], { allowFailure: true });
  t.equal(res.exitCode, 1);
  t.same(r.commands, ["nft -f -", "false", "false"]);
  t.equal(r.inputs[0], "table inet capsule {}");
});

t.test("ExecaRunner pins LC_ALL=C and reports argv and output on failure", async (t) => {
  const r = new ExecaRunner();
  const ok = await r.run(["sh", "-c", "echo $LC_ALL"]);
  t.equal(ok.stdout.trim(), "C");
  const err = (await r.run(["sh", "-c", "echo bad >&2; exit 3"]).catch((e: unknown) => e)) as {
    argv: string[];
    exitCode: number;
    message: string;
  };
  t.same(err.argv, ["sh", "-c", "echo bad >&2; exit 3"]);
  t.equal(err.exitCode, 3);
  t.match(err.message, /bad/);
  const slow = await r.run(["sleep", "5"], { timeoutMs: 200, allowFailure: true });
  t.not(slow.exitCode, 0, "timeout ends the command");
});
