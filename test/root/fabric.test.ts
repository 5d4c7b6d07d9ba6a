// The fabric in the lab, with real packets: an edge with a public address and two homes behind
// NAT. Every pair reaches the other's fabric address; the homes talk through the edge; forged
// sources are dropped; unenroll cuts exactly one pair; capsuled SIGKILL keeps the tunnels.
import { readFileSync } from "node:fs";
import { join } from "node:path";
import Database from "better-sqlite3";
import t from "tap";
import { ctl, fabricAddress, ping, rpc, waitFor } from "../helpers/fabric.js";
import { isRoot, killCapsuled, ROOT_SKIP, startServer, tcpRequest, withLab } from "../helpers/lab.js";

if (!isRoot()) {
  t.plan(0, ROOT_SKIP);
} else {
  t.test("fabric across NAT, relays, forged sources, unenroll, restart", async (t) => {
    const lab = await withLab(t);
    const addr: Record<string, string> = {};
    for (const c of ["edge", "homeA", "homeB"]) addr[c] = await fabricAddress(lab, c);

    // A pool collision is refused at enroll, with the way out (repool) that then works.
    const homeBDir = join(lab.capsule("homeB").stateDir);
    const homeAPool = (await rpc<{ pool: number }>(lab, "homeA", "Fabric/Self")).pool;
    await killCapsuled(lab, "homeB");
    const db = new Database(join(homeBDir, "state.db"));
    db.prepare("UPDATE meta SET value = ? WHERE key = 'fabric_pool'").run(String(homeAPool));
    db.close();
    await lab.up(); // restarts the killed capsuled
    const clash = await lab.capsulectl(["fabric", "enroll", "homeA", "homeB"]);
    t.equal(clash.exitCode, 1, "pool collision refused");
    t.match(clash.stderr, /claimed by both/);
    t.match(clash.stderr, /repool/);
    await ctl(lab, ["--capsule", "homeB", "fabric", "repool"]);
    addr["homeB"] = await fabricAddress(lab, "homeB");
    t.not(addr["homeB"], addr["homeA"]);

    await ctl(lab, ["fabric", "enroll", "edge", "homeA"]);
    await ctl(lab, ["fabric", "enroll", "edge", "homeB"]);
    const relayed = await ctl(lab, ["fabric", "enroll", "homeA", "homeB"]);
    t.match(relayed, /relayed via edge/);
    t.match(
      await ctl(lab, ["fabric", "enroll", "homeA", "homeB"]),
      /already enrolled/,
      "enroll again is harmless",
    );

    // Every pair, both ways, ICMP and TCP.
    for (const c of ["edge", "homeA", "homeB"]) await startServer(lab, c, addr[c]!, 7000, `hi from ${c}`);
    for (const from of ["edge", "homeA", "homeB"]) {
      for (const to of ["edge", "homeA", "homeB"]) {
        if (from === to) continue;
        const ms = await waitFor(() => ping(lab, from, addr[to]!), 10_000, 200);
        t.ok(ms >= 0, `ICMP ${from} -> ${to}`);
        const r = await tcpRequest(lab, from, addr[to]!, 7000);
        t.equal(r.reply, `hi from ${to}`, `TCP ${from} -> ${to}`);
      }
    }

    const st = JSON.parse(await ctl(lab, ["--capsule", "homeA", "fabric", "status", "-o", "json"]));
    const peers = (Array.isArray(st) ? st[0] : st).peers as {
      name: string;
      relayVia: string;
      handshakeAgeSeconds: number;
    }[];
    t.equal(peers.find((p) => p.name === "homeB")?.relayVia, "edge", "status says relayed via edge");
    t.ok((peers.find((p) => p.name === "edge")?.handshakeAgeSeconds ?? -1) >= 0, "handshake with the edge");

    // A forged source from a peer is dropped by the receiver's cryptokey routing.
    const forged = addr["homeB"]!.replace(/\.1$/, ".99");
    await lab.exec("homeA", ["ip", "addr", "add", `${forged}/32`, "dev", "capsule0"]);
    t.notOk(await ping(lab, "homeA", addr["edge"]!, { src: forged, count: 2 }), "forged source dropped");
    t.ok(await ping(lab, "homeA", addr["edge"]!, { src: addr["homeA"]! }), "the real source passes");
    await lab.exec("homeA", ["ip", "addr", "del", `${forged}/32`, "dev", "capsule0"]);

    // A new workload address on homeA is reachable from homeB once pushed (bounded).
    const w = await rpc<{ address: string }>(lab, "homeA", "Fabric/ReserveAddress", {
      name: "probe",
      labels: { app: "probe" },
    });
    await lab.exec("homeA", ["ip", "addr", "add", `${w.address}/32`, "dev", "lo"]);
    const took = await waitFor(() => ping(lab, "homeB", w.address), 10_000, 100);
    t.ok(took >= 0, `new address reachable from homeB after ${took} ms`);
    const inv = await rpc<{ peers: { name: string; entries: { name: string; address: string }[] }[] }>(
      lab,
      "homeB",
      "Fabric/Inventory",
    );
    t.same(
      inv.peers.find((p) => p.name === "homeA")?.entries.map((e) => e.name),
      ["probe"],
      "inventory reached the peer",
    );

    // SIGKILL + restart of capsuled does not drop the tunnel.
    const loop = lab.exec("homeB", ["busybox", "ping", "-c", "40", "-i", "0.1", "-W", "1", addr["homeA"]!], {
      timeoutMs: 30_000,
    });
    await new Promise((r) => setTimeout(r, 500));
    const aPid = Number(readFileSync(lab.capsule("homeA").pidFile, "utf8"));
    process.kill(aPid, "SIGKILL");
    await new Promise((r) => setTimeout(r, 300));
    await lab.up();
    const out = (await loop).stdout;
    const m = /(\d+) packets transmitted, (\d+) packets received/.exec(out);
    t.ok(m, "ping loop ran");
    const lost = Number(m?.[1]) - Number(m?.[2]);
    t.equal(lost, 0, `no packet lost across capsuled SIGKILL + restart (${m?.[0]})`);
    t.equal(await fabricAddress(lab, "homeA"), addr["homeA"], "same address after restart");
    t.ok(await ping(lab, "homeA", addr["homeB"]!), "still connected after restart");

    // capsule info reports the fabric address and the WireGuard mode.
    const info = JSON.parse(await ctl(lab, ["--capsule", "homeA", "capsule", "info", "-o", "json"]));
    const i0 = Array.isArray(info) ? info[0] : info;
    t.equal(i0.fabricAddress, addr["homeA"]);
    t.equal(i0.wireguardMode, "userspace", "no WireGuard module here: wireguard-go");

    // Key rotation: peers learn the new key first; traffic resumes within one handshake.
    const oldKey = (await rpc<{ wgPublicKey: string }>(lab, "homeA", "Fabric/Self")).wgPublicKey;
    const rot = await ctl(lab, ["--capsule", "homeA", "fabric", "rotate-key", "-o", "json"]);
    const newKey = (await rpc<{ wgPublicKey: string }>(lab, "homeA", "Fabric/Self")).wgPublicKey;
    t.not(newKey, oldKey, "new key");
    t.match(rot, /edge/);
    const edgeView = await rpc<{ peers: { name: string; publicKey: string }[] }>(
      lab,
      "edge",
      "Fabric/Status",
    );
    t.equal(edgeView.peers.find((p) => p.name === "homeA")?.publicKey, newKey, "the edge has the new key");
    const back = await waitFor(() => ping(lab, "homeA", addr["edge"]!), 10_000, 100);
    t.ok(back >= 0 && back < 6000, `homeA -> edge again ${back} ms after rotation (within one handshake)`);
    t.ok(
      (await waitFor(() => ping(lab, "homeB", addr["homeA"]!), 10_000, 100)) >= 0,
      "relayed homeB -> homeA after rotation",
    );

    // Unenroll cuts exactly that pair.
    await ctl(lab, ["fabric", "unenroll", "homeA", "homeB"]);
    t.notOk(await ping(lab, "homeA", addr["homeB"]!, { count: 2 }), "homeA -/-> homeB after unenroll");
    t.ok(await ping(lab, "homeA", addr["edge"]!), "homeA -> edge still");
    t.ok(await ping(lab, "homeB", addr["edge"]!), "homeB -> edge still");
    const after = JSON.parse(await ctl(lab, ["--capsule", "homeA", "fabric", "peers", "-o", "json"]));
    t.same(
      ((Array.isArray(after) ? after[0] : after).peers as { name: string }[]).map((p) => p.name),
      ["edge"],
      "no stale peer",
    );
  });
}
