import { setTimeout as sleep } from "node:timers/promises";
import t from "tap";
import { fanOut } from "../../src/cli/fanout.js";
import { CapsuleError, ErrorCode } from "../../src/errors.js";

t.test("results come back in target order whatever the finishing order", async (t) => {
  const delays = [40, 5, 25, 0, 15];
  const res = await fanOut(
    delays,
    async (d) => {
      await sleep(d);
      return d * 2;
    },
    { deadlineMs: 1000 },
  );
  t.same(
    res.map((r) => (r.ok ? r.value : null)),
    [80, 10, 50, 0, 30],
  );
  t.same(
    res.map((r) => r.target),
    delays,
  );
});

t.test("never more than `concurrency` in flight, and every slot is used", async (t) => {
  let inFlight = 0;
  let peak = 0;
  const started: number[] = [];
  const targets = Array.from({ length: 10 }, (_, i) => i);
  const res = await fanOut(
    targets,
    async (i) => {
      started.push(i);
      inFlight++;
      peak = Math.max(peak, inFlight);
      await sleep(10 + (i % 3) * 5);
      inFlight--;
      return i;
    },
    { concurrency: 3, deadlineMs: 1000 },
  );
  t.equal(peak, 3);
  t.equal(res.length, 10);
  t.same(started.slice(0, 3), [0, 1, 2], "the first slots start in order");
  t.ok(res.every((r) => r.ok));
});

t.test("the default concurrency is 16", async (t) => {
  let inFlight = 0;
  let peak = 0;
  await fanOut(
    Array.from({ length: 40 }, (_, i) => i),
    async () => {
      inFlight++;
      peak = Math.max(peak, inFlight);
      await sleep(5);
      inFlight--;
    },
    { deadlineMs: 1000 },
  );
  t.equal(peak, 16);
});

t.test("a hanging target times out, its signal aborts, and the others still finish", async (t) => {
  let aborted: unknown;
  const t0 = Date.now();
  const res = await fanOut(
    ["fast", "hang", "slow"],
    (name, signal) => {
      if (name === "hang") {
        signal.addEventListener("abort", () => {
          aborted = signal.reason;
        });
        return new Promise<string>(() => {}); // never settles, ignores the signal
      }
      return sleep(name === "slow" ? 60 : 1).then(() => name);
    },
    { deadlineMs: 150, label: (n) => `box-${n}` },
  );
  const elapsed = Date.now() - t0;
  t.ok(elapsed >= 140 && elapsed < 1000, `returned after the deadline, not never (${elapsed} ms)`);
  t.same(res[0], { target: "fast", ok: true, value: "fast" });
  t.same(res[2], { target: "slow", ok: true, value: "slow" });
  const hung = res[1]!;
  t.equal(hung.ok, false);
  if (!hung.ok) {
    t.equal(hung.error.code, ErrorCode.Timeout);
    t.equal(hung.error.message, "box-hang: no answer within 150ms");
    t.equal(aborted, hung.error, "the signal is aborted with the timeout error");
  }
});

t.test("a hung target frees its slot at the deadline", async (t) => {
  const res = await fanOut(
    ["hang", "next"],
    (name) => (name === "hang" ? new Promise<string>(() => {}) : Promise.resolve(name)),
    { concurrency: 1, deadlineMs: 50 },
  );
  t.same(
    res.map((r) => r.ok),
    [false, true],
  );
});

t.test("failures become CapsuleErrors and never hide the others", async (t) => {
  const boom = new CapsuleError(ErrorCode.Unreachable, "b: unreachable", { hint: "start it" });
  const res = await fanOut(
    ["a", "b", "c", "d"],
    async (x) => {
      if (x === "b") throw boom;
      if (x === "c") throw new Error("plain");
      return x.toUpperCase();
    },
    { deadlineMs: 1000 },
  );
  t.same(res[0], { target: "a", ok: true, value: "A" });
  t.same(res[1], { target: "b", ok: false, error: boom });
  const c = res[2]!;
  t.ok(!c.ok && c.error.code === ErrorCode.Internal && c.error.message === "plain");
  t.same(res[3], { target: "d", ok: true, value: "D" });
});

t.test("a synchronous throw is a failed target, not a crash", async (t) => {
  const res = await fanOut(
    [1],
    (() => {
      throw new Error("sync");
    }) as () => Promise<never>,
    { deadlineMs: 100 },
  );
  t.equal(res[0]?.ok, false);
});

t.test("no targets is no work", async (t) => {
  t.same(await fanOut([], async () => 1, { deadlineMs: 10 }), []);
});

t.test("bad options are refused", async (t) => {
  await t.rejects(
    fanOut([1], async () => 1, { deadlineMs: 10, concurrency: 0 }),
    { code: ErrorCode.InvalidArgument },
  );
  await t.rejects(
    fanOut([1], async () => 1, { deadlineMs: 0 }),
    { code: ErrorCode.InvalidArgument },
  );
});
