// Fabric benchmarks in the lab (needs root): throughput edge<->homeA over the fabric vs a bare
// wireguard-go tunnel set up by hand between the same namespaces (same implementation, same
// NAT path), measured alternately in one run; `fabric enroll` latency; and the time from a new
// workload address on one capsule until a peer reaches it.
import { Lab } from "../lab/lab.js";
import { ctl, fabricAddress, ping, rpc, waitFor } from "../test/helpers/fabric.js";
import type { Row } from "./run.js";

const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)] ?? Number.NaN;
};

async function iperf(lab: Lab, server: string, client: string, ip: string, seconds: number): Promise<number> {
  // Detach with its output closed, or exec would wait for the server's stdout to close.
  await lab.exec(server, [
    "setsid",
    "-f",
    "sh",
    "-c",
    `exec iperf3 -s -1 -B ${ip} -p 5201 >/dev/null 2>&1 </dev/null`,
  ]);
  await new Promise((r) => setTimeout(r, 300));
  const r = await lab.exec(client, ["iperf3", "-c", ip, "-p", "5201", "-t", String(seconds), "-J"], {
    timeoutMs: (seconds + 15) * 1000,
  });
  if (r.exitCode !== 0) throw new Error(`iperf3 ${client} -> ${ip}: ${r.stderr || r.stdout.slice(0, 300)}`);
  const j = JSON.parse(r.stdout) as { end: { sum_received: { bits_per_second: number } } };
  return j.end.sum_received.bits_per_second / 1e6;
}

async function bareTunnel(lab: Lab): Promise<void> {
  const key = async (node: string) => (await lab.exec(node, ["wg", "genkey"])).stdout.trim();
  const pub = async (node: string, k: string) =>
    (await lab.exec(node, ["wg", "pubkey"], { input: k })).stdout.trim();
  const ek = await key("edge");
  const hk = await key("homeA");
  const [ep, hp] = [await pub("edge", ek), await pub("homeA", hk)];
  for (const [node, k, addr] of [
    ["edge", ek, "100.64.0.1/30"],
    ["homeA", hk, "100.64.0.2/30"],
  ] as const) {
    await lab.exec(node, [
      "sh",
      "-c",
      "WG_PROCESS_FOREGROUND=1 LOG_LEVEL=error setsid -f wireguard-go -f wgbare >/dev/null 2>&1",
    ]);
    await waitFor(async () => (await lab.exec(node, ["wg", "show", "wgbare"])).exitCode === 0, 5000);
    await lab.exec(node, ["sh", "-c", `umask 077; echo ${k} > /run/wgbare.key`]);
    await lab.exec(node, [
      "wg",
      "set",
      "wgbare",
      "private-key",
      "/run/wgbare.key",
      ...(node === "edge" ? ["listen-port", "51999"] : []),
    ]);
    await lab.exec(node, ["ip", "addr", "add", addr, "dev", "wgbare"]);
    await lab.exec(node, ["ip", "link", "set", "wgbare", "up"]);
  }
  await lab.exec("edge", ["wg", "set", "wgbare", "peer", hp, "allowed-ips", "100.64.0.2/32"]);
  await lab.exec("homeA", [
    "wg",
    "set",
    "wgbare",
    "peer",
    ep,
    "allowed-ips",
    "100.64.0.1/32",
    "endpoint",
    "192.0.2.10:51999",
    "persistent-keepalive",
    "25",
  ]);
  if ((await waitFor(() => ping(lab, "homeA", "100.64.0.1"), 10_000, 200)) < 0)
    throw new Error("bare tunnel did not come up");
}

export async function run(): Promise<Row[]> {
  if (process.getuid?.() !== 0)
    return [{ bench: "fabric", metric: "skipped", value: "requires superuser privileges" }];
  const lab = new Lab({ prefix: "clbench" });
  try {
    await lab.up();
    const enrollMs: number[] = [];
    for (let i = 0; i < 5; i++) {
      if (i > 0) await ctl(lab, ["fabric", "unenroll", "edge", "homeA"]);
      const t0 = Date.now();
      await ctl(lab, ["fabric", "enroll", "edge", "homeA"]);
      enrollMs.push(Date.now() - t0);
    }
    const edgeAddr = await fabricAddress(lab, "edge");
    if ((await waitFor(() => ping(lab, "homeA", edgeAddr), 10_000, 200)) < 0)
      throw new Error("fabric did not come up");
    await bareTunnel(lab);

    const fabric: number[] = [];
    const bare: number[] = [];
    for (let i = 0; i < 3; i++) {
      bare.push(await iperf(lab, "edge", "homeA", "100.64.0.1", 4));
      fabric.push(await iperf(lab, "edge", "homeA", edgeAddr, 4));
    }
    const ratio = median(fabric) / median(bare);

    const reach: number[] = [];
    for (let i = 0; i < 7; i++) {
      const w = await rpc<{ address: string }>(lab, "homeA", "Fabric/ReserveAddress", {
        name: `bench${i}`,
        labels: {},
      });
      await lab.exec("homeA", ["ip", "addr", "add", `${w.address}/32`, "dev", "lo"]);
      const ms = await waitFor(() => ping(lab, "edge", w.address), 15_000, 50);
      reach.push(ms);
      await lab.exec("homeA", ["ip", "addr", "del", `${w.address}/32`, "dev", "lo"]);
      await rpc(lab, "homeA", "Fabric/ReleaseAddress", { name: `bench${i}` });
    }
    const reachP50 = median(reach);
    return [
      {
        bench: "fabric",
        metric: "throughput homeA->edge over the fabric (median of 3 × 4 s)",
        value: `${median(fabric).toFixed(0)} Mbit/s`,
      },
      {
        bench: "fabric",
        metric: "throughput homeA->edge, bare wireguard-go by hand (same path)",
        value: `${median(bare).toFixed(0)} Mbit/s`,
      },
      {
        bench: "fabric",
        metric: "fabric / bare WireGuard",
        value: ratio.toFixed(3),
        target: "≥ 0.95",
        ok: ratio >= 0.95,
      },
      {
        bench: "fabric",
        metric: "capsulectl fabric enroll, p50 of 5 (CLI process included)",
        value: `${median(enrollMs)} ms`,
      },
      {
        bench: "fabric",
        metric: "new address on homeA until the edge reaches it, p50 of 7",
        value: `${reachP50} ms`,
        target: "≤ 1000 ms",
        ok: reachP50 >= 0 && reachP50 <= 1000,
      },
    ];
  } finally {
    await lab.down();
  }
}
