import { readFileSync } from "node:fs";
import type { Server as HttpServer } from "node:http";
import { join } from "node:path";
import tls from "node:tls";
import * as grpc from "@grpc/grpc-js";
import { type Logger, pino } from "pino";
import { PROTO_DIR, loadProto } from "../api/proto.js";
import { CapsuleError, ErrorCode } from "../errors.js";
import { capsuleService } from "./api/capsule-service.js";
import { Authenticator } from "./auth.js";
import { ClaimWindow } from "./claim.js";
import type { DaemonConfig } from "./config.js";
import { type Clock, SystemClock } from "./host/clock.js";
import { type Identity, loadOrCreateIdentity } from "./identity.js";
import { Metrics } from "./metrics.js";
import { Store } from "./store/store.js";

/** VERSION is the package version, reported by Info. */
export const VERSION: string = JSON.parse(
  readFileSync(join(PROTO_DIR, "..", "package.json"), "utf8"),
).version;

/** Agent is a running capsuled. */
export interface Agent {
  identity: Identity;
  store: Store;
  /** port is the API port actually bound (useful with --listen HOST:0). */
  port: number;
  /** stop closes the API and the database; workloads and the data path are left running. */
  stop(): Promise<void>;
}

/** AgentOverrides replace real implementations in tests (all optional). */
export interface AgentOverrides {
  clock?: Clock;
  log?: Logger;
}

/**
 * startAgent is the one composition root: it builds every real implementation (clock, store,
 * identity, authenticator, metrics, API server) and wires them. Nothing else constructs them.
 */
export async function startAgent(config: DaemonConfig, overrides: AgentOverrides = {}): Promise<Agent> {
  // TLS 1.3 only, process-wide: grpc-js offers no per-server minimum version.
  tls.DEFAULT_MIN_VERSION = "TLSv1.3";
  const clock = overrides.clock ?? new SystemClock();
  const log = overrides.log ?? pino({ level: config.logLevel, base: { capsule: config.name } });
  const startedAt = clock.now();
  const store = Store.open(join(config.stateDir, "state.db"));
  const identity = await loadOrCreateIdentity(config.stateDir, store);
  const auth = new Authenticator(store, clock, identity.id);
  const claim = new ClaimWindow(store, clock, config.claimWindowMs);
  const metrics = new Metrics();

  const server = new grpc.Server({ "grpc.max_receive_message_length": 64 * 1024 * 1024 });
  const proto = loadProto();
  server.addService(
    proto.capsule.v1.Capsule.service,
    capsuleService({
      store,
      clock,
      identity,
      claim,
      auth,
      metrics,
      log,
      name: config.name,
      version: VERSION,
      startedAt,
    }),
  );
  const creds = grpc.ServerCredentials.createSsl(
    null,
    [{ private_key: Buffer.from(identity.keyPem), cert_chain: Buffer.from(identity.certPem) }],
    false,
  );
  const hostPort = config.listen.host.includes(":")
    ? `[${config.listen.host}]:${config.listen.port}`
    : `${config.listen.host}:${config.listen.port}`;
  const port = await new Promise<number>((resolve, reject) =>
    server.bindAsync(hostPort, creds, (err, p) =>
      err
        ? reject(
            new CapsuleError(ErrorCode.FailedPrecondition, `cannot listen on ${hostPort}: ${err.message}`, {
              hint: "is another capsuled using that port? pick another with --listen",
              cause: err,
            }),
          )
        : resolve(p),
    ),
  );
  let metricsServer: HttpServer | undefined;
  if (config.metrics) metricsServer = await metrics.serve(config.metrics.host, config.metrics.port);

  const prune = setInterval(() => store.pruneTokens(clock.now()), 60_000);
  prune.unref();

  log.info(
    {
      id: identity.id,
      fingerprint: identity.fingerprint,
      listen: `${config.listen.host}:${port}`,
      proto: PROTO_DIR,
    },
    "capsuled started",
  );
  return {
    identity,
    store,
    port,
    async stop() {
      clearInterval(prune);
      await new Promise<void>((r) => server.tryShutdown(() => r()));
      if (metricsServer) await new Promise<void>((r) => metricsServer?.close(() => r()));
      store.close();
    },
  };
}
