import { createServer, type Server } from "node:http";
import { Counter, collectDefaultMetrics, Gauge, Histogram, Registry } from "prom-client";

/** Metrics holds capsuled's Prometheus registry; later subsystems register their own series on it. */
export class Metrics {
  readonly registry = new Registry();
  readonly rpcRequests = new Counter({
    name: "capsule_rpc_requests_total",
    help: "RPCs handled, by method and result code.",
    labelNames: ["method", "code"] as const,
    registers: [this.registry],
  });
  readonly rpcDuration = new Histogram({
    name: "capsule_rpc_duration_seconds",
    help: "RPC handling time, by method.",
    labelNames: ["method"] as const,
    buckets: [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5],
    registers: [this.registry],
  });

  constructor() {
    collectDefaultMetrics({ register: this.registry, prefix: "capsuled_" });
  }

  /**
   * registerFabric adds per-peer WireGuard gauges, read from `status` at scrape time (so they
   * are never stale and cost nothing between scrapes).
   */
  registerFabric(
    status: () => Promise<
      { name: string; handshakeAgeSeconds: number; rxBytes: string; txBytes: string; up: boolean }[]
    >,
  ): void {
    let last: Awaited<ReturnType<typeof status>> = [];
    const refresh = async () => {
      last = await status().catch(() => []);
    };
    new Gauge({
      name: "capsule_fabric_peers_up",
      help: "Enrolled peers with a WireGuard handshake in the last 3 minutes.",
      registers: [this.registry],
      async collect() {
        await refresh();
        this.set(last.filter((p) => p.up).length);
      },
    });
    new Gauge({
      name: "capsule_fabric_handshake_age_seconds",
      help: "Seconds since the latest WireGuard handshake with each peer (-1: never).",
      labelNames: ["peer"] as const,
      registers: [this.registry],
      collect() {
        this.reset();
        for (const p of last) this.set({ peer: p.name }, p.handshakeAgeSeconds);
      },
    });
    for (const [dir, key] of [
      ["rx", "rxBytes"],
      ["tx", "txBytes"],
    ] as const) {
      new Gauge({
        name: `capsule_fabric_${dir}_bytes`,
        help: `Bytes ${dir === "rx" ? "received from" : "sent to"} each peer over WireGuard (since the interface came up).`,
        labelNames: ["peer"] as const,
        registers: [this.registry],
        collect() {
          this.reset();
          for (const p of last) this.set({ peer: p.name }, Number(p[key]));
        },
      });
    }
  }

  /** policyApplyDuration times each policy compile + apply, by outcome ("ok", "unchanged", "error"). */
  readonly policyApplyDuration = new Histogram({
    name: "capsule_policy_apply_duration_seconds",
    help: "Time to compile and apply the policy ruleset, by outcome.",
    labelNames: ["outcome"] as const,
    buckets: [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5],
    registers: [this.registry],
  });

  /**
   * registerPolicy adds the policy series, read at scrape time: `capsule_policy_drops_total`
   * per local workload (`drops` must be monotonic, see NftPolicyApplier.dropCounters) and the
   * `capsule_policy_rules` gauge (allow rules in force, implicit ones included).
   */
  registerPolicy(source: { drops: () => Promise<Map<string, bigint>>; rules: () => number }): void {
    new Counter({
      name: "capsule_policy_drops_total",
      help: "Packets to a local workload's fabric address dropped by policy.",
      labelNames: ["workload"] as const,
      registers: [this.registry],
      async collect() {
        const drops = await source.drops().catch(() => new Map<string, bigint>());
        this.reset();
        for (const [workload, n] of drops) this.inc({ workload }, Number(n));
      },
    });
    new Gauge({
      name: "capsule_policy_rules",
      help: "Allow rules in force on this capsule (written and implicit).",
      registers: [this.registry],
      collect() {
        this.set(source.rules());
      },
    });
  }

  /**
   * registerEdge adds the edge series, read at scrape time: `capsule_edge_route_up` (1 healthy,
   * 0 otherwise) and `capsule_edge_certificate_valid` (1 valid, 0 otherwise; HTTPS routes only),
   * per route (host or public port) and kind.
   */
  registerEdge(source: () => Promise<{ route: string; kind: string; health: string; cert: string }[]>): void {
    const rows = async () => source().catch(() => []);
    new Gauge({
      name: "capsule_edge_route_up",
      help: "Whether the edge reaches the route's upstream (1) or not (0).",
      labelNames: ["route", "kind"] as const,
      registers: [this.registry],
      async collect() {
        this.reset();
        for (const r of await rows())
          this.set({ route: r.route, kind: r.kind }, r.health === "healthy" ? 1 : 0);
      },
    });
    new Gauge({
      name: "capsule_edge_certificate_valid",
      help: "Whether an HTTPS route's certificate is valid (1) or pending/failed (0).",
      labelNames: ["route"] as const,
      registers: [this.registry],
      async collect() {
        this.reset();
        for (const r of await rows())
          if (r.kind === "https") this.set({ route: r.route }, r.cert === "valid" ? 1 : 0);
      },
    });
  }

  /** serve exposes /metrics over plain HTTP on host:port (meant for a local or fabric-only address). */
  serve(host: string, port: number): Promise<Server> {
    const server = createServer(async (req, res) => {
      if (req.url !== "/metrics") {
        res.writeHead(404).end("not found\n");
        return;
      }
      res.writeHead(200, { "content-type": this.registry.contentType });
      res.end(await this.registry.metrics());
    });
    return new Promise((resolve, reject) => {
      server.once("error", reject);
      server.listen(port, host, () => resolve(server));
    });
  }
}
