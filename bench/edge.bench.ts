// Edge benchmarks in the lab (needs root), one lab for all of them:
// - throughput and p99 latency (wrk, HTTP/1.1 over TLS) from the internet client through the edge
//   (HAProxy SNI -> Caddy TLS -> HAProxy router -> fabric -> busybox httpd on homeB) vs a throwaway Caddy proxying
//   to the same workload on homeB itself (wrk in homeB), alternated in one run;
// - `capsulectl expose` -> first HTTPS 200 at the client, ACME issuance from the lab CA included;
// - failed requests under wrk load while the operator makes 50 route changes on other hosts.
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { loadavg, tmpdir } from "node:os";
import { join } from "node:path";
import { labCaRoot } from "../lab/ca.js";
import { Lab } from "../lab/lab.js";
import { ctl, rpc, waitFor } from "../test/helpers/fabric.js";
import { buildImageArchive } from "../test/helpers/images.js";
import { uniquePrefix } from "../test/helpers/lab.js";
import { waitRuntime } from "../test/helpers/workloads.js";
import type { Row } from "./run.js";

const BENCH = "edge";
const SHARED = "2 cores shared by wrk, Caddy, HAProxy, wireguard-go and httpd";
const WRK_SECONDS = 10;
const BASELINE_PORT = 9443;

const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)] ?? Number.NaN;
};
/** mid is the median, averaging the two middle values of an even count. */
const mid = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  const n = s.length;
  if (n === 0) return Number.NaN;
  return n % 2 ? (s[(n - 1) / 2] as number) : ((s[n / 2 - 1] as number) + (s[n / 2] as number)) / 2;
};
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** WrkResult is what wrk printed. */
interface WrkResult {
  requests: number;
  rps: number;
  p99Ms: number;
  non2xx: number;
  socket: { connect: number; read: number; write: number; timeout: number };
  raw: string;
  /** overflows is how many SYNs httpd's listen queue dropped during the run (TcpExtListenOverflows in its netns). */
  overflows?: number;
}

/** errs renders a run's failures: non-2xx and socket errors by kind. */
const errs = (r: WrkResult) =>
  `non-2xx ${r.non2xx}, connect ${r.socket.connect}, read ${r.socket.read}, write ${r.socket.write}, timeout ${r.socket.timeout}`;

const toMs = (v: string, unit: string) =>
  Number(v) * (unit === "us" ? 0.001 : unit === "s" ? 1000 : unit === "m" ? 60_000 : 1);

/** parseWrk reads wrk's summary (run with --latency). */
function parseWrk(out: string): WrkResult {
  const rps = /Requests\/sec:\s+([\d.]+)/.exec(out);
  const total = /(\d+) requests in/.exec(out);
  if (!rps || !total) throw new Error(`wrk printed no summary: ${out.slice(0, 400)}`);
  const p99 = /^\s*99%\s+([\d.]+)(us|ms|s|m)\s*$/m.exec(out);
  const sock = /Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)/.exec(out);
  const non = /Non-2xx or 3xx responses: (\d+)/.exec(out);
  return {
    requests: Number(total[1]),
    rps: Number(rps[1]),
    p99Ms: p99 ? toMs(p99[1] as string, p99[2] as string) : Number.NaN,
    non2xx: non ? Number(non[1]) : 0,
    socket: {
      connect: Number(sock?.[1] ?? 0),
      read: Number(sock?.[2] ?? 0),
      write: Number(sock?.[3] ?? 0),
      timeout: Number(sock?.[4] ?? 0),
    },
    raw: out,
  };
}

async function wrk(lab: Lab, node: string, url: string, seconds: number): Promise<WrkResult> {
  const r = await lab.exec(
    node,
    ["wrk", "-t2", "-c8", "--timeout", "10s", `-d${seconds}s`, "--latency", url],
    {
      timeoutMs: (seconds + 30) * 1000,
    },
  );
  if (r.exitCode !== 0)
    throw new Error(`wrk in ${node} -> ${url}: exit ${r.exitCode}: ${r.stderr || r.stdout}`);
  return parseWrk(r.stdout);
}

/** startBaseline starts a throwaway Caddy in a lab capsule's namespace, proxying to one upstream. */
async function startBaseline(lab: Lab, node: string, dir: string, upstream: string): Promise<string> {
  const cfg = {
    admin: { disabled: true, config: { persist: false } },
    storage: { module: "file_system", root: join(dir, "storage") },
    apps: {
      http: {
        servers: {
          bench: {
            listen: [`:${BASELINE_PORT}`],
            routes: [
              {
                match: [{ host: ["localhost"] }],
                handle: [{ handler: "reverse_proxy", upstreams: [{ dial: upstream }] }],
                terminal: true,
              },
            ],
            automatic_https: { disable_redirects: true },
          },
        },
      },
      tls: { automation: { policies: [{ subjects: ["localhost"], issuers: [{ module: "internal" }] }] } },
      pki: { certificate_authorities: { local: { install_trust: false } } },
    },
  };
  const cfgFile = join(dir, "caddy.json");
  const pidFile = join(dir, "caddy.pid");
  writeFileSync(cfgFile, JSON.stringify(cfg));
  const r = await lab.exec(node, [
    "setsid",
    "-f",
    "sh",
    "-c",
    'echo $$ > "$1"; exec >"$2" 2>&1 </dev/null; HOME="$3" XDG_DATA_HOME="$3" XDG_CONFIG_HOME="$3" exec caddy run --config "$4"',
    "caddy-baseline",
    pidFile,
    join(dir, "caddy.log"),
    dir,
    cfgFile,
  ]);
  if (r.exitCode !== 0) throw new Error(`starting the baseline Caddy in ${node}: ${r.stderr}`);
  const url = `https://localhost:${BASELINE_PORT}/`;
  const ms = await waitFor(
    async () =>
      (
        await lab.exec(node, ["curl", "-sk", "--max-time", "2", "-o", "/dev/null", "-w", "%{http_code}", url])
      ).stdout.trim() === "200",
    20_000,
    200,
  );
  if (ms < 0) {
    let log = "";
    try {
      log = readFileSync(join(dir, "caddy.log"), "utf8").slice(-600);
    } catch {}
    throw new Error(`baseline Caddy in ${node} did not answer 200 at ${url} within 20 s: ${log}`);
  }
  return url;
}

/** killByPidFile sends `signal` to the process whose pid `file` holds, if any, and removes the file (no second signal to a reused pid). */
function killByPidFile(file: string, signal: NodeJS.Signals): void {
  let pid = 0;
  try {
    pid = Number(readFileSync(file, "utf8").trim());
  } catch {
    return;
  }
  rmSync(file, { force: true });
  if (pid > 0) {
    try {
      process.kill(pid, signal);
    } catch {}
  }
}

export async function run(): Promise<Row[]> {
  if (process.getuid?.() !== 0)
    return [{ bench: BENCH, metric: "skipped", value: "requires superuser privileges" }];
  const lab = new Lab({ prefix: uniquePrefix() });
  const work = mkdtempSync(join(tmpdir(), "capsule-edgebench-"));
  const caddyDir = mkdtempSync(join(tmpdir(), "capsule-edgebench-caddy-"));
  const rows: Row[] = [];
  const wrkPid = join(work, "wrk.pid");
  try {
    const load0 = loadavg()[0] ?? 0;
    await lab.up();
    const caRoot = labCaRoot(lab.plan.labDir);
    await ctl(lab, ["fabric", "enroll", "edge", "homeA"]);
    await ctl(lab, ["fabric", "enroll", "edge", "homeB"]);
    const curlCode = async (url: string) =>
      Number(
        (
          await lab.exec(
            "client",
            [
              "curl",
              "-s",
              "--max-time",
              "2",
              "--cacert",
              caRoot,
              "-o",
              "/dev/null",
              "-w",
              "%{http_code}",
              url,
            ],
            { timeoutMs: 10_000 },
          )
        ).stdout.trim(),
      );

    // Workloads: web on homeB (exposed, measured), blog on homeA (target of the route changes).
    for (const [c, who, name] of [
      ["homeB", "homeB", "web"],
      ["homeA", "homeA", "blog"],
    ] as const) {
      if ((await waitRuntime(lab, c)) < 0) throw new Error(`${c}: runtime not ready`);
      const img = await buildImageArchive(work, {
        name: `bench/${who.toLowerCase()}:1`,
        files: { "www/index.html": `hello from ${who}\n` },
      });
      await ctl(lab, ["--capsule", c, "image", "push", img.archive]);
      const f = join(work, `${c}.json`);
      writeFileSync(
        f,
        JSON.stringify({
          kind: "Workload",
          name,
          container: {
            image: `bench/${who.toLowerCase()}:1`,
            command: ["httpd", "-f", "-p", "8080", "-h", "/www"],
          },
        }),
      );
      await ctl(lab, ["--capsule", c, "apply", "-f", f, "--wait"]);
    }
    const webAddr = (await rpc<{ address: string }>(lab, "homeB", "Workloads/Get", { name: "web" })).address;
    const expose = (capsule: string, workload: string, host: string) =>
      ctl(lab, [
        "--capsule",
        capsule,
        "expose",
        workload,
        "--edge",
        "edge",
        "--host",
        host,
        "--port",
        "8080",
      ]);
    const unexpose = (capsule: string, workload: string, host: string) =>
      ctl(lab, ["--capsule", capsule, "unexpose", workload, "--edge", "edge", "--host", host]);

    await expose("homeB", "web", "web.capsule.test");
    if ((await waitFor(async () => (await curlCode("https://web.capsule.test/")) === 200, 30_000, 100)) < 0)
      throw new Error("web.capsule.test never answered 200 through the edge");

    // 2. expose -> first 200 over HTTPS, ACME included, with fresh names.
    const exposeMs: number[] = [];
    for (let i = 1; i <= 5; i++) {
      const host = `b${i}.capsule.test`;
      const t0 = performance.now();
      await expose("homeB", "web", host);
      let ms = -1;
      while (performance.now() - t0 < 30_000) {
        if ((await curlCode(`https://${host}/`)) === 200) {
          ms = performance.now() - t0;
          break;
        }
        await sleep(50);
      }
      if (ms < 0) throw new Error(`${host}: no HTTPS 200 within 30 s of expose`);
      exposeMs.push(ms);
    }
    for (let i = 1; i <= 5; i++) await unexpose("homeB", "web", `b${i}.capsule.test`);
    const exposeMax = Math.max(...exposeMs);
    rows.push({
      bench: BENCH,
      metric: "expose -> first HTTPS 200 at the client (ACME from the lab CA included), median / max of 5",
      value: `${median(exposeMs).toFixed(0)} / ${exposeMax.toFixed(0)} ms (${exposeMs.map((x) => x.toFixed(0)).join(", ")})`,
      target: "max <= 3000 ms",
      ok: exposeMax <= 3000,
    });

    // 1. Throughput and p99: edge path vs a Caddy on homeB proxying to the same workload.
    const baseUrl = await startBaseline(lab, "homeB", caddyDir, `${webAddr}:8080`);
    const edgeUrl = "https://web.capsule.test/";
    // httpd's listen queue overflows (SYNs dropped, retried after 1 s), read in web's netns.
    const overflows = async () => {
      const r = await lab.exec("homeB", [
        "sh",
        "-c",
        'for p in $(pgrep -x httpd); do if nsenter -t "$p" -n ip -o -4 addr | grep -q " $1/"; then nsenter -t "$p" -n nstat -saz TcpExtListenOverflows; exit 0; fi; done; exit 1',
        "overflows",
        webAddr,
      ]);
      const m = /TcpExtListenOverflows\s+(\d+)/.exec(r.stdout);
      return m ? Number(m[1]) : Number.NaN;
    };
    const measured = async (node: string, url: string) => {
      const before = await overflows();
      const r = await wrk(lab, node, url, WRK_SECONDS);
      r.overflows = (await overflows()) - before;
      return r;
    };
    await wrk(lab, "client", edgeUrl, 2); // warm-up
    await wrk(lab, "homeB", baseUrl, 2);
    const edgeRuns: WrkResult[] = [];
    const baseRuns: WrkResult[] = [];
    for (let i = 0; i < 2; i++) {
      edgeRuns.push(await measured("client", edgeUrl));
      baseRuns.push(await measured("homeB", baseUrl));
    }
    killByPidFile(join(caddyDir, "caddy.pid"), "SIGKILL");
    const bad = [...edgeRuns, ...baseRuns].filter(
      (r) => r.non2xx > 0 || Object.values(r.socket).some((n) => n > 0),
    ).length;
    const [eRps, bRps] = [mid(edgeRuns.map((r) => r.rps)), mid(baseRuns.map((r) => r.rps))];
    const [eP99, bP99] = [mid(edgeRuns.map((r) => r.p99Ms)), mid(baseRuns.map((r) => r.p99Ms))];
    const each = (rs: WrkResult[], f: (r: WrkResult) => number, d: number) =>
      rs.map((r) => f(r).toFixed(d)).join(", ");
    rows.push(
      {
        bench: BENCH,
        metric: `HTTPS req/s, client -> edge (HAProxy SNI, Caddy TLS, HAProxy router) -> fabric -> httpd on homeB (wrk -t2 -c8, median of 2 x ${WRK_SECONDS} s, alternating)`,
        value: `${eRps.toFixed(0)} req/s (${each(edgeRuns, (r) => r.rps, 0)})`,
      },
      {
        bench: BENCH,
        metric: "HTTPS req/s, baseline: Caddy on homeB -> same httpd (wrk in homeB, same settings)",
        value: `${bRps.toFixed(0)} req/s (${each(baseRuns, (r) => r.rps, 0)})`,
      },
      {
        bench: BENCH,
        metric: `req/s ratio edge / baseline (${SHARED})`,
        value: (eRps / bRps).toFixed(3),
      },
      {
        bench: BENCH,
        metric: "host load average (1 min) when the bench started / after the throughput runs",
        value: `${load0.toFixed(2)} / ${(loadavg()[0] ?? 0).toFixed(2)}`,
      },
      {
        bench: BENCH,
        metric: "p99 latency through the edge",
        value: `${eP99.toFixed(2)} ms (${each(edgeRuns, (r) => r.p99Ms, 2)})`,
      },
      {
        bench: BENCH,
        metric: "p99 latency, baseline Caddy on homeB",
        value: `${bP99.toFixed(2)} ms (${each(baseRuns, (r) => r.p99Ms, 2)})`,
      },
      {
        bench: BENCH,
        metric: `p99 ratio edge / baseline (${SHARED})`,
        value: (eP99 / bP99).toFixed(3),
      },
      {
        bench: BENCH,
        metric: "wrk runs with errors or non-2xx (throughput runs)",
        value: `${bad} of ${edgeRuns.length + baseRuns.length}; edge: ${edgeRuns.map(errs).join(" / ")}; baseline: ${baseRuns.map(errs).join(" / ")}`,
      },
      {
        bench: BENCH,
        metric: "httpd listen-queue overflows (SYNs dropped, retried after 1 s) per throughput run",
        value: `edge ${edgeRuns.map((r) => r.overflows).join(", ")}; baseline ${baseRuns.map((r) => r.overflows).join(", ")}`,
      },
    );

    // 3. Failed requests while the operator makes 50 route changes on other hosts.
    const load = lab.exec(
      "client",
      [
        "sh",
        "-c",
        'echo $$ > "$1"; exec wrk -t2 -c8 --timeout 10s -d300s --latency "$2"',
        "wrk-load",
        wrkPid,
        edgeUrl,
      ],
      { timeoutMs: 360_000 },
    );
    await waitFor(
      async () => {
        try {
          return Number(readFileSync(wrkPid, "utf8").trim()) > 0;
        } catch {
          return false;
        }
      },
      10_000,
      50,
    );
    await sleep(2_000);
    const ov0 = await overflows();
    const c0 = performance.now();
    for (let i = 1; i <= 25; i++) await expose("homeA", "blog", `r${i}.capsule.test`);
    const c1 = performance.now();
    for (let i = 1; i <= 25; i++) await unexpose("homeA", "blog", `r${i}.capsule.test`);
    const changesMs = performance.now() - c0;
    const [exposeEach, unexposeEach] = [(c1 - c0) / 25, (performance.now() - c1) / 25];
    await sleep(2_000);
    killByPidFile(wrkPid, "SIGINT");
    const lr = await load;
    const w = parseWrk(lr.stdout);
    w.overflows = (await overflows()) - ov0;
    const sockErr = w.socket.connect + w.socket.read + w.socket.write + w.socket.timeout;
    const failures = sockErr + w.non2xx;
    if (failures > 0) process.stdout.write(`  wrk during route changes:\n${w.raw}\n`);
    rows.push(
      {
        bench: BENCH,
        metric:
          "failed requests during 50 route changes on other hosts (25 expose + 25 unexpose on homeA; wrk -t2 -c8 from the client, HTTP/1.1)",
        value: `${failures} of ${w.requests} (non-2xx ${w.non2xx}; socket connect ${w.socket.connect}, read ${w.socket.read}, write ${w.socket.write}, timeout ${w.socket.timeout})`,
        target: "0",
        ok: failures === 0,
      },
      {
        bench: BENCH,
        metric: "50 route changes under load (capsulectl, sequential; CLI process included)",
        value: `${(changesMs / 1000).toFixed(1)} s (${(changesMs / 50).toFixed(0)} ms per change: expose ${exposeEach.toFixed(0)}, unexpose ${unexposeEach.toFixed(0)}); httpd listen overflows ${w.overflows}; load ${w.rps.toFixed(0)} req/s, p99 ${w.p99Ms.toFixed(2)} ms`,
      },
    );
    return rows;
  } finally {
    killByPidFile(join(caddyDir, "caddy.pid"), "SIGKILL");
    killByPidFile(wrkPid, "SIGKILL");
    await lab.down();
    rmSync(work, { recursive: true, force: true });
    rmSync(caddyDir, { recursive: true, force: true });
  }
}
