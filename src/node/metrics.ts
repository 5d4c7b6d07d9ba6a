import { createServer, type Server } from "node:http";
import { Counter, collectDefaultMetrics, Histogram, Registry } from "prom-client";

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
