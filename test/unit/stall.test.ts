// The event-loop stall watchdog: a worker notices a main thread that stopped turning and says
// where the kernel holds it; the main thread logs the stall once it turns again.
import { mkdtempSync, openSync, readFileSync, rmSync, closeSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { pino } from "pino";
import t from "tap";
import { watchStalls } from "../../src/node/host/stall.js";

t.test("a blocked event loop is reported while blocked, then logged", async (t) => {
  const dir = mkdtempSync(join(tmpdir(), "stall-"));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const file = join(dir, "err.log");
  const fd = openSync(file, "a");
  t.teardown(() => closeSync(fd));
  const lines: Record<string, unknown>[] = [];
  const log = pino({ base: { capsule: "c1" } }, { write: (l: string) => void lines.push(JSON.parse(l)) });
  const w = watchStalls(log, { thresholdMs: 600, fd });
  t.teardown(() => w.stop());
  // Let the worker start and see a few beats.
  await new Promise((r) => setTimeout(r, 1_000));
  const end = Date.now() + 1_600;
  while (Date.now() < end) {
    // a busy main thread: no timer, no I/O
  }
  await new Promise((r) => setTimeout(r, 600));
  const reported = readFileSync(file, "utf8")
    .split("\n")
    .filter(Boolean)
    .map((l) => JSON.parse(l) as Record<string, unknown>);
  t.equal(reported.length, 1, "one line from the worker while blocked");
  t.match(reported[0], {
    level: 40,
    capsule: "c1",
    pid: process.pid,
    state: "R",
    msg: /^event loop blocked: the main thread has not turned for \d+ ms$/,
  });
  t.ok((reported[0]!["blockedMs"] as number) >= 600);
  t.ok(
    lines.some((l) => l["msg"] === "event loop was blocked" && (l["blockedMs"] as number) >= 1_000),
    "logged after the fact",
  );
});

t.test("an idle loop reports nothing", async (t) => {
  const lines: unknown[] = [];
  const log = pino({}, { write: (l: string) => void lines.push(l) });
  const w = watchStalls(log, { thresholdMs: 600, fd: 2 });
  await new Promise((r) => setTimeout(r, 1_200));
  w.stop();
  t.same(lines, []);
});
