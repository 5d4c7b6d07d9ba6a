// The edge against the real Caddy in a throwaway network namespace: CaddySupervisor starts it
// detached, CaddyEdge loads one route (internal CA) to a tiny HTTP upstream that echoes
// X-Forwarded-For, and curl inside the namespace checks HTTPS (validated against Caddy's local
// root), the HTTP->HTTPS redirect, the forwarded address, and that a config Caddy rejects
// leaves the old route serving. Teardown stops Caddy and kills everything in the namespace.
import { join } from "node:path";
import t from "tap";
import { CaddyEdge, CaddySupervisor, caddyPaths } from "../../src/edge/caddy.js";
import { ExecaRunner } from "../../src/node/host/runner.js";
import { isRoot, refClock, ROOT_SKIP, type Sandbox, waitFor, withNamespaces } from "../helpers/ns.js";

const UPSTREAM = `
const http = require("node:http");
http.createServer((req, res) => {
  res.end("hello from upstream xff=" + (req.headers["x-forwarded-for"] ?? "-") + "\\n");
}).listen(18080, "127.0.0.1");
setTimeout(() => process.exit(0), 120000);
`;

if (!isRoot()) {
  t.plan(0, ROOT_SKIP);
} else {
  const sb: Sandbox = withNamespaces(t);
  const host = new ExecaRunner();

  t.test("Caddy edge: HTTPS with the internal CA, redirect, XFF, atomic reject", async (t) => {
    const n = await sb.node("edge");
    const p = caddyPaths(n.stateDir);
    const sup = new CaddySupervisor({
      runner: n.runner,
      spawner: n.spawner,
      clock: refClock,
      timeoutMs: 10_000,
    });
    // Registered after withNamespaces' teardown, so it runs first: Caddy stops cleanly, then
    // the sandbox kills whatever is left in the namespace.
    t.teardown(async () => {
      await sup.stop({ stateDir: n.stateDir }).catch(() => undefined);
    });

    await n.spawner.spawnDetached(["node", "-e", UPSTREAM], { logFile: join(n.stateDir, "upstream.log") });
    t.ok(
      await waitFor(
        async () => (await n.runner.run(["ss", "-Hltn", "sport = :18080"])).stdout.trim() !== "",
        5_000,
      ),
      "upstream listening",
    );

    const s = await sup.ensure({ stateDir: n.stateDir });
    t.equal(s.adopted, false, "started a new Caddy");
    t.ok(s.pid, "with a pid");
    const again = await sup.ensure({ stateDir: n.stateDir });
    t.same(
      { adopted: again.adopted, pid: again.pid },
      { adopted: true, pid: s.pid },
      "adopted on the second ensure",
    );

    const plan = {
      adminSocket: p.adminSocket,
      storageDir: p.storage,
      acmeCa: "internal",
      httpPort: 80,
      httpsPort: 443,
    };
    const edge = new CaddyEdge({ admin: s.admin, plan });
    const route = { host: "app.lab.test", upstream: "127.0.0.1:18080", workload: "web", capsule: "edge" };
    t.equal((await edge.apply([route])).changed, true, "route loaded");
    t.equal((await edge.apply([route])).changed, false, "same routes: Caddy's config already matches");

    const https = (extra: string[] = []) =>
      n.runner.run(
        [
          "curl",
          "-sS",
          "--max-time",
          "5",
          "--resolve",
          "app.lab.test:443:127.0.0.1",
          "--cacert",
          p.rootCert,
          ...extra,
          "https://app.lab.test/",
        ],
        { allowFailure: true, timeoutMs: 10_000 },
      );
    t.ok(
      await waitFor(async () => (await https()).exitCode === 0, 15_000),
      "HTTPS answers with a valid cert",
    );
    const r = await https(["-H", "X-Forwarded-For: 203.0.113.66"]);
    t.equal(
      r.stdout.trim(),
      "hello from upstream xff=127.0.0.1",
      "upstream's body; XFF is the visitor, not a spoofed one",
    );

    const redirect = await n.runner.run(
      [
        "curl",
        "-sS",
        "--max-time",
        "5",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{redirect_url}",
        "--resolve",
        "app.lab.test:80:127.0.0.1",
        "http://app.lab.test/x",
      ],
      { allowFailure: true, timeoutMs: 10_000 },
    );
    t.match(redirect.stdout, /^30[18] https:\/\/app\.lab\.test\/x$/, "http redirects to https");

    // A plan we accept but Caddy cannot run (the HTTPS port is the upstream's): rejected whole.
    const bad = new CaddyEdge({ admin: s.admin, plan: { ...plan, httpsPort: 18080 } });
    await t.rejects(bad.apply([route]), {
      code: "CAPSULE_INVALID_CONFIG",
      message: /^caddy rejected the config: /,
    });
    const still = await https();
    t.equal(still.stdout.trim(), "hello from upstream xff=127.0.0.1", "old route still serving");

    t.equal(await sup.stop({ stateDir: n.stateDir }), true, "Caddy stopped");
    const left = await host.run(["pgrep", "-fa", "caddy run"], { allowFailure: true });
    t.notMatch(left.stdout, p.bootstrap, "no Caddy of ours left");
  });
}
