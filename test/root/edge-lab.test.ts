// The edge in the lab, end to end through capsuled and capsulectl: homeA and homeB sit behind
// NAT with no port forward; the edge (192.0.2.10) gets its certificates from the lab's ACME CA
// (Caddy acme_server at acme.capsule.test) and the internet client resolves *.capsule.test
// through the lab's DNS. From the client: HTTPS to a workload on homeB validated against the lab
// CA, with the visitor's address passed on; a workload on homeA on the same edge address by host
// name; HTTP redirected to HTTPS; raw TCP via DNAT with the visitor's address as the workload
// sees it; a passthrough name answered with the workload's own certificate next to the
// terminated ones on :443; `policy show` and `edge list`; a request loop that a SIGKILL and
// restart of the edge's capsuled does not interrupt; a workload nobody exposed is reachable
// through the edge by no path; unexpose turns each off and drops its rule.
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import t from "tap";
import { labCaRoot } from "../../lab/ca.js";
import { ctl, rpc, waitFor } from "../helpers/fabric.js";
import { buildImageArchive } from "../helpers/images.js";
import { selfSigned } from "../helpers/edge-ns.js";
import { isRoot, killCapsuled, ROOT_SKIP, withLab } from "../helpers/lab.js";
import { waitRuntime } from "../helpers/workloads.js";

const EDGE_IP = "192.0.2.10";
const CLIENT_IP = "192.0.2.200";

/** CGI is a busybox httpd script that reports who it sees. */
const CGI = `#!/bin/sh
echo "Content-Type: text/plain"
echo ""
echo "remote=$REMOTE_ADDR xff=$HTTP_X_FORWARDED_FOR"
`;

if (!isRoot()) {
  t.plan(0, ROOT_SKIP);
} else {
  t.test("edge: HTTPS, TCP and passthrough from homes behind NAT, restart-safe, default-deny", async (t) => {
    const lab = await withLab(t);
    const work = mkdtempSync(join(tmpdir(), "capsule-edge-lab-"));
    t.teardown(() => rmSync(work, { recursive: true, force: true }));
    const caRoot = labCaRoot(lab.plan.labDir);
    await ctl(lab, ["fabric", "enroll", "edge", "homeA"]);
    await ctl(lab, ["fabric", "enroll", "edge", "homeB"]);

    const client = (argv: string[], timeoutMs = 20_000) => lab.exec("client", argv, { timeoutMs });
    const curl = async (url: string, extra: string[] = []) => {
      const r = await client([
        "curl",
        "-sS",
        "--max-time",
        "5",
        "--cacert",
        caRoot,
        "-w",
        "\n%{http_code}",
        ...extra,
        url,
      ]);
      const lines = r.stdout.trimEnd().split("\n");
      const code = Number(lines.pop());
      return { code, body: lines.join("\n").trim(), err: r.stderr.trim() };
    };

    // Workloads: web and secret on homeB, blog on homeA (busybox httpd with a CGI that reports
    // the remote address and X-Forwarded-For), tls on homeB (openssl s_server with its own
    // self-signed certificate for tls.capsule.test).
    await waitRuntime(lab, "homeA");
    await waitRuntime(lab, "homeB");
    const httpd = (who: string) =>
      buildImageArchive(work, {
        name: `demo/${who.toLowerCase()}:1`,
        files: { "www/index.html": `hello from ${who}\n`, "www/cgi-bin/who": CGI },
      });
    const own = selfSigned(work, "tls.capsule.test", "DNS:tls.capsule.test");
    const tlsImg = await buildImageArchive(work, {
      name: "demo/tls:1",
      hostBinaries: ["/usr/bin/openssl"],
      files: {
        "tls/cert.pem": readFileSync(own.cert, "utf8"),
        "tls/key.pem": readFileSync(own.key, "utf8"),
      },
    });
    const images = { homeB: [await httpd("homeB"), tlsImg], homeA: [await httpd("homeA")] };
    for (const [c, list] of Object.entries(images))
      for (const img of list) await ctl(lab, ["--capsule", c, "image", "push", img.archive]);
    const wl = (name: string, image: string, command: string[]) => ({
      kind: "Workload",
      name,
      container: { image, command },
    });
    const httpdCmd = ["sh", "-c", "/bin/busybox chmod 755 /www/cgi-bin/who; exec httpd -f -p 8080 -h /www"];
    const manifests: Record<string, object[]> = {
      homeB: [
        wl("web", "demo/homeb:1", httpdCmd),
        wl("secret", "demo/homeb:1", httpdCmd),
        wl("tls", "demo/tls:1", [
          "/usr/bin/openssl",
          "s_server",
          "-quiet",
          "-accept",
          "8443",
          "-cert",
          "/tls/cert.pem",
          "-key",
          "/tls/key.pem",
          "-www",
        ]),
      ],
      homeA: [wl("blog", "demo/homea:1", httpdCmd)],
    };
    for (const [c, docs] of Object.entries(manifests)) {
      const f = join(work, `${c}.json`);
      writeFileSync(f, docs.map((d) => JSON.stringify(d)).join("\n---\n"));
      await ctl(lab, ["--capsule", c, "apply", "-f", f, "--wait"]);
    }
    const addr = async (c: string, name: string) =>
      (await rpc<{ address: string }>(lab, c, "Workloads/Get", { name })).address;
    const secretAddr = await addr("homeB", "secret");

    // HTTPS: expose -> first 200 through the lab's ACME CA.
    const t0 = Date.now();
    const out = await ctl(lab, [
      "--capsule",
      "homeB",
      "expose",
      "web",
      "--edge",
      "edge",
      "--host",
      "web.capsule.test",
      "--port",
      "8080",
    ]);
    t.match(
      out,
      /exposure\/web created: https:\/\/web\.capsule\.test\/ -> 100\.\d+\.\d+\.\d+:8080 \(https at edge\)/,
    );
    let first = { code: 0, body: "", err: "" };
    const ms = await waitFor(
      async () => {
        first = await curl("https://web.capsule.test/");
        return first.code === 200;
      },
      30_000,
      100,
    );
    t.ok(ms >= 0, `expose -> first HTTPS 200 in ${Date.now() - t0} ms (ACME included): ${first.err}`);
    t.equal(first.body, "hello from homeB", "served by homeB's workload, certificate valid for the lab CA");
    t.match(
      (await curl("https://web.capsule.test/cgi-bin/who")).body,
      `xff=${CLIENT_IP}`,
      "X-Forwarded-For is the visitor",
    );
    const redirect = await curl("http://web.capsule.test/some/path?q=1", ["-o", "/dev/null", "-D", "-"]);
    t.equal(redirect.code, 308, "HTTP is redirected");
    t.match(
      redirect.body,
      /location: https:\/\/web\.capsule\.test\/some\/path\?q=1/i,
      "to the same URL over HTTPS",
    );
    const issuer = await client([
      "sh",
      "-c",
      "echo | openssl s_client -connect web.capsule.test:443 -servername web.capsule.test 2>/dev/null | openssl x509 -noout -issuer",
    ]);
    t.notMatch(issuer.stdout, /tls\.capsule\.test/, `issued by the lab CA (${issuer.stdout.trim()})`);

    // A second home on the same edge address, by host name.
    await ctl(lab, [
      "--capsule",
      "homeA",
      "expose",
      "blog",
      "--edge",
      "edge",
      "--host",
      "blog.capsule.test",
      "--port",
      "8080",
    ]);
    t.ok(
      (await waitFor(async () => (await curl("https://blog.capsule.test/")).code === 200, 30_000, 100)) >= 0,
    );
    t.equal((await curl("https://blog.capsule.test/")).body, "hello from homeA", "homeA by host name");
    t.equal((await curl("https://web.capsule.test/")).body, "hello from homeB", "homeB still by host name");

    // Raw TCP by DNAT: the workload sees the visitor's own address.
    await ctl(lab, ["--capsule", "homeB", "expose", "web", "--edge", "edge", "--tcp", "8081:8080"]);
    let tcp = { code: 0, body: "", err: "" };
    t.ok(
      (await waitFor(
        async () => {
          tcp = await curl(`http://${EDGE_IP}:8081/cgi-bin/who`);
          return tcp.code === 200;
        },
        15_000,
        100,
      )) >= 0,
      `TCP exposure answers (${tcp.err})`,
    );
    // busybox httpd listens dual-stack: the address shows as ::ffff:192.0.2.200.
    t.match(
      tcp.body,
      new RegExp(`remote=\\[?(::ffff:)?${CLIENT_IP.replaceAll(".", "\\.")}\\]? `),
      "the workload sees the visitor's address over raw TCP",
    );
    const raw = await client([
      "sh",
      "-c",
      `printf 'GET / HTTP/1.0\\r\\n\\r\\n' | socat -T 5 - TCP:${EDGE_IP}:8081`,
    ]);
    t.match(raw.stdout, /hello from homeB/, "a raw TCP client gets the workload's bytes");

    // Passthrough next to the terminated names on :443: the workload's own certificate.
    await ctl(lab, [
      "--capsule",
      "homeB",
      "expose",
      "tls",
      "--edge",
      "edge",
      "--host",
      "tls.capsule.test",
      "--port",
      "8443",
      "--passthrough",
    ]);
    let pt = { code: 0, body: "", err: "" };
    t.ok(
      (await waitFor(
        async () => {
          pt = await client([
            "curl",
            "-sS",
            "--max-time",
            "5",
            "--cacert",
            own.cert,
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "https://tls.capsule.test/",
          ]).then((r) => ({ code: Number(r.stdout.trim()), body: "", err: r.stderr }));
          return pt.code === 200;
        },
        15_000,
        200,
      )) >= 0,
      `passthrough answers with the workload's own certificate (${pt.err})`,
    );
    t.equal(
      (await curl("https://web.capsule.test/")).code,
      200,
      "terminated name still served on the same :443",
    );

    // The implicit rules, and edge list everywhere.
    const show = await ctl(lab, ["--capsule", "homeB", "policy", "show"]);
    t.match(show, /expose web https web\.capsule\.test at edge/, "policy show: the HTTPS exposure's rule");
    t.match(show, /expose web tcp 8081->8080 at edge/, "policy show: the TCP exposure's rule");
    t.match(show, /expose tls passthrough tls\.capsule\.test at edge/, "policy show: the passthrough rule");
    const list = JSON.parse(await ctl(lab, ["--capsule", "edge", "edge", "list", "-o", "json"])) as {
      routes: { host: string; tcpPublicPort: number; cert: string; health: string; capsule: string }[];
    };
    t.same(
      list.routes.map((r) => r.host || String(r.tcpPublicPort)).sort(),
      ["8081", "blog.capsule.test", "tls.capsule.test", "web.capsule.test"],
      "edge list on the edge: every route",
    );
    t.equal(list.routes.find((r) => r.host === "web.capsule.test")?.cert, "valid", "certificate valid");
    t.equal(list.routes.find((r) => r.host === "blog.capsule.test")?.capsule, "homeA", "blog runs on homeA");
    const healthy = await waitFor(
      async () => {
        const l = JSON.parse(
          await ctl(lab, ["--capsule", "edge", "edge", "list", "-o", "json"]),
        ) as typeof list;
        return l.routes.every((r) => r.health === "healthy");
      },
      20_000,
      1000,
    );
    t.ok(healthy >= 0, "every upstream healthy");
    const info = await ctl(lab, ["--capsule", "edge", "capsule", "info", "-o", "wide"]);
    t.match(info, /\s192\.0\.2\.10\s/, "capsule info -o wide: the edge's public address");
    t.match(info, /\s(kvm|tcg)\s/, "and the microVM accelerator it detected");
    t.match(await ctl(lab, ["--all", "edge", "list"]), /homeB\s+web\.capsule\.test/, "fan-out edge list");

    // The edge's capsuled SIGKILLed and restarted under a request loop: no request fails.
    const loop = client(
      [
        "sh",
        "-c",
        `ok=0; bad=0; end=$(($(date +%s)+12)); while [ $(date +%s) -lt $end ]; do c=$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 --cacert ${caRoot} https://web.capsule.test/); if [ "$c" = 200 ]; then ok=$((ok+1)); else bad=$((bad+1)); fi; done; echo "$ok $bad"`,
      ],
      60_000,
    );
    await new Promise((r) => setTimeout(r, 2_000));
    await killCapsuled(lab, "edge");
    await lab.up();
    const [okN, badN] = (await loop).stdout.trim().split(" ").map(Number);
    t.ok((okN ?? 0) > 20, `${okN} requests during the restart`);
    t.equal(badN, 0, "none failed");
    t.equal((await curl("https://web.capsule.test/")).body, "hello from homeB", "served after the restart");

    // Nobody exposed `secret`: not by host name, not by its fabric address routed via the edge.
    const unknown = await curl("https://secret.capsule.test/");
    t.not(unknown.code, 200, `an unknown name gets no certificate (${unknown.err})`);
    t.equal(
      (await curl("https://web.capsule.test/", ["-H", "Host: secret.capsule.test"])).code,
      404,
      "another Host header on a served name: 404",
    );
    await client(["ip", "route", "replace", "100.64.0.0/10", "via", EDGE_IP]);
    t.teardown(() => client(["ip", "route", "del", "100.64.0.0/10"]).then(() => undefined));
    const direct = await client([
      "curl",
      "-s",
      "--max-time",
      "3",
      "-o",
      "/dev/null",
      "-w",
      "%{http_code}",
      `http://${secretAddr}:8080/`,
    ]);
    t.not(
      direct.stdout.trim(),
      "200",
      `the fabric address through the edge: no answer (${direct.stdout.trim() || direct.exitCode})`,
    );
    const directWeb = await client([
      "curl",
      "-s",
      "--max-time",
      "3",
      "-o",
      "/dev/null",
      "-w",
      "%{http_code}",
      `http://${await addr("homeB", "web")}:8080/`,
    ]);
    t.not(directWeb.stdout.trim(), "200", "nor an exposed workload's fabric address");

    // Unexpose turns each off and drops its rule.
    await ctl(lab, ["--capsule", "homeB", "unexpose", "web", "--edge", "edge", "--host", "web.capsule.test"]);
    await ctl(lab, ["--capsule", "homeB", "unexpose", "web", "--edge", "edge", "--tcp", "8081"]);
    await ctl(lab, ["--capsule", "homeB", "unexpose", "tls", "--edge", "edge", "--host", "tls.capsule.test"]);
    t.not((await curl("https://web.capsule.test/")).code, 200, "web: not served after unexpose");
    t.equal(
      (await curl("https://blog.capsule.test/", ["-H", "Host: web.capsule.test"])).code,
      404,
      "web: no route left (404 by Host header)",
    );
    t.not((await curl(`http://${EDGE_IP}:8081/`)).code, 200, "TCP port closed");
    const ptOff = await client([
      "curl",
      "-s",
      "--max-time",
      "3",
      "--cacert",
      own.cert,
      "-o",
      "/dev/null",
      "-w",
      "%{http_code}",
      "https://tls.capsule.test/",
    ]);
    t.not(ptOff.stdout.trim(), "200", "passthrough off");
    t.equal(
      (await curl("https://blog.capsule.test/")).body,
      "hello from homeA",
      "the other home's route untouched",
    );
    t.notMatch(await ctl(lab, ["--capsule", "homeB", "policy", "show"]), /expose web/, "rules gone");
    t.match(
      await ctl(lab, [
        "--capsule",
        "homeB",
        "unexpose",
        "web",
        "--edge",
        "edge",
        "--host",
        "web.capsule.test",
      ]),
      /not exposed/,
      "unexpose is idempotent",
    );
  });
}
