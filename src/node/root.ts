import { existsSync, readFileSync, renameSync, writeFileSync } from "node:fs";
import type { Server as HttpServer } from "node:http";
import { join } from "node:path";
import tls from "node:tls";
import * as grpc from "@grpc/grpc-js";
import { type Logger, pino } from "pino";
import { loadProto, PROTO_DIR } from "../api/proto.js";
import { generateSigner, type Signer, signerFromPem } from "../api/token.js";
import { CapsuleError, ErrorCode } from "../errors.js";
import { RpcPeerCaller } from "../fabric/caller.js";
import { Fabric } from "../fabric/fabric.js";
import { FabricRepo } from "../fabric/repo.js";
import { WgClient } from "../fabric/wg.js";
import { capsuleService } from "./api/capsule-service.js";
import { fabricService } from "./api/fabric-service.js";
import { imageService } from "./api/image-service.js";
import { policyService } from "./api/policy-service.js";
import { volumeService } from "./api/volume-service.js";
import { workloadService } from "./api/workload-service.js";
import { edgeService } from "./api/edge-service.js";
import { HostEdgeDataPlane } from "../edge/dataplane.js";
import { EdgeRoutes, routeKey } from "../edge/manager.js";
import { RouteRepo } from "../edge/repo.js";
import { FabricEdgeLink } from "./expose/link.js";
import { Exposures } from "./expose/manager.js";
import { ExposureRepo } from "./expose/repo.js";
import { ReturnPath } from "./expose/return-path.js";
import { Authenticator } from "./auth.js";
import { ClaimWindow } from "./claim.js";
import type { DaemonConfig } from "./config.js";
import { type Clock, SystemClock } from "./host/clock.js";
import { IpNetlink } from "./host/netlink.js";
import { ExecaRunner } from "./host/runner.js";
import { DetachedSpawner } from "./host/spawner.js";
import { watchStalls } from "./host/stall.js";
import { type Identity, loadOrCreateIdentity } from "./identity.js";
import { Metrics } from "./metrics.js";
import { NftPolicyApplier } from "./policy/applier.js";
import { Policies } from "./policy/manager.js";
import { meshOf } from "./policy/mesh.js";
import { PolicyRepo } from "./policy/repo.js";
import { Containerd } from "./runtime/containerd.js";
import { GrpcContainerdApi } from "./runtime/containerd-api.js";
import { Containers } from "./runtime/containers.js";
import { type AccelChoice, detectAccel } from "./runtime/qemu-accel.js";
import { FifoPipes } from "./runtime/exec-pipes.js";
import { Images } from "./runtime/images.js";
import { WorkloadNet } from "./runtime/netns.js";
import { TapNet } from "./runtime/tap.js";
import { MicroVms } from "./runtime/vms.js";
import { Store } from "./store/store.js";
import { Workloads } from "./workloads/manager.js";
import { NftPortForwarder } from "./workloads/nat.js";
import { Reconciler } from "./workloads/reconciler.js";
import { WorkloadNets, WorkloadRuntimes } from "./workloads/runtimes.js";
import { WorkloadRepo } from "./workloads/repo.js";
import { LoopVolumes } from "./workloads/volumes.js";

/** VERSION is the package version, reported by Info. */
export const VERSION: string = JSON.parse(
  readFileSync(join(PROTO_DIR, "..", "package.json"), "utf8"),
).version;

/** PEER_KEY_FILE holds the Ed25519 key this capsule signs calls to its peers with (mode 0600). */
export const PEER_KEY_FILE = "peer.key";

/** Agent is a running capsuled. */
export interface Agent {
  identity: Identity;
  store: Store;
  /** port is the API port actually bound (useful with --listen HOST:0). */
  port: number;
  /** fabric is the fabric manager (undefined with --no-fabric). */
  fabric: Fabric | undefined;
  /** policies is the policy manager (stores and evaluates everywhere; enforces only with a fabric). */
  policies: Policies;
  /** stop closes the API and the database; workloads and the data path are left running. */
  stop(): Promise<void>;
}

/** AgentOverrides replace real implementations in tests (all optional). */
export interface AgentOverrides {
  clock?: Clock;
  log?: Logger;
}

async function loadPeerSigner(stateDir: string): Promise<Signer> {
  const path = join(stateDir, PEER_KEY_FILE);
  if (!existsSync(path)) {
    const { privatePem } = await generateSigner();
    writeFileSync(`${path}.tmp`, privatePem, { mode: 0o600 });
    renameSync(`${path}.tmp`, path);
  }
  return signerFromPem(readFileSync(path, "utf8"));
}

function hostPortText(host: string, port: number): string {
  return host.includes(":") ? `[${host}]:${port}` : `${host}:${port}`;
}

/**
 * startAgent is the one composition root: it builds every real implementation (clock, store,
 * identity, authenticator, command runner, netlink, WireGuard client, metrics, API server)
 * and wires them. Nothing else constructs them.
 *
 * Order matters for restart safety: state opens first; the stored policies are compiled against
 * the persisted mesh and applied (default deny when there are none) before anything else, so
 * nothing is announced or adopted unfiltered; then the API comes up, then the fabric is adopted
 * or created (a running wireguard-go and its peers are kept, not restarted) and the policies are
 * recompiled against it; the workload runtime comes last.
 */
export async function startAgent(config: DaemonConfig, overrides: AgentOverrides = {}): Promise<Agent> {
  // TLS 1.3 only, process-wide: grpc-js offers no per-server minimum version.
  tls.DEFAULT_MIN_VERSION = "TLSv1.3";
  const clock = overrides.clock ?? new SystemClock();
  const log = overrides.log ?? pino({ level: config.logLevel, base: { capsule: config.name } });
  // A blocked event loop logs nothing by itself: the watchdog says so, with where the kernel holds it.
  const stalls = watchStalls(log);
  const startedAt = clock.now();
  const store = Store.open(join(config.stateDir, "state.db"));
  const identity = await loadOrCreateIdentity(config.stateDir, store);
  const fabricRepo = new FabricRepo(store);
  const auth = new Authenticator(store, clock, identity.id, (kid) => fabricRepo.peerByKeyId(kid));
  const claim = new ClaimWindow(store, clock, config.claimWindowMs);
  const metrics = new Metrics();
  const peerSigner = await loadPeerSigner(config.stateDir);

  const server = new grpc.Server({ "grpc.max_receive_message_length": 64 * 1024 * 1024 });
  const creds = grpc.ServerCredentials.createSsl(
    null,
    [{ private_key: Buffer.from(identity.keyPem), cert_chain: Buffer.from(identity.certPem) }],
    false,
  );
  const bind = (hostPort: string) =>
    new Promise<number>((resolve, reject) =>
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

  const runner = new ExecaRunner();
  const caller = new RpcPeerCaller(peerSigner);
  let port = 0;
  const fabricListeners = new Set<string>();
  const wildcard = config.listen.host === "0.0.0.0" || config.listen.host === "::";
  let fabric: Fabric | undefined;
  let policies: Policies | undefined;
  let exposures: Exposures | undefined;
  let edgeRoutes: EdgeRoutes | undefined;
  const exposureRepo = new ExposureRepo(store);
  if (config.fabric) {
    fabric = new Fabric({
      repo: fabricRepo,
      dataplane: new WgClient({
        iface: config.fabricIface,
        stateDir: config.stateDir,
        runner,
        spawner: new DetachedSpawner(),
        clock,
      }),
      // `ip` processes, not in-process rtnetlink: a request that waits for the kernel's rtnl lock
      // then blocks a child (bounded by the runner's timeout), never this event loop and the API.
      net: new IpNetlink(runner),
      caller,
      clock,
      log,
      stateDir: config.stateDir,
      self: {
        capsuleId: identity.id,
        name: config.name,
        iface: config.fabricIface,
        listenPort: config.fabricPort,
        endpoint: config.endpoint ? hostPortText(config.endpoint.host, config.endpoint.port) : "",
        get apiPort() {
          return port;
        },
        apiCertPem: identity.certPem,
        apiFingerprint: identity.fingerprint,
        peerKeyJwk: JSON.stringify(peerSigner.publicJwk),
        edge: config.edge,
      },
      // Peers, inventories and this capsule's own reservations (workloads created or deleted)
      // all change what policy allows: recompile (debounced).
      onChange: () => {
        policies?.changed();
        // A workload deleted and applied again has a new address: its exposures follow it.
        void exposures?.resync();
      },
      // TCP exposures keep the visitor's address: the edge they go through must be allowed to
      // send non-fabric sources (see src/node/expose/return-path.ts).
      visitorGateway: () => exposures?.visitorGateway(),
      // Peers call this capsule's API at its fabric address: listen there too (unless --listen
      // already covers every address).
      onAddressChange: (address) => {
        if (wildcard || fabricListeners.has(address)) return;
        fabricListeners.add(address);
        bind(hostPortText(address, port)).then(
          () => log.info({ address: `${address}:${port}` }, "API listening on the fabric"),
          (e: Error) => log.error({ err: e.message }, "cannot listen on the fabric address"),
        );
      },
    });
  }

  if (fabric) {
    const f = fabric;
    metrics.registerFabric(async () => (f.isStarted() ? (await f.status()).peers : []));
  }

  // Policies work on every capsule; only one with a fabric enforces them (with --no-fabric there
  // is no workload to protect, and the host's own firewall is not ours to touch).
  const policyMgr = new Policies({
    repo: new PolicyRepo(store),
    applier: fabric ? new NftPolicyApplier({ runner, stateDir: config.stateDir }) : undefined,
    mesh: () =>
      fabric
        ? meshOf(fabric.inventory(), fabric.peerInventories())
        : { self: config.name, capsules: [], workloads: [] },
    implicit: () => exposures?.implicit() ?? [],
    fabricIface: config.fabricIface,
    clock,
    log,
    metrics,
  });
  policies = policyMgr;
  metrics.registerPolicy({ drops: () => policyMgr.drops(), rules: () => policyMgr.ruleCount() });
  if (fabric) {
    // Before the API, the fabric and the workloads: the stored policies against the persisted
    // mesh (what capsule-policy.service loaded at boot, or default deny on a first start).
    try {
      await policyMgr.reconcile();
      log.info({ policies: policyMgr.list().length }, "policy ruleset applied");
    } catch (e) {
      log.error({ err: (e as Error).message }, "policy ruleset not applied; retried on the next change");
    }
  }

  // MicroVMs: which accelerator QEMU can really use here (KVM is tried with a canary guest; a
  // /dev/kvm that cannot run a guest falls back to TCG). In the background: start is not delayed.
  let vmAccel = "";
  // Bounded at 1.5 s a candidate: a KVM that runs guests that slowly is not worth waiting for.
  // A VM started before detection ends waits for it (MicroVms asks `accel()`).
  const accel: Promise<AccelChoice> = config.fabric
    ? detectAccel(runner, { timeoutMs: 1_500 }).then(
        (a) => {
          vmAccel = a.accel;
          log.info({ accel: a.accel, cpu: a.cpu, reason: a.reason }, "microVM accelerator");
          return a;
        },
        (e: Error) => {
          log.warn({ err: e.message }, "microVM accelerator not detected");
          return { accel: "none", cpu: undefined, reason: e.message } satisfies AccelChoice;
        },
      )
    : Promise.resolve({ accel: "none", cpu: undefined, reason: "no fabric" });

  const proto = loadProto();
  const deps = { auth, metrics, log };
  server.addService(
    proto.capsule.v1.Capsule.service,
    capsuleService({
      ...deps,
      store,
      clock,
      identity,
      claim,
      name: config.name,
      version: VERSION,
      startedAt,
      edgeAddress: config.edge ? (config.publicAddress ?? "") : "",
      vmAccel: () => vmAccel,
      fabric: () => ({
        address: fabric?.isStarted() ? fabric.address : "",
        wireguardMode: fabric?.wireguardMode ?? "",
      }),
    }),
  );
  server.addService(proto.capsule.v1.Fabric.service, fabricService({ ...deps, fabric, repo: fabricRepo }));
  // Workloads need the fabric (their addresses come from it): with --no-fabric, or until the
  // runtime is up, these services answer CAPSULE_FAILED_PRECONDITION.
  const volumes = fabric ? new LoopVolumes({ store, runner, stateDir: config.stateDir }) : undefined;
  let runtime: { images: Images; workloads: Workloads; reconciler: Reconciler } | undefined;
  server.addService(
    proto.capsule.v1.Images.service,
    imageService({ ...deps, images: () => runtime?.images, stateDir: config.stateDir }),
  );
  server.addService(
    proto.capsule.v1.Workloads.service,
    workloadService({ ...deps, workloads: () => runtime?.workloads }),
  );
  server.addService(proto.capsule.v1.Volumes.service, volumeService({ ...deps, volumes }));
  server.addService(proto.capsule.v1.Policies.service, policyService({ ...deps, policies: policyMgr }));
  server.addService(
    proto.capsule.v1.Edge.service,
    edgeService({
      ...deps,
      selfName: config.name,
      repo: fabricRepo,
      routes: () => edgeRoutes,
      exposures: () => exposures,
    }),
  );
  if (fabric) {
    const f = fabric;
    exposures = new Exposures({
      repo: exposureRepo,
      address: (name) => new WorkloadRepo(store).get(name)?.address,
      edges: new FabricEdgeLink({
        selfName: config.name,
        selfId: identity.id,
        local: () => edgeRoutes,
        repo: fabricRepo,
        caller,
      }),
      enforce: () => policyMgr.reconcile(),
      visitorsChanged: () => (f.isStarted() ? f.apply() : Promise.resolve()),
      clock,
      log,
    });
  }
  port = await bind(hostPortText(config.listen.host, config.listen.port));

  let metricsServer: HttpServer | undefined;
  if (config.metrics) metricsServer = await metrics.serve(config.metrics.host, config.metrics.port);

  const prune = setInterval(() => store.pruneTokens(clock.now()), 60_000);
  prune.unref();

  // The workload runtime comes up after the fabric (workload addresses are the fabric's):
  // containerd adopted or started, volumes adopted, then the reconciler adopts the running
  // containers. A failure is retried with backoff, never fatal.
  let runtimeRetry: NodeJS.Timeout | undefined;
  let stopping = false;
  const startRuntime = async (attempt: number): Promise<void> => {
    const f = fabric;
    if (!f || !volumes || stopping) return;
    try {
      const cd = await new Containerd({ runner, spawner: new DetachedSpawner(), clock }).ensure({
        stateDir: config.stateDir,
      });
      const images = new Images({ runner, endpoint: cd.endpoint });
      const containers = new Containers({
        runner,
        clock,
        endpoint: cd.endpoint,
        images,
        dataDir: join(config.stateDir, "containers"),
        fifoDir: cd.paths.fifoDir,
        // Interactive exec talks to containerd's API directly (see runtime/containerd-api.ts).
        execApi: () => new GrpcContainerdApi(cd.endpoint),
        pipes: new FifoPipes(runner, cd.paths.fifoDir),
      });
      // `ip` child processes, not rtnetlink on the event loop (see host/netlink.ts: the rtnl lock).
      const netlink = new IpNetlink(runner);
      const net = new WorkloadNets(new WorkloadNet({ runner, netlink }), new TapNet({ runner, netlink }));
      // MicroVMs: QEMU detached like wireguard-go, sandboxed, dropping to nobody once set up.
      const vms = new MicroVms({
        clock,
        spawner: new DetachedSpawner(),
        dataDir: join(config.stateDir, "vms"),
        accel: () => accel,
        runAs: { user: "nobody" },
      });
      const runtimes = new WorkloadRuntimes(containers, vms);
      await volumes.start();
      const ports = new NftPortForwarder({ runner, fabricIface: config.fabricIface });
      const repo = new WorkloadRepo(store);
      const reconciler = new Reconciler({
        repo,
        containers: runtimes,
        net,
        volumes,
        ports,
        hostSrc: () => f.address,
        clock,
        log,
      });
      const workloads = new Workloads({
        repo,
        images,
        addresses: f,
        containers: runtimes,
        net,
        reconciler,
        vmAccel: async () => (await accel).accel,
        volumes,
        ports,
        clock,
      });
      if (stopping) return;
      runtime = { images, workloads, reconciler };
      reconciler.start();
      log.info({ containerd: cd.endpoint.address, adopted: cd.adopted }, "workload runtime started");
    } catch (e) {
      const delay = Math.min(30_000, 1000 * 2 ** attempt);
      log.error({ err: (e as Error).message, retryInMs: delay }, "workload runtime start failed");
      runtimeRetry = setTimeout(() => void startRuntime(attempt + 1), delay);
      runtimeRetry.unref();
    }
  };

  // An edge serves its stored routes again (Caddy and HAProxy adopted when they still run, so
  // a capsuled restart interrupts nothing). Retried with backoff, never fatal.
  let edgeRetry: NodeJS.Timeout | undefined;
  const startEdge = async (attempt: number): Promise<void> => {
    if (!config.edge || !config.fabric || stopping) return;
    try {
      const publicAddress = config.publicAddress;
      if (!publicAddress)
        throw new CapsuleError(ErrorCode.InvalidConfig, "an edge needs the address visitors reach", {
          hint: "give --public-address IP (or --endpoint HOST:PORT)",
        });
      const routes = new EdgeRoutes({
        repo: new RouteRepo(store),
        dataplane: new HostEdgeDataPlane({
          stateDir: config.stateDir,
          runner,
          spawner: new DetachedSpawner(),
          clock,
          log,
          publicAddress,
          fabricIface: config.fabricIface,
          acmeCa: config.acmeCa,
          ...(config.acmeCaRoot ? { acmeCaRoot: config.acmeCaRoot } : {}),
          ...(config.acmeEmail ? { acmeEmail: config.acmeEmail } : {}),
        }),
        publicAddress,
        reservedPorts: () => [
          { port: 80, what: "HTTP" },
          { port: 443, what: "HTTPS" },
          { port, what: "the capsule API" },
          ...(config.metrics ? [{ port: config.metrics.port, what: "metrics" }] : []),
          ...new WorkloadRepo(store)
            .hostPorts()
            .filter((h) => h.protocol === "tcp")
            .map((h) => ({ port: h.hostPort, what: `hostPort of workload ${h.workload}` })),
        ],
        clock,
        log,
      });
      await routes.start();
      if (stopping) return;
      edgeRoutes = routes;
      metrics.registerEdge(async () =>
        (await routes.views()).map((v) => ({
          route: routeKey(v),
          kind: v.kind,
          health: v.health,
          cert: v.cert,
        })),
      );
    } catch (e) {
      const delay = Math.min(30_000, 1000 * 2 ** attempt);
      log.error({ err: (e as Error).message, retryInMs: delay }, "edge start failed");
      edgeRetry = setTimeout(() => void startEdge(attempt + 1), delay);
      edgeRetry.unref();
    }
  };

  // The fabric comes up after the API so a broken data plane can still be diagnosed remotely;
  // a failure is retried with backoff, never fatal.
  let fabricRetry: NodeJS.Timeout | undefined;
  const startFabric = async (attempt: number): Promise<void> => {
    if (!fabric) return;
    try {
      await fabric.start();
      await new ReturnPath({ runner, fabricIface: config.fabricIface })
        .ensure()
        .catch((e: Error) => log.error({ err: e.message }, "visitor return path not installed"));
      policyMgr.changed();
      void startRuntime(0);
      void startEdge(0);
      void exposures?.resync(true);
    } catch (e) {
      const delay = Math.min(30_000, 1000 * 2 ** attempt);
      log.error({ err: (e as Error).message, retryInMs: delay }, "fabric start failed");
      fabricRetry = setTimeout(() => void startFabric(attempt + 1), delay);
      fabricRetry.unref();
    }
  };
  await startFabric(0);

  log.info(
    { id: identity.id, fingerprint: identity.fingerprint, listen: hostPortText(config.listen.host, port) },
    "capsuled started",
  );
  return {
    identity,
    store,
    port,
    fabric,
    policies: policyMgr,
    async stop() {
      clearInterval(prune);
      stalls.stop();
      await policyMgr.stop();
      if (fabricRetry) clearTimeout(fabricRetry);
      stopping = true;
      if (runtimeRetry) clearTimeout(runtimeRetry);
      if (edgeRetry) clearTimeout(edgeRetry);
      await edgeRoutes?.stop();
      runtime?.reconciler.stop();
      fabric?.stop();
      caller.close();
      await new Promise<void>((r) => server.tryShutdown(() => r()));
      if (metricsServer) await new Promise<void>((r) => metricsServer?.close(() => r()));
      store.close();
    },
  };
}
