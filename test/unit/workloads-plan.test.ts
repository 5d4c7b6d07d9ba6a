// The reconciler's pure decisions: create, adopt, stale generations, exits with backoff per
// restart policy, operator start, stop, orphans.
import t from "tap";
import {
  type ActualContainer,
  BACKOFF_MAX_MS,
  backoffMs,
  type DesiredView,
  freshMemory,
  type Memory,
  plan,
  STABLE_MS,
} from "../../src/node/workloads/reconciler.js";

const want = (over: Partial<DesiredView> = {}): DesiredView => ({
  name: "web",
  generation: 2,
  desired: "running",
  restartPolicy: "Always",
  ...over,
});
const c = (generation: number, state: "running" | "stopped", exitCode?: number): ActualContainer => ({
  id: `web.${generation}`,
  generation,
  state,
  ...(exitCode === undefined ? {} : { exitCode }),
});
const mem = (over: Partial<Memory> = {}): Memory => ({ ...freshMemory(), ...over });
const types = (p: ReturnType<typeof plan>) =>
  p.actions.map((a) =>
    a.type === "remove" || a.type === "stop"
      ? `${a.type} ${a.id}`
      : a.type === "run"
        ? `run ${a.reason}`
        : a.type === "event"
          ? `event ${a.event}: ${a.message}`
          : a.type,
  );

t.test("backoff doubles from 1 s and stops at 60 s", async (t) => {
  t.same([1, 2, 3, 4, 6, 7, 8, 50].map(backoffMs), [1000, 2000, 4000, 8000, 32000, 60000, 60000, 60000]);
  t.equal(backoffMs(100), BACKOFF_MAX_MS);
});

t.test("no container: ensure the namespace, create", async (t) => {
  const p = plan(want(), [], mem(), 0);
  t.same(types(p), ["ensureNet", "run create"]);
  t.equal(p.memory.phase, "running");
});

t.test("a running container of this generation is adopted: nothing to do", async (t) => {
  const p = plan(want(), [c(2, "running")], mem(), 0);
  t.same(types(p), ["ensureNet"]);
  t.equal(p.memory.phase, "running");
});

t.test("older generations are removed before the new one is made", async (t) => {
  t.same(types(plan(want(), [c(1, "running")], mem(), 0)), ["remove web.1", "ensureNet", "run create"]);
  t.same(types(plan(want(), [c(1, "stopped"), c(2, "running")], mem(), 0)), ["remove web.1", "ensureNet"]);
});

t.test("an exit is recorded once, then restarted after the backoff", async (t) => {
  const p1 = plan(want(), [c(2, "stopped", 137)], mem(), 1000);
  t.same(types(p1), ["ensureNet", "event exited: container web.2 exited with code 137"]);
  t.match(p1.memory, { phase: "backoff", message: /exited with code 137; restarting in 1s/, failures: 1 });
  t.equal(p1.memory.nextAttemptAt, 2000);
  const p2 = plan(want(), [c(2, "stopped", 137)], p1.memory, 1500);
  t.same(types(p2), ["ensureNet"], "waiting: no second exit event");
  t.equal(p2.memory.phase, "backoff");
  const p3 = plan(want(), [c(2, "stopped", 137)], p2.memory, 2000);
  t.same(types(p3), ["ensureNet", "run restart"]);
  t.match(p3.memory, { phase: "running", handled: false, failures: 1 });
  // It dies again at once: the next delay doubles.
  const p4 = plan(want(), [c(2, "stopped", 1)], p3.memory, 2100);
  t.match(p4.memory, { failures: 2, nextAttemptAt: 4100 });
});

t.test("a container that ran long enough starts its backoff over", async (t) => {
  const m = mem({ failures: 5, startedAt: 0 });
  t.equal(plan(want(), [c(2, "running")], m, STABLE_MS - 1).memory.failures, 5);
  t.equal(plan(want(), [c(2, "running")], m, STABLE_MS).memory.failures, 0);
});

t.test("restart policies", async (t) => {
  const never = plan(want({ restartPolicy: "Never" }), [c(2, "stopped", 3)], mem(), 0);
  t.match(never.memory, {
    phase: "failed",
    restartPending: false,
    message: /code 3 \(restartPolicy Never\)/,
  });
  t.same(types(plan(want({ restartPolicy: "Never" }), [c(2, "stopped", 3)], never.memory, 99_999)), [
    "ensureNet",
  ]);
  const done = plan(want({ restartPolicy: "OnFailure" }), [c(2, "stopped", 0)], mem(), 0);
  t.match(done.memory, { phase: "stopped", restartPending: false });
  const failed = plan(want({ restartPolicy: "OnFailure" }), [c(2, "stopped", 2)], mem(), 0);
  t.match(failed.memory, { phase: "backoff", restartPending: true });
});

t.test("an operator start starts a stopped container at once, without an exit", async (t) => {
  const p = plan(want(), [c(2, "stopped", 143)], mem({ startRequested: true }), 0);
  t.same(types(p), ["ensureNet", "run start"]);
  t.equal(p.memory.startRequested, false);
  const adopted = plan(want(), [c(2, "running")], mem({ startRequested: true }), 0);
  t.equal(adopted.memory.startRequested, false, "cleared once running");
});

t.test("desired stopped: stop a running container, keep the namespace", async (t) => {
  const p = plan(want({ desired: "stopped" }), [c(2, "running")], mem(), 0);
  t.same(types(p), ["stop web.2", "event stopped: container web.2 stopped"]);
  t.equal(p.memory.phase, "stopped");
  t.same(types(plan(want({ desired: "stopped" }), [c(2, "stopped")], mem(), 0)), [], "already stopped");
});

t.test("no desired row: remove every container and the namespace", async (t) => {
  const p = plan(undefined, [c(1, "running"), c(2, "stopped")], mem(), 0);
  t.same(types(p), ["remove web.1", "remove web.2", "teardownNet"]);
});
