// The lab CA and DNS as the edge and its visitors see them: names under capsule.test resolve in
// every lab namespace (and nothing else does), the ACME directory answers over TLS from the lab
// root, and a real ACME client gets certificates from it (http-01 and tls-alpn-01, validated
// through the lab DNS) on a throwaway host at 192.0.2.11, so the edge's ports stay its own.
import { spawnSync } from "node:child_process";
import { existsSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import t from "tap";
import { ACME_DIRECTORY, CA_LEAF_LIFETIME_MS, PROBE_ADDRESS, PROBE_ZONE } from "../../lab/ca.js";
import { waitFor } from "../helpers/fabric.js";
import { addInternetHost, assertNoLeftovers, isRoot, ROOT_SKIP, withLab } from "../helpers/lab.js";

if (!isRoot()) {
  t.plan(0, ROOT_SKIP);
} else {
  const hostFiles = () => ({
    resolv: readFileSync("/etc/resolv.conf", "utf8"),
    hosts: readFileSync("/etc/hosts", "utf8"),
  });
  const before = hostFiles();
  const lab = await withLab(t, { homes: 1 });
  const { prefix, labDir } = lab.plan;
  const ca = lab.plan.ca!;
  const root = ca.rootFile;
  const hostsOf = (out: string) => out.trim().split(/\s+/)[0];

  t.test("names under capsule.test resolve in every lab namespace; nothing else does", async (t) => {
    const client = async (name: string) =>
      hostsOf((await lab.exec("client", ["getent", "hosts", name])).stdout);
    t.equal(await client("x.capsule.test"), "192.0.2.10", "any name is the edge");
    t.equal(await client("acme.capsule.test"), "192.0.2.53", "the CA");
    t.equal(await client(`www.${PROBE_ZONE}`), PROBE_ADDRESS, "the probe zone");
    for (const node of ["edge", "homeA", "ca", "homeA-rtr"]) {
      const r = await lab.exec(node, ["getent", "hosts", "web.capsule.test"]);
      t.equal(hostsOf(r.stdout), "192.0.2.10", `${node} resolves through the lab DNS`);
    }
    const t0 = Date.now();
    const outside = await lab.exec("client", ["getent", "hosts", "example.com"]);
    t.equal(outside.exitCode, 2, "a name outside the lab does not resolve (no upstream)");
    t.ok(Date.now() - t0 < 5_000, `and is refused at once (${Date.now() - t0} ms)`);

    const cli = join(import.meta.dirname, "../../dist/lab/cli.js");
    const env = { ...process.env };
    delete env.NODE_OPTIONS;
    const viaCli = spawnSync(
      process.execPath,
      [cli, "exec", "--prefix", prefix, "client", "--", "getent", "hosts", "web.capsule.test"],
      { encoding: "utf8", env, timeout: 30_000 },
    );
    t.equal(hostsOf(viaCli.stdout), "192.0.2.10", `lab exec client -- getent hosts (${viaCli.stderr})`);

    const curl = await lab.exec("client", [
      "curl",
      "-sS",
      "--max-time",
      "5",
      "-o",
      "/dev/null",
      "-w",
      "%{remote_ip}",
      "--cacert",
      root,
      ACME_DIRECTORY,
    ]);
    t.equal(curl.stdout, "192.0.2.53", `curl resolves through the system resolver (${curl.stderr})`);
  });

  t.test("dnsmasq and the CA listen on 192.0.2.53 only", async (t) => {
    for (const flags of ["-Hlnu", "-Hlnt"]) {
      const ss = await lab.exec("ca", ["ss", flags]);
      const locals = ss.stdout
        .trim()
        .split("\n")
        .map((l) => l.trim().split(/\s+/)[3]);
      t.ok(locals.length > 0, `ss ${flags}: ${locals.join(" ")}`);
      for (const l of locals) t.match(l, /^192\.0\.2\.53:(53|443)$/, `${l} is the CA address`);
    }
  });

  t.test("the ACME directory answers over TLS from the lab root, which no system store knows", async (t) => {
    const r = await lab.exec("client", ["curl", "-sS", "--max-time", "5", "--cacert", root, ACME_DIRECTORY]);
    t.equal(r.exitCode, 0, r.stderr);
    const dir = JSON.parse(r.stdout) as Record<string, string>;
    t.equal(dir.newOrder, "https://acme.capsule.test/acme/local/new-order");
    const untrusted = await lab.exec("client", ["curl", "-sS", "--max-time", "5", ACME_DIRECTORY]);
    t.equal(untrusted.exitCode, 60, "without the lab root the certificate is not trusted");
    const subject = await lab.exec("client", ["openssl", "x509", "-in", root, "-noout", "-subject"]);
    t.match(subject.stdout, new RegExp(`Capsule Lab ${prefix} CA`));
  });

  t.test("a real ACME issuance: http-01 and tls-alpn-01, validated through the lab DNS", async (t) => {
    const probe = await addInternetHost(t, lab, "probe", PROBE_ADDRESS);
    const dir = join(labDir, "probe");
    const names = { http: `http.${PROBE_ZONE}`, "tls-alpn": `alpn.${PROBE_ZONE}` };
    const policy = (name: string, only: "http" | "tls-alpn") => ({
      subjects: [name],
      issuers: [
        {
          module: "acme",
          ca: ACME_DIRECTORY,
          trusted_roots_pem_files: [root],
          challenges: { [only === "http" ? "tls-alpn" : "http"]: { disabled: true } },
        },
      ],
    });
    const config = {
      admin: { disabled: true, config: { persist: false } },
      storage: { module: "file_system", root: join(dir, "caddy") },
      apps: {
        tls: {
          automation: { policies: [policy(names.http, "http"), policy(names["tls-alpn"], "tls-alpn")] },
        },
        http: {
          servers: {
            probe: {
              listen: [":443"],
              routes: [
                {
                  match: [{ host: Object.values(names) }],
                  handle: [{ handler: "static_response", body: "probe ok" }],
                },
              ],
            },
          },
        },
      },
    };
    mkdirSync(dir, { recursive: true });
    const conf = join(dir, "caddy.json");
    writeFileSync(conf, JSON.stringify(config));
    const start = await probe.exec([
      "setsid",
      "-f",
      "sh",
      "-c",
      'exec >>"$0" 2>&1 </dev/null; exec "$@"',
      join(dir, "caddy.log"),
      "env",
      `HOME=${dir}`,
      `XDG_DATA_HOME=${join(dir, "data")}`,
      `XDG_CONFIG_HOME=${join(dir, "config")}`,
      "caddy",
      "run",
      "--config",
      conf,
    ]);
    t.equal(start.exitCode, 0, start.stderr);
    const crt = (name: string) =>
      join(dir, "caddy/certificates/acme.capsule.test-acme-local-directory", name, `${name}.crt`);
    const ms = await waitFor(async () => Object.values(names).every((n) => existsSync(crt(n))), 30_000);
    if (ms < 0) {
      t.fail("no certificates after 30 s");
      t.comment(readFileSync(join(dir, "caddy.log"), "utf8").split("\n").slice(-20).join("\n"));
      return;
    }
    t.comment(`issued in ${ms} ms`);
    const log = readFileSync(join(dir, "caddy.log"), "utf8");
    for (const [challenge, name] of Object.entries(names)) {
      t.match(
        log,
        new RegExp(`"identifier":"${name.replace(/\./g, "\\.")}","challenge_type":"${challenge}-01"`),
        `${name} was validated with ${challenge}-01`,
      );
      const r = await lab.exec("client", [
        "curl",
        "-sS",
        "--max-time",
        "5",
        "--cacert",
        root,
        `https://${name}/`,
      ]);
      t.equal(
        r.stdout,
        "probe ok",
        `the client trusts ${name}'s certificate through the lab root (${r.stderr})`,
      );
      const x = await lab.exec("client", [
        "openssl",
        "x509",
        "-in",
        crt(name),
        "-noout",
        "-issuer",
        "-dates",
      ]);
      t.match(x.stdout, new RegExp(`issuer=CN = Capsule Lab ${prefix} CA - ECC Intermediate`));
      const date = (k: string) => Date.parse(new RegExp(`${k}=(.*)`).exec(x.stdout)?.[1] ?? "");
      const lifetime = date("notAfter") - date("notBefore");
      t.ok(
        lifetime > 0 && lifetime <= CA_LEAF_LIFETIME_MS + 5 * 60_000,
        `a short-lived leaf: ${(lifetime / 3_600_000).toFixed(2)} h`,
      );
    }
  });

  t.test("up again changes nothing; a killed dnsmasq is started again, alone", async (t) => {
    const rootBefore = readFileSync(root, "utf8");
    const again = await lab.up();
    t.same(again.networkCommands, [], "no network change");
    t.same(again.resolverCommands, [], "no /etc/netns change");
    t.same(again.servicesStarted, [], "no CA process started");
    t.same(again.started, [], "no capsule started");
    t.equal(readFileSync(root, "utf8"), rootBefore, "the same root");

    const pid = Number(readFileSync(ca.dnsmasq.pidFile, "utf8"));
    process.kill(pid, "SIGKILL");
    const dnsmasqPid = async () =>
      (await lab.status()).rows.find((r) => r.role === "ca")?.services?.find((s) => s.name === "dnsmasq")
        ?.pid;
    t.ok((await waitFor(async () => (await dnsmasqPid()) === undefined, 5_000)) >= 0, "dnsmasq is gone");
    const healed = await lab.up();
    t.same(healed.servicesStarted, ["dnsmasq"]);
    const r = await lab.exec("client", ["getent", "hosts", "web.capsule.test"]);
    t.equal(hostsOf(r.stdout), "192.0.2.10", "resolving again");
  });

  t.test("status shows the CA row", async (t) => {
    const row = (await lab.status()).rows.find((r) => r.role === "ca")!;
    t.equal(row.namespace, `${prefix}-ca`);
    t.equal(row.wan, "192.0.2.53/24");
    t.ok(row.listening, "the ACME directory answers");
    t.same(
      row.services?.map((s) => [s.name, typeof s.pid]),
      [
        ["dnsmasq", "number"],
        ["caddy", "number"],
      ],
    );
  });

  t.test(
    "down removes the CA, its processes and /etc/netns entries; the host's files are untouched",
    async (t) => {
      const r = await lab.down();
      t.same(r.leftovers, []);
      t.ok(
        r.resolvers.includes(`${prefix}-ca`) && r.resolvers.includes(`${prefix}-client`),
        r.resolvers.join(" "),
      );
      await assertNoLeftovers(t, prefix);
      t.same(hostFiles(), before, "/etc/resolv.conf and /etc/hosts as they were");
    },
  );
}
