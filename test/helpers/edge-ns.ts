/**
 * An edge topology for root tests, built on {@link Sandbox} (./ns.ts): three namespaces linked
 * by veths, all addresses from documentation/shared ranges and only inside the namespaces.
 *
 *   visitor (198.51.100.2/24, vis0) ── pub0 (198.51.100.1/24) edge capsule0 (100.64.0.1/10) ── w0 (100.64.1.1/10) wl
 *
 * The edge forwards (ip_forward=1, as the fabric would set it); the workload namespace "wl"
 * routes everything back via the edge, standing in for the fabric return path. The visitor
 * routes 100.64.0.0/10 via the edge, so a test can check that it cannot reach the fabric
 * directly. Helpers start upstreams inside "wl": an HTTP echo (X-Forwarded-For and the remote
 * address), a TLS server with its own certificate (openssl s_server -www), a TCP echo of the
 * remote address; and pebble (an ACME test CA with a mock DNS) inside "visitor".
 */
import { execFileSync } from "node:child_process";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import type { NsNode, Sandbox } from "./ns.js";
import { waitFor } from "./ns.js";

/** EdgeTopology is the three nodes and their addresses. */
export interface EdgeTopology {
  visitor: NsNode;
  edge: NsNode;
  wl: NsNode;
  publicAddress: string;
  visitorAddress: string;
  upstreamAddress: string;
  fabricIface: string;
}

/** edgeTopology builds visitor, edge and workload namespaces named `<prefix><name>` (prefix keeps several per sandbox apart). */
export async function edgeTopology(sb: Sandbox, prefix = ""): Promise<EdgeTopology> {
  const visitor = await sb.node(`${prefix}visitor`);
  const edge = await sb.node(`${prefix}edge`);
  const wl = await sb.node(`${prefix}wl`);
  await sb.link(visitor.name, "vis0", "198.51.100.2/24", edge.name, "pub0", "198.51.100.1/24");
  await sb.link(edge.name, "capsule0", "100.64.0.1/10", wl.name, "w0", "100.64.1.1/10");
  await edge.runner.run(["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
  await wl.runner.run(["ip", "route", "add", "default", "via", "100.64.0.1"]);
  await visitor.runner.run(["ip", "route", "add", "100.64.0.0/10", "via", "198.51.100.1"]);
  return {
    visitor,
    edge,
    wl,
    publicAddress: "198.51.100.1",
    visitorAddress: "198.51.100.2",
    upstreamAddress: "100.64.1.1",
    fabricIface: "capsule0",
  };
}

const listening = (n: NsNode, port: number) =>
  waitFor(async () => (await n.runner.run(["ss", "-Hltn", `sport = :${port}`])).stdout.trim() !== "", 10_000);

/** startHttpEcho serves `<tag> xff=<X-Forwarded-For> remote=<address>` on ip:port in `n`. */
export async function startHttpEcho(n: NsNode, ip: string, port: number, tag = "upstream"): Promise<void> {
  const js = `require("node:http").createServer((q,s)=>s.end(${JSON.stringify(tag)}+" xff="+(q.headers["x-forwarded-for"]??"-")+" remote="+q.socket.remoteAddress+"\\n")).listen(${port},${JSON.stringify(ip)});`;
  await n.spawner.spawnDetached(["node", "-e", js], { logFile: join(n.stateDir, `http-${port}.log`) });
  if (!(await listening(n, port))) throw new Error(`http echo on ${ip}:${port} did not listen`);
}

/** startTcpEcho answers every connection with `remote=<address>` and closes. */
export async function startTcpEcho(n: NsNode, ip: string, port: number): Promise<void> {
  const js = `require("node:net").createServer((c)=>c.end("remote="+c.remoteAddress+"\\n")).listen(${port},${JSON.stringify(ip)});`;
  await n.spawner.spawnDetached(["node", "-e", js], { logFile: join(n.stateDir, `tcp-${port}.log`) });
  if (!(await listening(n, port))) throw new Error(`tcp echo on ${ip}:${port} did not listen`);
}

/**
 * selfSigned writes a self-signed P-256 certificate for `name` (SAN DNS or IP) as
 * `<dir>/<name>.crt` and `.key` and returns the paths; `subject` defaults to `/CN=<name>`.
 */
export function selfSigned(
  dir: string,
  name: string,
  san: string,
  subject = `/CN=${name}`,
): { cert: string; key: string } {
  const cert = join(dir, `${name}.crt`);
  const key = join(dir, `${name}.key`);
  execFileSync(
    "openssl",
    [
      "req",
      "-x509",
      "-newkey",
      "ec",
      "-pkeyopt",
      "ec_paramgen_curve:P-256",
      "-nodes",
      "-keyout",
      key,
      "-out",
      cert,
      "-days",
      "2",
      "-subj",
      subject,
      "-addext",
      `subjectAltName=${san}`,
    ],
    { stdio: "ignore" },
  );
  return { cert, key };
}

/** startTlsServer runs `openssl s_server -www` with its own certificate for `host` on ip:port; returns the cert path. */
export async function startTlsServer(n: NsNode, host: string, ip: string, port: number): Promise<string> {
  const { cert, key } = selfSigned(n.stateDir, host, `DNS:${host}`);
  await n.spawner.spawnDetached(
    ["openssl", "s_server", "-accept", `${ip}:${port}`, "-cert", cert, "-key", key, "-www", "-quiet"],
    { logFile: join(n.stateDir, `tls-${port}.log`) },
  );
  if (!(await listening(n, port))) throw new Error(`s_server on ${ip}:${port} did not listen`);
  return cert;
}

/** hasBinary reports whether `bin` is on PATH. */
export function hasBinary(bin: string): boolean {
  try {
    execFileSync("sh", ["-c", `command -v ${bin}`], { stdio: "ignore" });
    return true;
  } catch {
    return false;
  }
}

/** Pebble is a running pebble: its directory URL, the root to trust for its TLS, and its mock DNS management URL. */
export interface Pebble {
  directory: string;
  tlsRoot: string;
  /** addA makes the mock DNS answer `host` with `ip` (the default answer is the edge's public address). */
  addA(host: string, ip: string): Promise<void>;
}

/**
 * startPebble runs pebble-challtestsrv (mock DNS answering every name with `edgeAddress`) and
 * pebble (validating on ports 80/443) in node `n` listening on `ip`.
 */
export async function startPebble(n: NsNode, ip: string, edgeAddress: string): Promise<Pebble> {
  const { cert, key } = selfSigned(n.stateDir, "pebble", `IP:${ip},DNS:pebble`);
  const cfg = join(n.stateDir, "pebble.json");
  writeFileSync(
    cfg,
    JSON.stringify({
      pebble: {
        listenAddress: `${ip}:14000`,
        managementListenAddress: "127.0.0.1:15000",
        certificate: cert,
        privateKey: key,
        httpPort: 80,
        tlsPort: 443,
        ocspResponderURL: "",
        externalAccountBindingRequired: false,
      },
    }),
  );
  await n.spawner.spawnDetached(
    [
      "pebble-challtestsrv",
      "-defaultIPv4",
      edgeAddress,
      "-defaultIPv6",
      "",
      "-dns01",
      `${ip}:8053`,
      "-http01",
      "",
      "-https01",
      "",
      "-tlsalpn01",
      "",
      "-management",
      "127.0.0.1:8055",
    ],
    { logFile: join(n.stateDir, "challtestsrv.log") },
  );
  await n.spawner.spawnDetached(["pebble", "-config", cfg, "-dnsserver", `${ip}:8053`], {
    logFile: join(n.stateDir, "pebble.log"),
    env: { PEBBLE_VA_NOSLEEP: "1", PEBBLE_WFE_NONCEREJECT: "0" },
  });
  if (!(await listening(n, 14000)) || !(await listening(n, 8055))) throw new Error("pebble did not listen");
  return {
    directory: `https://${ip}:14000/dir`,
    tlsRoot: cert,
    addA: async (host, addr) => {
      await n.runner.run([
        "curl",
        "-sS",
        "--max-time",
        "5",
        "-X",
        "POST",
        "-d",
        JSON.stringify({ host, addresses: [addr] }),
        "http://127.0.0.1:8055/add-a",
      ]);
    },
  };
}
