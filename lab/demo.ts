#!/usr/bin/env node
/**
 * `npm run demo`: bring the lab up, show it, ask every capsule who it is as the operator, enroll
 * the fabric, and run a workload on each home (a web server on homeA, a client on homeB, from
 * a busybox image built here and pushed to both), publish web at the edge, and run a microVM
 * on homeA. The lab is left running; `npm run lab -- down` removes it.
 */
import { mkdir, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { formatError } from "../src/errors.js";
import { buildImageArchive } from "./images.js";
import { labCaRoot } from "./ca.js";
import { buildGuest } from "./qemu/guest.js";
import { capsulectl, formatStatus, labExec, labStatus, labUp } from "./lab.js";

const say = (s = "") => process.stdout.write(`${s}\n`);

/** DEMO_HOST is the name web is published under (the lab DNS points *.capsule.test at the edge). */
const DEMO_HOST = "web.capsule.test";

async function main(): Promise<void> {
  say(
    "Bringing up the lab: an edge on the internet, two homes behind NAT, a visitor and the operator's laptop.",
  );
  const up = await labUp({}, { log: (l) => say(`  ${l}`) });
  const { plan } = up;
  say(`Lab up in ${(up.elapsedMs / 1000).toFixed(1)} s.`);
  say();
  say("$ npm run lab -- status");
  process.stdout.write(formatStatus(await labStatus({ prefix: plan.prefix, labDir: plan.labDir })));
  say();
  say(`$ ip netns exec ${plan.prefix}-op capsulectl --config-dir ${plan.operatorDir} --all capsule info`);
  const info = await capsulectl(["--all", "capsule", "info"], { prefix: plan.prefix, labDir: plan.labDir });
  process.stdout.write(info.stdout);
  process.stderr.write(info.stderr);
  if (info.exitCode !== 0) process.exitCode = info.exitCode;
  say();
  const sel = { prefix: plan.prefix, labDir: plan.labDir };
  const ctl = async (args: string[]) => {
    say(`$ capsulectl ${args.join(" ")}`);
    const r = await capsulectl(args, sel);
    process.stdout.write(r.stdout);
    process.stderr.write(r.stderr);
    if (r.exitCode !== 0) throw new Error(`capsulectl ${args.join(" ")} failed (exit ${r.exitCode})`);
    say();
  };
  say("Enrolling the WireGuard fabric: each home with the edge, and the two homes with each other");
  say("(both are behind NAT, so their traffic is relayed by the edge; the choice is automatic).");
  await ctl(["fabric", "enroll", "edge", "homeA"]);
  await ctl(["fabric", "enroll", "edge", "homeB"]);
  await ctl(["fabric", "enroll", "homeA", "homeB"]);
  // Let the first handshakes happen so the status shows them.
  const start = Date.now();
  while (Date.now() - start < 5000) {
    const r = await capsulectl(["--capsule", "homeA", "fabric", "status", "-o", "json"], sel);
    const rows = JSON.parse(r.stdout || "{}") as { peers?: { handshakeAgeSeconds: number }[] };
    if ((rows.peers ?? []).every((p) => p.handshakeAgeSeconds >= 0)) break;
    await new Promise((res) => setTimeout(res, 250));
  }
  await ctl(["--all", "fabric", "status"]);
  say("What you are looking at:");
  say(`  - each capsule runs its own capsuled in its own network and mount namespace (private /run);`);
  say(
    `  - the operator (${plan.prefix}-op) reaches each one over a point-to-point 203.0.113.x/30 admin link;`,
  );
  say(
    `  - home capsules sit behind NAT routers (198.51.100.x LANs): the internet (192.0.2.0/24) cannot reach them;`,
  );
  say("  - every capsule has a stable fabric address in 100.64.0.0/10 on its WireGuard interface capsule0");
  say("    (wireguard-go here: this kernel has no WireGuard module); homeA and homeB talk through the edge.");
  say();

  say("Running a workload on each home. The image is a tiny busybox one built here (no registry):");
  // The workload runtime (containerd) comes up after the fabric: wait for each image store.
  for (const c of ["homeA", "homeB"]) {
    const until = Date.now() + 60_000;
    while ((await capsulectl(["--capsule", c, "image", "list"], sel)).exitCode !== 0) {
      if (Date.now() > until) throw new Error(`${c}: the workload runtime did not come up within 60 s`);
      await new Promise((res) => setTimeout(res, 500));
    }
  }
  const imgDir = join(plan.labDir, "images");
  await mkdir(imgDir, { recursive: true });
  const img = await buildImageArchive(imgDir, {
    name: "demo/httpd:1",
    files: { "www/index.html": "hello from web on homeA\n" },
  });
  await ctl(["--capsule", "homeA", "image", "push", img.archive]);
  await ctl(["--capsule", "homeB", "image", "push", img.archive]);
  const manifests = join(plan.repoDir, "lab", "demo");
  await ctl(["--capsule", "homeA", "apply", "-f", join(manifests, "web.yaml"), "--wait"]);
  await ctl(["--capsule", "homeB", "apply", "-f", join(manifests, "client.yaml"), "--wait"]);
  await ctl(["--all", "workload", "list"]);
  const web = JSON.parse(
    (await capsulectl(["--capsule", "homeA", "workload", "get", "web", "-o", "json"], sel)).stdout,
  ) as {
    address: string;
  };

  // Workload fabric addresses are default-deny: allow client -> web, and show why.
  const policyFile = join(manifests, "policy.yaml");
  for (const args of [
    ["--all", "policy", "apply", "-f", policyFile],
    ["--capsule", "homeA", "policy", "explain", "client", "web", "8080/tcp"],
    ["--capsule", "homeB", "policy", "explain", "web", "client", "8080/tcp"],
    ["--capsule", "homeA", "policy", "show"],
  ]) {
    say(`$ capsulectl ${args.join(" ")}`);
    const r = await capsulectl(args, sel);
    process.stdout.write(r.stdout);
    if (r.exitCode !== 0) throw new Error(`capsulectl ${args.join(" ")}: ${r.stderr.trim()}`);
    say();
  }

  const url = `http://${web.address}:8080/`;
  // Bounded by --exec-timeout, not wget's -T (which crashes busybox 1.35's static wget).
  const args = [
    "--capsule",
    "homeB",
    "workload",
    "exec",
    "--exec-timeout",
    "10s",
    "client",
    "--",
    "wget",
    "-qO-",
    url,
  ];
  say(`$ capsulectl ${args.join(" ")}`);
  const got = await capsulectl(args, sel);
  if (got.exitCode === 0) process.stdout.write(got.stdout);
  else say(`(no answer: exit ${got.exitCode}${got.stderr.trim() ? `, ${got.stderr.trim()}` : ""})`);
  say();
  // Publish web (on homeA, behind NAT, no port forward) at the edge: HTTPS with a certificate
  // from the lab's ACME CA, visitors resolving the name through the lab's DNS.
  say("Publishing web at the edge: homeA is behind NAT with no port forward; the edge terminates");
  say("HTTPS with a certificate from the lab's ACME CA and proxies over the fabric to web's address.");
  await ctl(["--capsule", "homeA", "expose", "web", "--edge", "edge", "--host", DEMO_HOST, "--port", "8080"]);
  const caRoot = labCaRoot(plan.labDir);
  const curlArgs = ["curl", "-sS", "--max-time", "5", "--cacert", caRoot, `https://${DEMO_HOST}/`];
  let served = "";
  const until = Date.now() + 30_000;
  while (Date.now() < until) {
    const r = await labExec("client", curlArgs, { prefix: plan.prefix, labDir: plan.labDir });
    if (r.exitCode === 0) {
      served = r.stdout;
      break;
    }
    await new Promise((res) => setTimeout(res, 250));
  }
  await ctl(["--capsule", "edge", "edge", "list"]);
  say(`$ npm run lab -- exec client -- ${curlArgs.join(" ")}`);
  if (served) process.stdout.write(served);
  else {
    say("(no answer within 30 s: see `npm run lab -- ctl -- --capsule edge edge list -o wide`)");
    process.exitCode = 1;
  }
  say();
  await demoMicroVm(plan.labDir, ctl, async (args) => capsulectl(args, sel));
  say("From the lab's internet client (the visitor), this works:");
  say(`  npm run lab -- exec client -- ${curlArgs.join(" ")}`);
  say();
  say("Try it:");
  say("  npm run lab -- ctl -- --capsule homeA capsule info       # capsulectl as the operator");
  say("  npm run lab -- exec homeA -- ip addr                      # a shell command inside a capsule");
  say("  npm run lab -- exec homeA -- wg show capsule0              # the WireGuard view");
  say("  npm run lab -- ctl -- --all fabric peers -o wide");
  say("  npm run lab -- exec client -- bash                        # be the visitor on the internet");
  say(`  ip netns exec ${plan.prefix}-op npx capsulectl --config-dir ${plan.operatorDir} \\`);
  say("      --capsule homeA workload exec -ti web -- sh              # a shell in the web workload");
  say("  npm run lab -- ctl -- --capsule homeA workload exec vm -- cat /proc/cpuinfo   # inside the microVM");
  say(
    "  npm run lab -- ctl -- --capsule homeA workload logs vm                          # its serial console",
  );
  say(`  less ${plan.capsules[0]?.logFile ?? `${plan.labDir}/<capsule>/capsuled.log`}`);
  say();
  say("The lab keeps running. Tear it down with: npm run lab -- down");
}

/**
 * demoMicroVm runs a microVM on homeA: the tiny guest of lab/qemu/guest.ts (Debian's kernel and
 * a busybox initramfs with httpd and qemu-ga) under QEMU, on the fabric like any workload. The
 * client on homeB reaches it under the demo policy; exec goes through the guest agent and the
 * logs are its serial console.
 */
async function demoMicroVm(
  labDir: string,
  ctl: (args: string[]) => Promise<void>,
  run: (args: string[]) => Promise<{ exitCode: number; stdout: string; stderr: string }>,
): Promise<void> {
  say("Running a microVM on homeA: Debian's kernel and a busybox initramfs (httpd, qemu-guest-agent)");
  say("under QEMU (TCG here: this machine's /dev/kvm cannot run guests), on the fabric like any workload.");
  const guest = await buildGuest(process.env.CAPSULE_GUEST_DIR ?? join(tmpdir(), "capsule-guest"));
  const file = join(labDir, "vm.yaml");
  await writeFile(
    file,
    [
      "kind: Workload",
      "name: vm",
      "labels: { app: vm }",
      "microvm:",
      `  kernel: ${guest.kernel}`,
      `  initrd: ${guest.initrd}`,
      "  cpus: 1",
      "  memoryMib: 128",
      "ports:",
      "  - port: 8080",
      "",
    ].join("\n"),
  );
  await ctl(["--capsule", "homeA", "apply", "-f", file, "--wait"]);
  const vm = JSON.parse(
    (await run(["--capsule", "homeA", "workload", "get", "vm", "-o", "json"])).stdout,
  ) as {
    address: string;
  };
  // busybox nc, bounded by -w (busybox wget's -T crashes).
  const get = `echo -e "GET / HTTP/1.0\\r\\n\\r\\n" | nc -w 3 ${vm.address} 8080`;
  const args = ["--capsule", "homeB", "workload", "exec", "client", "--", "sh", "-c", get];
  let body = "";
  const until = Date.now() + 90_000;
  while (Date.now() < until && !body) {
    const r = await run(args);
    body = r.exitCode === 0 ? (r.stdout.split(/\r?\n\r?\n/)[1] ?? "").trim() : "";
    if (!body) await new Promise((res) => setTimeout(res, 500));
  }
  say(`$ capsulectl ${args.slice(0, -1).join(" ")} '${get}'`);
  say(body || "(no answer within 90 s: see capsulectl --capsule homeA workload logs vm)");
  say();
  await ctl(["--capsule", "homeA", "workload", "exec", "vm", "--", "uname", "-sr"]);
  await ctl(["--capsule", "homeA", "workload", "list", "-o", "wide"]);
  if (!body) process.exitCode = 1;
}

main().catch((e: unknown) => {
  process.stderr.write(`${formatError(e)}\n`);
  process.exitCode = 1;
});
