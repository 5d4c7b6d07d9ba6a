/**
 * WorkloadRepo: the `workloads` and `host_ports` tables (migration v3). Rows are the desired
 * state the reconciler drives towards; events are a short per-workload history (the last
 * {@link MAX_EVENTS}, JSON) shown by `workload get`.
 */
import type { WorkloadManifest } from "../../api/manifest.js";
import type { Store } from "../store/store.js";

/** MAX_EVENTS is how many events a workload keeps (oldest dropped first). */
export const MAX_EVENTS = 20;

/** Desired is what the operator asked a workload to do. */
export type Desired = "running" | "stopped";

/** WorkloadEvent is one entry of a workload's history. `time` is RFC 3339. */
export interface WorkloadEvent {
  time: string;
  type: string;
  message: string;
}

/** HostPortRow is one claimed host port: `protocol`/`hostPort` on the capsule → the workload's `port`. */
export interface HostPortRow {
  protocol: "tcp" | "udp";
  hostPort: number;
  workload: string;
  port: number;
}

/** WorkloadRow is one workload as persisted. */
export interface WorkloadRow {
  name: string;
  spec: WorkloadManifest;
  specHash: string;
  generation: number;
  desired: Desired;
  address: string;
  restarts: number;
  lastExit: number | undefined;
  events: WorkloadEvent[];
  createdAt: string;
  updatedAt: string;
}

interface Raw {
  name: string;
  spec_json: string;
  spec_hash: string;
  generation: number;
  desired: Desired;
  address: string;
  restarts: number;
  last_exit: number | null;
  events_json: string;
  created_at: string;
  updated_at: string;
}

const fromRaw = (r: Raw): WorkloadRow => ({
  name: r.name,
  spec: JSON.parse(r.spec_json) as WorkloadManifest,
  specHash: r.spec_hash,
  generation: r.generation,
  desired: r.desired,
  address: r.address,
  restarts: r.restarts,
  lastExit: r.last_exit ?? undefined,
  events: JSON.parse(r.events_json) as WorkloadEvent[],
  createdAt: r.created_at,
  updatedAt: r.updated_at,
});

/** hostPortsOf lists the host ports a manifest claims (pure). */
export function hostPortsOf(spec: WorkloadManifest): HostPortRow[] {
  return spec.ports
    .filter((p) => p.hostPort !== undefined)
    .map((p) => ({
      protocol: p.protocol,
      hostPort: p.hostPort as number,
      workload: spec.name,
      port: p.port,
    }));
}

/** WorkloadRepo reads and writes workload rows. Every write is one statement or runs in the caller's transaction. */
export class WorkloadRepo {
  constructor(readonly store: Store) {}

  /** get returns workload `name`, or undefined. */
  get(name: string): WorkloadRow | undefined {
    const r = this.store.db.prepare("SELECT * FROM workloads WHERE name = ?").get(name) as Raw | undefined;
    return r ? fromRaw(r) : undefined;
  }

  /** list returns every workload, by name. */
  list(): WorkloadRow[] {
    return (this.store.db.prepare("SELECT * FROM workloads ORDER BY name").all() as Raw[]).map(fromRaw);
  }

  /** hostPorts returns every claimed host port, by protocol and port. */
  hostPorts(): HostPortRow[] {
    return (
      this.store.db
        .prepare(
          "SELECT protocol, host_port AS hostPort, workload, port FROM host_ports ORDER BY protocol, host_port",
        )
        .all() as HostPortRow[]
    ).map((r) => ({ ...r }));
  }

  /**
   * put inserts or replaces workload `row` (events and restarts included) and makes its host
   * ports exactly `hostPortsOf(row.spec)`. Call inside a transaction with the rest of a change.
   */
  put(row: WorkloadRow): void {
    this.store.db
      .prepare(
        `INSERT INTO workloads (name, spec_json, spec_hash, generation, desired, address, restarts,
           last_exit, events_json, created_at, updated_at)
         VALUES (@name, @spec_json, @spec_hash, @generation, @desired, @address, @restarts,
           @last_exit, @events_json, @created_at, @updated_at)
         ON CONFLICT(name) DO UPDATE SET spec_json = excluded.spec_json, spec_hash = excluded.spec_hash,
           generation = excluded.generation, desired = excluded.desired, address = excluded.address,
           restarts = excluded.restarts, last_exit = excluded.last_exit,
           events_json = excluded.events_json, updated_at = excluded.updated_at`,
      )
      .run({
        name: row.name,
        spec_json: JSON.stringify(row.spec),
        spec_hash: row.specHash,
        generation: row.generation,
        desired: row.desired,
        address: row.address,
        restarts: row.restarts,
        last_exit: row.lastExit ?? null,
        events_json: JSON.stringify(row.events.slice(-MAX_EVENTS)),
        created_at: row.createdAt,
        updated_at: row.updatedAt,
      });
    this.store.db.prepare("DELETE FROM host_ports WHERE workload = ?").run(row.name);
    const ins = this.store.db.prepare(
      "INSERT INTO host_ports (protocol, host_port, workload, port) VALUES (?, ?, ?, ?)",
    );
    for (const p of hostPortsOf(row.spec)) ins.run(p.protocol, p.hostPort, row.name, p.port);
  }

  /** setDesired changes what workload `name` should do; false when there is no such workload. */
  setDesired(name: string, desired: Desired, now: string): boolean {
    return (
      this.store.db
        .prepare("UPDATE workloads SET desired = ?, updated_at = ? WHERE name = ?")
        .run(desired, now, name).changes > 0
    );
  }

  /** addEvent appends an event to workload `name`, keeping the last {@link MAX_EVENTS}; a no-op for an unknown workload. */
  addEvent(name: string, ev: WorkloadEvent): void {
    this.store.tx(() => {
      const r = this.store.db.prepare("SELECT events_json FROM workloads WHERE name = ?").get(name) as
        { events_json: string } | undefined;
      if (!r) return;
      const events = [...(JSON.parse(r.events_json) as WorkloadEvent[]), ev].slice(-MAX_EVENTS);
      this.store.db
        .prepare("UPDATE workloads SET events_json = ? WHERE name = ?")
        .run(JSON.stringify(events), name);
    });
  }

  /** recordExit stores workload `name`'s last exit code. */
  recordExit(name: string, code: number): void {
    this.store.db.prepare("UPDATE workloads SET last_exit = ? WHERE name = ?").run(code, name);
  }

  /** countRestart adds one to workload `name`'s restart count. */
  countRestart(name: string): void {
    this.store.db.prepare("UPDATE workloads SET restarts = restarts + 1 WHERE name = ?").run(name);
  }

  /** delete drops workload `name` and its host ports (ON DELETE CASCADE); false when absent. */
  delete(name: string): boolean {
    return this.store.db.prepare("DELETE FROM workloads WHERE name = ?").run(name).changes > 0;
  }
}
