// Workloads in the lab, end to end through capsuled: images pushed over the API, a web server on
// homeA reached from a workload on homeB at its fabric address (homeA and homeB are both behind
// NAT, so across the edge's relay), restart after a kill behind capsuled's back, adoption after a
// capsuled SIGKILL (no duplicate container), a spec change recreating it on the same address, a
// host-port conflict refused with nothing changed, and `get` showing phase, address and events.
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import t from "tap";
import { containerdPaths } from "../../src/node/runtime/containerd.js";
import { ctl, rpc, waitFor } from "../helpers/fabric.js";
import { buildImageArchive } from "../helpers/images.js";
import { isRoot, killCapsuled, ROOT_SKIP, startServer, withLab } from "../helpers/lab.js";

interface Workload {
  name: string;
  phase: string;
  message: string;
  address: string;
  generation: string;
  restarts: number;
  pid: number;
  events: { type: string; message: string }[];
}

if (!isRoot()) {
  t.plan(0, ROOT_SKIP);
} else {
  t.test("workloads on the fabric: reach, restart, adopt, recreate, conflicts", async (t) => {
    const lab = await withLab(t);
    const imgDir = mkdtempSync(join(tmpdir(), "capsule-wl-img-"));
    t.teardown(() => rmSync(imgDir, { recursive: true, force: true }));
    await ctl(lab, ["fabric", "enroll", "edge", "homeA"]);
    await ctl(lab, ["fabric", "enroll", "edge", "homeB"]);
    await ctl(lab, ["fabric", "enroll", "homeA", "homeB"]);

    // The runtime comes up after the fabric (containerd start): wait for the image store.
    for (const c of ["homeA", "homeB"]) {
      const ms = await waitFor(
        async () => {
          try {
            await rpc(lab, c, "Images/List");
            return true;
          } catch {
            return false;
          }
        },
        60_000,
        500,
      );
      t.ok(ms >= 0, `${c}: workload runtime up after ${ms} ms`);
    }

    const img = await buildImageArchive(imgDir, { name: "demo/httpd:1" });
    for (const c of ["homeA", "homeB"]) {
      const t0 = Date.now();
      const out = await ctl(lab, ["--capsule", c, "image", "push", img.archive]);
      t.match(out, /demo\/httpd:1\s+sha256:/, `capsulectl image push to ${c} in ${Date.now() - t0} ms`);
    }
    t.match(await ctl(lab, ["--capsule", "homeA", "image", "list"]), /demo\/httpd:1/, "image list");

    const web = (env: Record<string, string>, extra: Record<string, unknown> = {}) =>
      JSON.stringify({
        kind: "Workload",
        name: "web",
        labels: { app: "web" },
        container: { image: "demo/httpd:1", command: ["httpd", "-f", "-p", "8080", "-h", "/www"], env },
        ports: [{ port: 8080, hostPort: 18080 }],
        ...extra,
      });
    const client = JSON.stringify({
      kind: "Workload",
      name: "client",
      container: { image: "demo/httpd:1", command: ["sh", "-c", "echo client up; exec sleep 3600"] },
    });
    const apply = (c: string, docs: string[]) =>
      rpc<{ results: { name: string; action: string }[] }>(lab, c, "Workloads/Apply", {
        manifestsJson: docs,
      });
    const get = (c: string, name: string) => rpc<Workload>(lab, c, "Workloads/Get", { name });
    const waitRunning = async (c: string, name: string, pred: (w: Workload) => boolean = () => true) => {
      let last: Workload | undefined;
      const ms = await waitFor(
        async () => {
          last = await get(c, name);
          return last.phase === "running" && last.pid > 0 && pred(last);
        },
        60_000,
        250,
      );
      return { ms, w: last as Workload };
    };

    // The first apply through the real CLI: a manifest file, --wait until running.
    const webFile = join(imgDir, "web.json");
    writeFileSync(webFile, web({ GREETING: "1" }));
    const applied = await ctl(lab, ["--capsule", "homeA", "apply", "-f", webFile, "--wait"]);
    t.match(applied, /workload\/web created\n.*workload\/web running at 100\./s, "apply -f --wait");
    t.match(
      await ctl(lab, ["--capsule", "homeA", "apply", "-f", webFile]),
      /workload\/web unchanged/,
      "apply is idempotent",
    );
    t.same((await apply("homeB", [client])).results[0]?.action, "created");
    const a = await waitRunning("homeA", "web");
    t.ok(a.ms >= 0, `web running on homeA after ${a.ms} ms`);
    const b = await waitRunning("homeB", "client");
    t.ok(b.ms >= 0, `client running on homeB after ${b.ms} ms`);
    if (a.ms < 0 || b.ms < 0) throw new Error(`not running: ${JSON.stringify([a.w, b.w])}`);
    const addr = a.w.address;
    t.match(addr, /^100\.(6[4-9]|[7-9]\d|1[01]\d|12[0-7])\.\d+\.\d+$/, "a fabric address");
    t.match(
      a.w.events.map((e) => e.type),
      ["created", "created"],
    );

    // Default deny: with no Policy, homeB's workload does not reach homeA's; an allow Policy
    // applied with capsulectl opens exactly its port.
    const body = async () => {
      const r = await rpc<{ exitCode: number; stdout: unknown }>(lab, "homeB", "Workloads/Exec", {
        name: "client",
        argv: ["wget", "-qO-", `http://${addr}:8080/`],
        timeoutSeconds: 5,
      }).catch(() => undefined);
      if (r?.exitCode !== 0) return "";
      const s = r?.stdout as { type?: string; data?: number[] } | string;
      return typeof s === "string" ? s : Buffer.from(s.data ?? []).toString();
    };
    const denied = await rpc<{ exitCode: number }>(lab, "homeB", "Workloads/Exec", {
      name: "client",
      argv: ["wget", "-qO-", "-T", "3", `http://${addr}:8080/`],
      timeoutSeconds: 10,
    });
    t.not(denied.exitCode, 0, "without a Policy homeB's workload does not reach homeA's");
    const policy = (ports: string[]) =>
      JSON.stringify({
        kind: "Policy",
        name: "client-web",
        allow: [{ from: { workload: "client" }, to: { workload: "web" }, ports }],
        tests: [{ from: "web", to: "client", port: "8080/tcp", expect: "deny" }],
      });
    const policyFile = join(imgDir, "client-web.json");
    writeFileSync(policyFile, policy(["8080/tcp"]));
    t.match(
      await ctl(lab, ["--capsule", "homeA", "policy", "apply", "-f", policyFile]),
      /^policy\/client-web created\n/,
      "capsulectl policy apply",
    );
    let got = "";
    let ms = await waitFor(
      async () => {
        got = await body();
        return got !== "";
      },
      30_000,
      500,
    );
    t.equal(got, "hello from capsule\n", `homeB workload -> homeA workload at ${addr}:8080 after ${ms} ms`);
    t.match(
      await ctl(lab, ["--capsule", "homeA", "policy", "explain", "client", "web", "8080/tcp"]),
      /^allow client \(100\.[\d.]+\) -> web \(100\.[\d.]+\) 8080\/tcp\nallowed by policy client-web rule 1/,
      "capsulectl policy explain",
    );
    t.equal(
      await ctl(lab, [
        "--capsule",
        "homeB",
        "workload",
        "exec",
        "client",
        "--",
        "wget",
        "-qO-",
        `http://${addr}:8080/`,
      ]),
      "hello from capsule\n",
      "capsulectl workload exec",
    );
    t.match(
      await ctl(lab, ["--capsule", "homeB", "workload", "logs", "client"]),
      /^client up\n/,
      "capsulectl workload logs",
    );
    t.match(
      await ctl(lab, ["--all", "workload", "list"]),
      /homeA\s+web\s+.*running.*\n.*homeB\s+client\s+.*running/s,
      "workload list over every capsule",
    );

    // Killed behind capsuled's back: restarted, same address.
    const oldPid = a.w.pid;
    // process.kill(0) would signal our own process group.
    if (!(oldPid > 1)) throw new Error(`no pid for web: ${JSON.stringify(a.w)}`);
    process.kill(oldPid, "SIGKILL");
    const t0 = Date.now();
    // The new pid shows (containerd lists the task) a moment before the restart is counted and
    // its event written: wait for all three.
    const re = await waitRunning(
      "homeA",
      "web",
      (w) => w.pid !== oldPid && w.restarts >= 1 && w.events.some((e) => e.type === "restarted"),
    );
    t.ok(re.ms >= 0, `restarted ${Date.now() - t0} ms after the kill`);
    t.equal(re.w.address, addr, "same address after the restart");
    t.ok(re.w.restarts >= 1, "restart counted");
    t.ok(
      re.w.events.some((e) => e.type === "exited" && /exited with code 137/.test(e.message)),
      "the exit is an event",
    );
    t.ok(
      re.w.events.some((e) => e.type === "restarted"),
      "the restart is an event",
    );
    ms = await waitFor(async () => (await body()) !== "", 20_000, 500);
    t.ok(ms >= 0, "reachable again");

    // capsuled SIGKILL + restart: the container is adopted, not duplicated or restarted.
    const sock = containerdPaths(lab.capsule("homeA").stateDir).address;
    const ctrLs = async () =>
      (await lab.exec("homeA", ["ctr", "-a", sock, "-n", "capsule", "containers", "ls", "-q"])).stdout
        .split("\n")
        .filter(Boolean);
    t.same(await ctrLs(), ["web.1"]);
    await killCapsuled(lab, "homeA");
    await lab.up();
    const after = await waitRunning("homeA", "web");
    t.ok(after.ms >= 0, `running after capsuled restart (${after.ms} ms)`);
    t.equal(after.w.pid, re.w.pid, "same process: adopted");
    t.equal(after.w.address, addr, "same address");
    // Give the reconciler a few passes to (wrongly) act.
    await new Promise((r) => setTimeout(r, 5_000));
    t.same(await ctrLs(), ["web.1"], "no duplicate container");
    t.equal((await get("homeA", "web")).pid, re.w.pid, "still the same process");

    // A spec change (env) recreates the container: new generation, same address.
    t.equal((await apply("homeA", [web({ GREETING: "2" })])).results[0]?.action, "configured");
    const g2 = await waitRunning("homeA", "web", (w) => w.generation === "2");
    t.ok(g2.ms >= 0, `generation 2 running after ${g2.ms} ms`);
    t.equal(g2.w.address, addr, "same address");
    t.same(await ctrLs(), ["web.2"], "the old generation is gone");
    const env = await rpc<{ stdout: unknown }>(lab, "homeA", "Workloads/Exec", {
      name: "web",
      argv: ["env"],
    });
    const envText =
      typeof env.stdout === "string"
        ? env.stdout
        : Buffer.from((env.stdout as { data: number[] }).data).toString();
    t.match(envText, /GREETING=2/);
    ms = await waitFor(async () => (await body()) !== "", 20_000, 500);
    t.ok(ms >= 0, "reachable on the same address after the recreate");

    // Host-port conflicts are refused, naming the port, with nothing changed.
    const other = (hostPort: number) =>
      JSON.stringify({
        kind: "Workload",
        name: "other",
        container: { image: "demo/httpd:1", command: ["sleep", "3600"] },
        ports: [{ port: 80, hostPort }],
      });
    await t.rejects(apply("homeA", [other(18080)]), /host port 18080\/tcp is already used by workload web/);
    await startServer(lab, "homeA", "0.0.0.0", 18081, "busy", 60);
    await t.rejects(apply("homeA", [other(18081)]), /host port 18081\/tcp is in use/);
    const list = await rpc<{ workloads: Workload[] }>(lab, "homeA", "Workloads/List");
    t.same(
      list.workloads.map((w) => w.name),
      ["web"],
      "nothing applied",
    );
    await t.rejects(
      apply("homeA", [web({ GREETING: "2" }, { container: { image: "demo/missing:1" } })]),
      /demo\/missing:1.*image store/,
    );

    // hostPort: DNAT from the home LAN (the router) and from the capsule itself.
    const lanA = lab.capsule("homeA").lanAddress ?? "";
    for (const node of ["homeA-rtr", "homeA"]) {
      const r = await lab.exec(node, ["curl", "-sS", "--max-time", "5", `http://${lanA}:18080/`]);
      t.equal(r.stdout, "hello from capsule\n", `hostPort ${lanA}:18080 from ${node}: ${r.stderr.trim()}`);
    }

    // Egress: masqueraded to the capsule's LAN address for the outside world, never for the fabric.
    const peer = async (c: string, name: string, host: string, port: number) => {
      const r = await rpc<{ exitCode: number; stdout: unknown }>(lab, c, "Workloads/Exec", {
        name,
        argv: ["nc", "-w", "5", host, String(port)],
        timeoutSeconds: 10,
      });
      const s = r.stdout as { data?: number[] } | string;
      return typeof s === "string" ? s : Buffer.from(s.data ?? []).toString();
    };
    const rtrLan = lab.plan.homes.find((h) => h.name === "homeA")?.routerLan ?? "";
    await startServer(lab, "homeA-rtr", rtrLan, 9100, "@peer", 60);
    t.equal(await peer("homeA", "web", rtrLan, 9100), lanA, "egress to the LAN is masqueraded");
    // A server in web's own network namespace answers with the peer address it saw.
    const webPid = (await get("homeA", "web")).pid;
    const srv = await lab.exec("homeA", [
      "setsid",
      "-f",
      "sh",
      "-c",
      'exec >/dev/null 2>&1 </dev/null; exec "$@"',
      "server",
      "nsenter",
      "-t",
      String(webPid),
      "-n",
      "timeout",
      "60",
      "socat",
      "TCP-LISTEN:9101,reuseaddr,fork",
      "SYSTEM:echo $SOCAT_PEERADDR",
    ]);
    t.equal(srv.exitCode, 0, `server in web's namespace: ${srv.stderr}`);
    await waitFor(
      async () =>
        (
          await lab.exec("homeA", ["nsenter", "-t", String(webPid), "-n", "ss", "-Htln", "sport = :9101"])
        ).stdout.trim() !== "",
      5_000,
    );
    t.equal(await peer("homeB", "client", addr, 9101), "", "9101 is not in the policy: denied");
    writeFileSync(policyFile, policy(["8080/tcp", "9101/tcp"]));
    t.match(
      await ctl(lab, ["--capsule", "homeA", "policy", "apply", "-f", policyFile]),
      /^policy\/client-web configured\n/,
    );
    const clientAddr = (await get("homeB", "client")).address;
    let seen = "";
    await waitFor(
      async () => {
        seen = (await peer("homeB", "client", addr, 9101)).trim();
        return seen !== "";
      },
      10_000,
      200,
    );
    t.equal(seen, clientAddr, "fabric traffic keeps the workload's own source address");
    const ss = await lab.exec("homeA", [
      "nsenter",
      "-t",
      String(webPid),
      "-n",
      "ss",
      "-Htlnp",
      "sport = :9101",
    ]);
    for (const m of ss.stdout.matchAll(/pid=(\d+)/g))
      try {
        process.kill(Number(m[1]), "SIGTERM");
      } catch {}

    // Volumes: data survives a restart; one workload at a time; delete refused while mounted.
    await rpc(lab, "homeA", "Volumes/Create", { name: "data", size: "64Mi" });
    const db = (name: string) =>
      JSON.stringify({
        kind: "Workload",
        name,
        container: { image: "demo/httpd:1", command: ["sleep", "3600"] },
        volumes: [{ name: "data", mountPath: "/data" }],
      });
    t.equal((await apply("homeA", [db("db")])).results[0]?.action, "created");
    const d1 = await waitRunning("homeA", "db");
    t.ok(d1.ms >= 0, `db running with its volume after ${d1.ms} ms`);
    const sh = (cmd: string) =>
      rpc<{ exitCode: number; stdout: unknown }>(lab, "homeA", "Workloads/Exec", {
        name: "db",
        argv: ["sh", "-c", cmd],
      });
    t.equal((await sh("echo kept > /data/file && sync")).exitCode, 0, "wrote to the volume");
    await rpc(lab, "homeA", "Workloads/Restart", { name: "db" });
    const d2 = await waitRunning("homeA", "db", (w) => w.pid !== d1.w.pid);
    t.ok(d2.ms >= 0, "db restarted");
    const kept = await sh("cat /data/file");
    const keptText =
      typeof kept.stdout === "string"
        ? kept.stdout
        : Buffer.from((kept.stdout as { data: number[] }).data).toString();
    t.equal(keptText, "kept\n", "volume data survives the restart");
    await t.rejects(apply("homeA", [db("db2")]), /volume data is in use by workload db/);
    await t.rejects(
      rpc(lab, "homeA", "Volumes/Delete", { name: "data" }),
      /db/,
      "delete refused while mounted",
    );
    await t.rejects(
      apply("homeA", [
        JSON.stringify({
          kind: "Workload",
          name: "db3",
          container: { image: "demo/httpd:1", command: ["sleep", "3600"] },
          volumes: [{ name: "nope", mountPath: "/data" }],
        }),
      ]),
      /nope/,
      "missing volume refused",
    );
    await rpc(lab, "homeA", "Workloads/Delete", { name: "db" });
    await rpc(lab, "homeA", "Volumes/Delete", { name: "data" });
    t.same(
      (await rpc<{ volumes: unknown[] }>(lab, "homeA", "Volumes/List")).volumes,
      [],
      "deleted once unmounted",
    );

    const final = await get("homeA", "web");
    t.match(final, { phase: "running", address: addr, generation: "2" });
    t.ok(final.events.length > 0 && final.events.length <= 20, `${final.events.length} events`);
    t.comment(final.events.map((e) => `${e.type}: ${e.message}`).join("\n"));
  });
}
