// The lab's lifecycle: up is idempotent, a killed capsuled comes back, a smaller plan prunes,
// and down cleans up after an `up` that was SIGKILLed halfway.
import { type ChildProcess, spawn } from "node:child_process";
import { existsSync } from "node:fs";
import { join } from "node:path";
import t from "tap";
import { Lab, labDown } from "../../lab/lab.js";
import { ExecaRunner } from "../../src/node/host/runner.js";
import {
  assertNoLeftovers,
  isRoot,
  leftovers,
  ROOT_SKIP,
  startServer,
  tcpRequest,
  uniquePrefix,
  withLab,
} from "../helpers/lab.js";

const runner = new ExecaRunner();

async function snapshot(lab: Lab): Promise<Record<string, string>> {
  const out: Record<string, string> = {};
  for (const n of lab.plan.nodes) {
    const addr = await runner.run(["ip", "-n", n.ns, "-br", "addr"]);
    const route = await runner.run(["ip", "-n", n.ns, "route"]);
    const nft = await runner.run(["ip", "netns", "exec", n.ns, "nft", "-a", "list", "ruleset"]);
    out[n.ns] = `${addr.stdout}${route.stdout}${nft.stdout}`;
  }
  const s = await lab.status();
  for (const r of s.rows) if (r.pid) out[`pid ${r.name}`] = String(r.pid);
  return out;
}

async function until(what: string, ms: number, check: () => boolean | Promise<boolean>): Promise<void> {
  const deadline = Date.now() + ms;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

if (!isRoot()) {
  t.plan(0, ROOT_SKIP);
} else {
  const used: string[] = [];

  t.test("up twice is idempotent; a SIGKILLed capsuled is restarted by up", async (t) => {
    const lab = await withLab(t);
    used.push(lab.plan.prefix);
    const before = await snapshot(lab);
    const again = await lab.up();
    t.same(again.networkCommands, [], "no network change");
    t.same(again.started, [], "no process started");
    t.same(again.adopted, [], "no capsule adopted again");
    t.same(await snapshot(lab), before, "addresses, routes, rulesets (with handles) and pids unchanged");

    const info = await lab.capsulectl(["--capsule", "homeA", "capsule", "info", "-o", "json"]);
    t.equal(info.exitCode, 0, info.stderr);
    const id = (JSON.parse(info.stdout) as { id: string }[])[0]?.id;

    const pid = Number(before["pid homeA"]);
    await runner.run(["kill", "-KILL", String(pid)]);
    await until(
      "homeA capsuled to die",
      5_000,
      async () => (await lab.status()).rows.find((r) => r.name === "homeA")?.pid === undefined,
    );
    const run = await lab.exec("homeA", ["ls", "/run"]);
    t.equal(run.exitCode, 0, "the capsule's mount namespace outlives its capsuled");
    t.match(run.stdout, /wireguard/);

    const healed = await lab.up();
    t.same(healed.started, ["homeA"], "only homeA is started");
    t.same(healed.networkCommands, []);
    t.same(healed.adopted, [], "homeA kept its state: no new adoption");
    const after = await lab.capsulectl(["--capsule", "homeA", "capsule", "info", "-o", "json"]);
    t.equal(after.exitCode, 0, after.stderr);
    t.equal((JSON.parse(after.stdout) as { id: string }[])[0]?.id, id, "same capsule id after restart");
  });

  t.test("up with another plan removes what it no longer has and restarts what changed", async (t) => {
    const lab = await withLab(t, { daemon: "stand-in", capsulesPerHome: 2 });
    used.push(lab.plan.prefix);
    t.same(
      lab.plan.capsules.map((c) => c.name),
      ["edge", "homeA", "homeA2", "homeB", "homeB2"],
    );
    const smaller = new Lab({ prefix: lab.plan.prefix, daemon: "stand-in" });
    t.same((await smaller.up()).started, [], "the remaining capsules keep their addresses and processes");
    const ns = (await runner.run(["ip", "netns", "list"])).stdout;
    t.notMatch(ns, new RegExp(`^${lab.plan.prefix}-home[AB]2( |$)`, "m"), "homeA2 and homeB2 are gone");
    t.match(ns, new RegExp(`^${lab.plan.prefix}-homeB( |$)`, "m"), "homeB stays");
    const mounts = (await runner.run(["findmnt", "-rn", "-o", "TARGET"])).stdout;
    t.notMatch(mounts, /home[AB]2\.mnt/, "their mount namespaces are unpinned");
    t.same(
      (await smaller.status()).rows.filter((x) => x.pid && x.listening).map((x) => `${x.name} ${x.mgmt}`),
      ["edge 203.0.113.2/30", "homeA 203.0.113.6/30", "homeB 203.0.113.34/30"],
    );

    const moved = new Lab({ prefix: lab.plan.prefix, daemon: "stand-in", apiPort: 50001 });
    t.same(
      (await moved.up()).started,
      ["edge", "homeA", "homeB"],
      "a changed command line restarts the process",
    );
    t.same(
      (await moved.status()).rows.filter((x) => x.pid && x.listening).map((x) => x.name),
      ["edge", "homeA", "homeB"],
      "listening on the new port",
    );
    t.same((await moved.up()).started, [], "and the next up is a no-op again");
  });

  t.test("two labs coexist with the same addresses; one's down leaves the other intact", async (t) => {
    const a = await withLab(t, { daemon: "stand-in", homes: 1 });
    const b = await withLab(t, { daemon: "stand-in", homes: 1 });
    used.push(a.plan.prefix, b.plan.prefix);
    await startServer(a, "edge", "192.0.2.10", 9100, "lab a");
    await startServer(b, "edge", "192.0.2.10", 9100, "lab b");
    t.equal((await tcpRequest(a, "client", "192.0.2.10", 9100)).reply, "lab a");
    t.equal((await tcpRequest(b, "client", "192.0.2.10", 9100)).reply, "lab b");
    await a.down();
    await assertNoLeftovers(t, a.plan.prefix);
    const s = await b.status();
    t.same(
      s.rows.filter((r) => r.pid && r.listening).map((r) => r.name),
      ["edge", "homeA"],
      "lab b's capsules still run",
    );
    t.equal((await tcpRequest(b, "client", "192.0.2.10", 9100)).reply, "lab b");
    t.equal((await b.exec("homeA", ["ls", "/run"])).exitCode, 0, "lab b's mount namespaces still work");
  });

  const cli = join(import.meta.dirname, "../../dist/lab/cli.js");
  const points: { name: string; reached: (prefix: string) => Promise<boolean> }[] = [
    {
      name: "while building the network",
      reached: async (prefix) =>
        (await runner.run(["ip", "netns", "list"])).stdout
          .split("\n")
          .filter((l) => l.startsWith(`${prefix}-`)).length >= 3,
    },
    {
      name: "after starting capsuled, before adoption",
      reached: async (prefix) => existsSync(`/tmp/capsule-lab-${prefix}/edge/capsuled.pid`),
    },
  ];
  for (const point of points) {
    t.test(`down after up was SIGKILLed ${point.name} leaves nothing`, async (t) => {
      if (!existsSync(cli)) {
        t.fail(`${cli} is missing: run npm run build first`);
        return;
      }
      const prefix = uniquePrefix();
      used.push(prefix);
      t.teardown(() => labDown({ prefix }).then(() => undefined));
      const env = { ...process.env };
      delete env.NODE_OPTIONS;
      const child: ChildProcess = spawn(process.execPath, [cli, "up", "--prefix", prefix], {
        stdio: "ignore",
        env,
      });
      let exited = false;
      child.on("exit", () => {
        exited = true;
      });
      await until(point.name, 30_000, () => point.reached(prefix));
      t.notOk(exited, "up was still running when killed");
      child.kill("SIGKILL");
      await until("the killed up to exit", 5_000, () => exited);
      t.not((await leftovers(prefix)).length, 0, "the crash left things behind");
      const r = await labDown({ prefix });
      t.same(r.leftovers, [], "down reports nothing left");
      await assertNoLeftovers(t, prefix);
    });
  }

  t.test("after the suite nothing with any prefix used remains", async (t) => {
    for (const p of used) await assertNoLeftovers(t, p);
  });
}
