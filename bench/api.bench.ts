// Authenticated RPC latency on loopback (p50/p99 of Info, each call with a fresh token, as
// capsulectl does) and capsuled's idle resident memory.
import { readFileSync } from "node:fs";
import { probeCertificate, RpcClient } from "../src/api/client.js";
import { generateSigner, mintClaimProof } from "../src/api/token.js";
import { removeDir, startDaemon } from "../test/helpers/capsuled.js";
import type { Row } from "./run.js";

function pct(sorted: number[], p: number): number {
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))] ?? Number.NaN;
}

export async function run(): Promise<Row[]> {
  const d = await startDaemon({ name: "bench" });
  try {
    const { signer } = await generateSigner();
    const probe = await probeCertificate(d.address);
    const c = new RpcClient(
      { address: d.address, certPem: probe.certPem, fingerprint: probe.fingerprint, capsuleId: d.id },
      signer,
    );
    await c.call(
      "Claim",
      {
        operator: { id: signer.kid, name: "bench", publicKeyJwk: JSON.stringify(signer.publicJwk) },
        proof: await mintClaimProof(signer, d.id),
      },
      { token: null },
    );
    for (let i = 0; i < 50; i++) await c.call("Info", {}); // warm up
    const lat: number[] = [];
    for (let i = 0; i < 1000; i++) {
      const t0 = process.hrtime.bigint();
      await c.call("Info", {});
      lat.push(Number(process.hrtime.bigint() - t0) / 1e6);
    }
    c.close();
    lat.sort((a, b) => a - b);
    await new Promise((r) => setTimeout(r, 2000)); // let it settle to idle
    const status = readFileSync(`/proc/${d.proc.pid}/status`, "utf8");
    const rssMb = Number(/VmRSS:\s+(\d+) kB/.exec(status)?.[1] ?? Number.NaN) / 1024;
    return [
      {
        bench: "api",
        metric: "authenticated Info p50 (fresh EdDSA token, TLS 1.3, loopback)",
        value: `${pct(lat, 50).toFixed(2)} ms`,
      },
      { bench: "api", metric: "authenticated Info p99", value: `${pct(lat, 99).toFixed(2)} ms` },
      {
        bench: "api",
        metric: "capsuled idle RSS",
        value: `${rssMb.toFixed(1)} MB`,
        target: "≤ 100 MB",
        ok: rssMb <= 100,
      },
    ];
  } finally {
    await d.kill("SIGTERM");
    removeDir(d.stateDir);
  }
}
