// MicroVM benchmarks in the lab (needs root), one lab for all of them, each VM figure measured
// side by side with the same figure for a container in the same run:
// - apply -> reachable on the fabric: from `capsulectl apply -f` (no --wait) on homeA until a
//   probe container on homeB (policy already allowing it) gets the HTTP answer from the
//   workload's fabric address; fresh names each time, VM (the busybox guest of
//   lab/qemu/guest.ts, busybox httpd) and container (busybox httpd) alternated;
// - memory per idle VM (memoryMib 128, ~10 s after boot): the QEMU process's RSS and PSS on the
//   host against the guest's own view (/proc/meminfo through `workload exec`), with 1 and 3 VMs;
// - TCP throughput through the fabric from the probe on homeB to a VM and to a container on
//   homeA (busybox nc both ends, 32 MiB per transfer, timed by the client): upload (client ->
//   `nc -l` sink, counted with wc) and download (HTTP/1.0 GET of 32 MiB streamed by an httpd CGI).
// The homes sit behind NAT routers; homeA <-> homeB is enrolled directly (the fabric relays
// through the edge when both are behind NAT; `fabric peers` says which, reported below).
import { readFileSync, writeFileSync } from "node:fs";
import { loadavg, tmpdir } from "node:os";
import { join } from "node:path";
import { Lab } from "../lab/lab.js";
import { buildGuest } from "../lab/qemu/guest.js";
import { ctl, rpc, waitFor } from "../test/helpers/fabric.js";
import { buildImageArchive, DEFAULT_APPLETS } from "../test/helpers/images.js";
import { uniquePrefix } from "../test/helpers/lab.js";
import { waitRuntime } from "../test/helpers/workloads.js";
import type { Row } from "./run.js";

const BENCH = "vm";
const GUEST_DIR = process.env.CAPSULE_GUEST_DIR ?? join(tmpdir(), "capsule-guest");
/** REACH_RUNS is how many apply -> reachable runs each kind gets. */
const REACH_RUNS = 4;
/** XFER_MIB is the size of one throughput transfer. */
const XFER_MIB = 32;
/** XFER_RUNS is how many transfers per direction and target (alternating VM and container). */
const XFER_RUNS = 3;
const VM_BODY = "hello from a microvm";
const CT_BODY = "hello from a container";
const VM_MEM_MIB = 128;
/**
 * BIG_CGI streams XFER_MIB MiB of zeros through httpd (CGI): the guest's root is a RAM-backed
 * initramfs too small for a 32 MiB file, so both the VM and the container serve it this way.
 */
const BIG_CGI = `#!/bin/sh\nprintf 'Content-Type: application/octet-stream\\r\\n\\r\\n'\nexec /bin/head -c ${XFER_MIB * 1024 * 1024} /dev/zero\n`;

const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  const n = s.length;
  if (n === 0) return Number.NaN;
  return n % 2 ? (s[(n - 1) / 2] as number) : ((s[n / 2 - 1] as number) + (s[n / 2] as number)) / 2;
};
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
/** uptimeMs is the host's CLOCK_BOOTTIME-ish /proc/uptime in ms: the same clock every lab namespace and container reads. */
const uptimeMs = () => Number(readFileSync("/proc/uptime", "utf8").split(" ")[0]) * 1000;

/** procKb reads one "Key: N kB" field of a /proc file; NaN when absent. */
function procKb(file: string, key: string): number {
  try {
    return Number(
      new RegExp(`^${key}:\\s+(\\d+) kB`, "m").exec(readFileSync(file, "utf8"))?.[1] ?? Number.NaN,
    );
  } catch {
    return Number.NaN;
  }
}

/**
 * qemuSplit splits a QEMU process's resident memory (kB) by mapping, from /proc/PID/smaps: the
 * guest RAM (the anonymous mapping of exactly `ramMib`), the TCG translation cache (the largest
 * other anonymous mapping, when at least 256 MiB: QEMU reserves 1 GiB and touches what it uses;
 * 0 under KVM) and everything else (QEMU's heap, binary, libraries, the mapped initrd).
 */
function qemuSplit(pid: number, ramMib: number): { ram: number; tcg: number; other: number } {
  const maps: { size: number; rss: number; name: string }[] = [];
  try {
    for (const line of readFileSync(`/proc/${pid}/smaps`, "utf8").split("\n")) {
      const head = /^[0-9a-f]+-[0-9a-f]+ \S+ \S+ \S+ \S+\s*(.*)$/.exec(line);
      if (head) maps.push({ size: 0, rss: 0, name: head[1] ?? "" });
      const kv = /^(Size|Rss):\s+(\d+) kB/.exec(line);
      const m = maps[maps.length - 1];
      if (kv && m) m[kv[1] === "Size" ? "size" : "rss"] = Number(kv[2]);
    }
  } catch {
    return { ram: Number.NaN, tcg: Number.NaN, other: Number.NaN };
  }
  const anon = maps.filter((m) => m.name === "");
  const ram = anon.find((m) => m.size === ramMib * 1024);
  const tcg = anon.filter((m) => m !== ram && m.size >= 256 * 1024).sort((a, b) => b.size - a.size)[0];
  const total = maps.reduce((n, m) => n + m.rss, 0);
  return { ram: ram?.rss ?? 0, tcg: tcg?.rss ?? 0, other: total - (ram?.rss ?? 0) - (tcg?.rss ?? 0) };
}

interface View {
  phase: string;
  address: string;
  pid: number;
  kind: string;
}

export async function run(): Promise<Row[]> {
  if (process.getuid?.() !== 0)
    return [{ bench: BENCH, metric: "skipped", value: "requires superuser privileges" }];
  const lab = new Lab({ prefix: `clvm${uniquePrefix().slice(2)}` });
  const rows: Row[] = [];
  const row = (metric: string, value: string, target?: string, ok?: boolean) => {
    rows.push({ bench: BENCH, metric, value, ...(target ? { target, ok } : {}) });
  };
  try {
    const load0 = loadavg()[0] ?? 0;
    const guest = await buildGuest(GUEST_DIR, { files: { "www/cgi-bin/big": BIG_CGI } });
    await lab.up();
    const work = lab.plan.labDir;
    await ctl(lab, ["fabric", "enroll", "edge", "homeA"]);
    await ctl(lab, ["fabric", "enroll", "edge", "homeB"]);
    // "homeA: enrolled homeB (direct | relayed via X)".
    const enrolled = await ctl(lab, ["fabric", "enroll", "homeA", "homeB"]);
    const path = /\((direct|relayed via [^)]+)\)/.exec(enrolled)?.[1] ?? `unknown (${enrolled.trim()})`;
    for (const c of ["homeA", "homeB"])
      if ((await waitRuntime(lab, c)) < 0) throw new Error(`${c}: runtime not ready`);
    const info = await ctl(lab, ["--capsule", "homeA", "capsule", "info", "-o", "json"]);
    const accel = /"vmAccel":\s*"(\w+)"/.exec(info)?.[1] ?? "unknown";

    const write = (name: string, docs: object[]) => {
      const f = join(work, name);
      writeFileSync(f, docs.map((d) => JSON.stringify(d)).join("\n---\n"));
      return f;
    };
    const applets = [...DEFAULT_APPLETS, "dd", "head", "wc", "chmod"];
    const probeImg = await buildImageArchive(work, { name: "bench/probe:1", applets });
    await ctl(lab, ["--capsule", "homeB", "image", "push", probeImg.archive]);
    const webImg = await buildImageArchive(work, {
      name: "bench/web:1",
      applets,
      files: { "www/index.html": `${CT_BODY}\n`, "www/cgi-bin/big": BIG_CGI },
    });
    await ctl(lab, ["--capsule", "homeA", "image", "push", webImg.archive]);
    await ctl(lab, [
      "--capsule",
      "homeB",
      "apply",
      "-f",
      write("probe.json", [
        {
          kind: "Workload",
          name: "probe",
          labels: { app: "probe" },
          container: { image: "bench/probe:1", command: ["sleep", "100000"] },
        },
      ]),
      "--wait",
    ]);
    await ctl(lab, [
      "--capsule",
      "homeA",
      "policy",
      "apply",
      "-f",
      write("policy.json", [
        {
          kind: "Policy",
          name: "probe-to-targets",
          allow: [
            {
              from: { workload: "probe" },
              to: { labels: { bench: "target" } },
              ports: ["8080/tcp", "5001-5099/tcp"],
            },
          ],
        },
      ]),
    ]);
    const vmDoc = (name: string) => ({
      kind: "Workload",
      name,
      labels: { bench: "target" },
      microvm: { kernel: guest.kernel, initrd: guest.initrd, cpus: 1, memoryMib: VM_MEM_MIB },
      ports: [{ port: 8080 }],
    });
    const ctDoc = (name: string) => ({
      kind: "Workload",
      name,
      labels: { bench: "target" },
      ports: [{ port: 8080 }],
      container: { image: "bench/web:1", command: ["httpd", "-f", "-p", "8080", "-h", "/www"] },
    });
    const get = (name: string) => rpc<View>(lab, "homeA", "Workloads/Get", { name });
    /** probe runs a shell script in the probe container on homeB. */
    const probe = async (script: string, timeoutMs = 120_000) => {
      const r = await lab.capsulectl(
        [
          "--capsule",
          "homeB",
          "workload",
          "exec",
          "--exec-timeout",
          `${Math.round(timeoutMs / 1000)}s`,
          "probe",
          "--",
          "sh",
          "-c",
          script,
        ],
        { timeoutMs: timeoutMs + 30_000 },
      );
      if (r.exitCode !== 0)
        throw new Error(`probe: exit ${r.exitCode}: ${r.stderr.trim()} ${r.stdout.trim()}`);
      return r.stdout;
    };
    const onA = (name: string, script: string) =>
      ctl(lab, ["--capsule", "homeA", "workload", "exec", name, "--", "sh", "-c", script]);

    // 1. apply -> reachable from homeB, VM and container alternated, fresh names.
    const reach = { vm: [] as number[], ct: [] as number[] };
    for (let i = 1; i <= REACH_RUNS; i++) {
      for (const kind of ["ct", "vm"] as const) {
        const name = `${kind}r${i}`;
        const body = kind === "vm" ? VM_BODY : CT_BODY;
        const t0 = uptimeMs();
        await ctl(lab, [
          "--capsule",
          "homeA",
          "apply",
          "-f",
          write(`${name}.json`, [kind === "vm" ? vmDoc(name) : ctDoc(name)]),
        ]);
        const { address } = await get(name);
        // The loop runs in the probe and prints the host's uptime at the first answer (no exec
        // start-up or CLI in the figure; the clock is the same in every namespace).
        const out = await probe(
          `i=0; while [ $i -lt 2400 ]; do r=$(echo -e "GET / HTTP/1.0\\r\\n\\r\\n" | nc -w 1 ${address} 8080 2>/dev/null); case "$r" in *"${body}"*) cat /proc/uptime; exit 0;; esac; i=$((i+1)); sleep 0.05; done; exit 1`,
          180_000,
        );
        const t1 = Number(out.trim().split(" ")[0]) * 1000;
        reach[kind].push(t1 - t0);
        process.stdout.write(`  ${name}: reachable after ${(t1 - t0).toFixed(0)} ms\n`);
        await ctl(lab, ["--capsule", "homeA", "workload", "delete", name]);
      }
    }
    const fmt = (xs: number[]) =>
      `${median(xs).toFixed(0)} / ${Math.max(...xs).toFixed(0)} ms (${xs.map((x) => x.toFixed(0)).join(", ")})`;
    row(
      `VM apply -> HTTP answer on the fabric from a container on homeB, median / max of ${REACH_RUNS} (capsulectl apply without --wait; QEMU ${accel}, guest boot included)`,
      fmt(reach.vm),
    );
    row(
      "container apply -> HTTP answer on the fabric, same path, median / max (both: polled from inside the probe with nc -w 1 every 50 ms, so a SYN sent before the route or policy was in place costs up to 1 s)",
      fmt(reach.ct),
    );
    row(
      "apply -> reachable ratio VM / container (medians)",
      (median(reach.vm) / median(reach.ct)).toFixed(1),
    );

    // 2. Memory per idle VM: 1 VM, then 3.
    const memVm = async (name: string) => {
      const v = await get(name);
      const meminfo = await onA(name, "cat /proc/meminfo");
      const g = (k: string) =>
        Number(new RegExp(`^${k}:\\s+(\\d+) kB`, "m").exec(meminfo)?.[1] ?? Number.NaN);
      return {
        rss: procKb(`/proc/${v.pid}/status`, "VmRSS"),
        pss: procKb(`/proc/${v.pid}/smaps_rollup`, "Pss"),
        split: qemuSplit(v.pid, VM_MEM_MIB),
        total: g("MemTotal"),
        used: g("MemTotal") - g("MemAvailable"),
      };
    };
    const booted = async (name: string) => {
      const ms = await waitFor(
        async () =>
          (await ctl(lab, ["--capsule", "homeA", "workload", "logs", name])).includes("CAPSULE-GUEST-READY"),
        180_000,
        500,
      );
      if (ms < 0) throw new Error(`${name}: the guest did not print its ready marker within 180 s`);
    };
    const mib = (kb: number) => (kb / 1024).toFixed(1);
    const memRow = (label: string, ms: Awaited<ReturnType<typeof memVm>>[]) => {
      const per = ms
        .map(
          (m) =>
            `RSS ${mib(m.rss)} (guest RAM ${mib(m.split.ram)}, TCG cache ${mib(m.split.tcg)}, other ${mib(m.split.other)}), PSS ${mib(m.pss)}, guest used ${mib(m.used)} of ${mib(m.total)}`,
        )
        .join("; ");
      const rss = median(ms.map((m) => m.rss));
      const used = median(ms.map((m) => m.used));
      row(
        `idle VM memory (memoryMib ${VM_MEM_MIB}, 1 vCPU, ~10 s after boot), ${label}: QEMU RSS (split by mapping, from smaps) and PSS on the host vs the guest's MemTotal-MemAvailable, MiB`,
        `${per}`,
      );
      row(
        `${label}: host RSS minus guest used (QEMU + touched-but-free guest pages), median per VM`,
        `${mib(rss - used)} MiB`,
      );
    };
    const mems = ["mem1", "mem2", "mem3"];
    await ctl(lab, ["--capsule", "homeA", "apply", "-f", write("mem1.json", [vmDoc("mem1")]), "--wait"]);
    await booted("mem1");
    await sleep(10_000);
    memRow("1 VM", [await memVm("mem1")]);
    await ctl(lab, [
      "--capsule",
      "homeA",
      "apply",
      "-f",
      write("mem23.json", [vmDoc("mem2"), vmDoc("mem3")]),
      "--wait",
    ]);
    await booted("mem2");
    await booted("mem3");
    await sleep(10_000);
    const three: Awaited<ReturnType<typeof memVm>>[] = [];
    for (const n of mems) three.push(await memVm(n));
    memRow("3 VMs", three);
    for (const n of ["mem2", "mem3"]) await ctl(lab, ["--capsule", "homeA", "workload", "delete", n]);

    // 3. Throughput through the fabric: probe (homeB) -> mem1 (VM) and -> a container on homeA.
    await ctl(lab, ["--capsule", "homeA", "apply", "-f", write("xct.json", [ctDoc("xct")]), "--wait"]);
    const bytes = XFER_MIB * 1024 * 1024;
    await onA("xct", "chmod 755 /www/cgi-bin/big");
    const targets = { vm: (await get("mem1")).address, ct: (await get("xct")).address };
    let port = 5001;
    /** upload pushes XFER_MIB MiB from the probe into a fresh `nc -l` sink in `name`; returns MB/s. */
    const upload = async (name: string, addr: string) => {
      const p = port++;
      // The sink's stdin is a pipe kept open (an EOF there would half-close and end the client early).
      await onA(
        name,
        `(sleep 300 </dev/null 2>/dev/null | nc -l -p ${p} 2>/dev/null | wc -c > /tmp/got.${p}) </dev/null >/dev/null 2>&1 &`,
      );
      const out = await probe(
        `i=0; while [ $i -lt 50 ]; do read a x < /proc/uptime; dd if=/dev/zero bs=1M count=${XFER_MIB} 2>/dev/null | nc ${addr} ${p} && { read b x < /proc/uptime; echo "$a $b"; exit 0; }; i=$((i+1)); sleep 0.2; done; exit 1`,
      );
      const [a, b] = out.trim().split(" ").map(Number) as [number, number];
      const got = Number((await onA(name, `cat /tmp/got.${p}`)).trim());
      if (got !== bytes) throw new Error(`upload to ${name}: the sink counted ${got} bytes, not ${bytes}`);
      return bytes / 1e6 / (b - a);
    };
    /** download GETs /cgi-bin/big from `addr`'s httpd into the probe; returns MB/s. */
    const download = async (addr: string) => {
      const out = await probe(
        `read a x < /proc/uptime; n=$(echo -e "GET /cgi-bin/big HTTP/1.0\\r\\n\\r\\n" | nc ${addr} 8080 | wc -c); read b x < /proc/uptime; echo "$n $a $b"`,
      );
      const [n, a, b] = out.trim().split(" ").map(Number) as [number, number, number];
      if (!(n >= bytes)) throw new Error(`download from ${addr}: ${n} bytes, not ${bytes} + headers`);
      return bytes / 1e6 / (b - a);
    };
    const up = { vm: [] as number[], ct: [] as number[] };
    const down = { vm: [] as number[], ct: [] as number[] };
    await download(targets.vm); // warm-up
    await download(targets.ct);
    for (let i = 0; i < XFER_RUNS; i++) {
      up.vm.push(await upload("mem1", targets.vm));
      up.ct.push(await upload("xct", targets.ct));
      down.vm.push(await download(targets.vm));
      down.ct.push(await download(targets.ct));
    }
    const rate = (xs: number[]) =>
      `${median(xs).toFixed(1)} MB/s (${xs.map((x) => x.toFixed(1)).join(", ")})`;
    const how = `${XFER_MIB} MiB, busybox nc, median of ${XFER_RUNS}, alternating; fabric homeB -> homeA ${path}, userspace wireguard-go`;
    row(
      `upload probe (homeB) -> VM on homeA: dd piped to nc, sink nc -l piped to wc -c (${how})`,
      rate(up.vm),
    );
    row("upload probe (homeB) -> container on homeA, same method", rate(up.ct));
    row("upload ratio VM / container", (median(up.vm) / median(up.ct)).toFixed(3));
    row(
      `download VM httpd -> probe: HTTP/1.0 GET of ${XFER_MIB} MiB streamed by a CGI (head -c), nc piped to wc -c (same settings)`,
      rate(down.vm),
    );
    row("download container httpd -> probe, same method", rate(down.ct));
    row("download ratio VM / container", (median(down.vm) / median(down.ct)).toFixed(3));
    row(
      "machine / conditions",
      `QEMU accelerator ${accel}${accel === "tcg" ? " (no usable KVM: every guest instruction is emulated)" : ""}; host load average (1 min) at the start / end ${load0.toFixed(2)} / ${(loadavg()[0] ?? 0).toFixed(2)} (other jobs share the 2 cores); fabric homeB -> homeA ${path}`,
    );
    return rows;
  } finally {
    await lab.down();
  }
}
