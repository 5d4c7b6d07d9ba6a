// The edge against the real Caddy in a throwaway network namespace: CaddySupervisor starts it
// detached, CaddyEdge loads the static plan (internal CA) whose one route proxies to a tiny HTTP
// server standing in for HAProxy's router (it echoes X-Forwarded-For) and whose on-demand TLS
// asks a tiny "ask" endpoint that allows one name. curl inside the namespace checks that the
// allowed name gets a certificate on its first handshake (validated against Caddy's local root)
// and any other name none, the HTTP->HTTPS redirect, the forwarded address, that a second apply
// loads nothing, and that a config Caddy rejects leaves the old one serving. Teardown stops
// Caddy and kills everything in the namespace.
import { readdirSync, readFileSync } from "node:fs";
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
const fs = require("node:fs");
http.createServer((req, res) => {
  const domain = new URL(req.url, "http://x").searchParams.get("domain");
  fs.appendFileSync(process.argv[1], String(domain) + "\\n");
  res.statusCode = domain === "app.lab.test" ? 200 : 404;
  res.end();
}).listen(18081, "127.0.0.1");
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

    const asked = join(n.stateDir, "asked.log");
    await n.spawner.spawnDetached(["node", "-e", UPSTREAM, asked], {
      logFile: join(n.stateDir, "upstream.log"),
    });
    for (const port of [18080, 18081])
      t.ok(
        await waitFor(
          async () => (await n.runner.run(["ss", "-Hltn", `sport = :${port}`])).stdout.trim() !== "",
          5_000,
        ),
        `upstream listening on ${port}`,
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
      router: { proxy: "127.0.0.1:18080", ask: "http://127.0.0.1:18081/ask" },
    };
    const edge = new CaddyEdge({ admin: s.admin, plan });
    const certs = () => {
      try {
        return readdirSync(join(p.storage, "certificates", "local"));
      } catch {
        return [];
      }
    };
    t.equal((await edge.apply()).changed, true, "plan loaded");
    t.equal((await edge.apply()).changed, false, "second apply: Caddy's config already matches");
    t.equal((await new CaddyEdge({ admin: s.admin, plan }).apply()).changed, false, "a new applier too");
    t.same(certs().sort(), [], "no certificate before a handshake");

    const https = (extra: string[] = [], host = "app.lab.test") =>
      n.runner.run(
        [
          "curl",
          "-sS",
          "--max-time",
          "5",
          "--resolve",
          `${host}:443:127.0.0.1`,
          "--cacert",
          p.rootCert,
          ...extra,
          `https://${host}/`,
        ],
        { allowFailure: true, timeoutMs: 10_000 },
      );
    t.ok(
      await waitFor(async () => (await https()).exitCode === 0, 15_000),
      "HTTPS answers with a valid cert, obtained on demand",
    );
    t.ok(certs().includes("app.lab.test"), "the certificate is stored");
    const other = await https([], "other.lab.test");
    t.not(other.exitCode, 0, "a name the ask endpoint refuses gets no certificate");
    t.notOk(certs().includes("other.lab.test"), "and none is stored");
    const asks = readFileSync(asked, "utf8").split("\n").filter(Boolean);
    t.ok(asks.includes("app.lab.test") && asks.includes("other.lab.test"), `Caddy asked: ${asks.join(",")}`);
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
    await t.rejects(bad.apply(), {
      code: "CAPSULE_INVALID_CONFIG",
      message: /^caddy rejected the config: /,
    });
    const still = await https();
    t.equal(still.stdout.trim(), "hello from upstream xff=127.0.0.1", "old config still serving");
    t.equal((await edge.apply()).changed, false, "and it is still the plan");

    t.equal(await sup.stop({ stateDir: n.stateDir }), true, "Caddy stopped");
    const left = await host.run(["pgrep", "-fa", "caddy run"], { allowFailure: true });
    t.notMatch(left.stdout, p.bootstrap, "no Caddy of ours left");
  });
}
