/**
 * Event-loop stall watchdog: says in the log when capsuled's main thread stops turning, and
 * where the kernel holds it.
 *
 * A blocked event loop is silent by nature: no timer fires, no log line is written (pino's
 * default destination writes through the libuv thread pool, from the main thread's queue), TLS
 * handshakes wait in the accept queue. So the watch runs in a worker thread: the main thread
 * beats a shared counter every {@link BEAT_MS}; when the beat is older than the threshold the
 * worker reads the main thread's kernel state (/proc/self/task/PID: state, wchan, the syscall
 * it is in, and the kernel stack when readable, i.e. as root) and writes one JSON line to
 * stderr synchronously (capsuled's log in the lab and under systemd). When the loop turns
 * again the main thread logs how long it was blocked. The worker holds no native handle, so
 * terminating it (or exiting with it running) is safe; it never keeps the process alive.
 */
import { Worker } from "node:worker_threads";
import type { Logger } from "pino";

/** BEAT_MS is how often the main thread beats. */
export const BEAT_MS = 250;

/** StallWatchOptions: all optional. */
export interface StallWatchOptions {
  /** thresholdMs: a beat older than this is a stall (default 2000). */
  thresholdMs?: number;
  /** fd receives the worker's lines (default 2, stderr). */
  fd?: number;
}

/** StallWatch is a running watchdog. */
export interface StallWatch {
  stop(): void;
}

// CommonJS, evaluated: the same code runs from dist and from the TypeScript sources.
const WORKER = `
const { workerData } = require("node:worker_threads");
const { readFileSync, writeSync } = require("node:fs");
const beat = new Int32Array(workerData.sab);
const task = "/proc/self/task/" + workerData.tid + "/";
const read = (f) => { try { return readFileSync(task + f, "utf8").trim(); } catch { return ""; } };
let last = Atomics.load(beat, 0), since = Date.now(), reported = 0;
setInterval(() => {
  const b = Atomics.load(beat, 0);
  const now = Date.now();
  if (b !== last) { last = b; since = now; reported = 0; return; }
  const blocked = now - since;
  // Once at the threshold, then every 10 s while it lasts.
  if (blocked < workerData.thresholdMs || (reported && blocked - reported < 10000)) return;
  reported = blocked;
  const stat = read("stat");
  const line = {
    level: 40, time: now, pid: process.pid, capsule: workerData.name,
    blockedMs: blocked,
    state: stat.slice(stat.lastIndexOf(")") + 2, stat.lastIndexOf(")") + 3),
    wchan: read("wchan"), syscall: read("syscall"),
    kernelStack: read("stack").split("\\n").map((l) => l.replace(/^\\[<0>\\] /, "")).filter(Boolean).slice(0, 12),
    msg: "event loop blocked: the main thread has not turned for " + blocked + " ms",
  };
  try { writeSync(workerData.fd, JSON.stringify(line) + "\\n"); } catch {}
}, ${BEAT_MS}); // keeps the worker alive; the worker itself is unref'd
`;

/**
 * watchStalls starts the watchdog (see the module comment); `log` gets the line when a stall
 * ends. Never throws: when a worker cannot start, there is no watchdog and a warning says so.
 */
export function watchStalls(log: Logger, opts: StallWatchOptions = {}): StallWatch {
  const thresholdMs = opts.thresholdMs ?? 2_000;
  const sab = new SharedArrayBuffer(4);
  const beat = new Int32Array(sab);
  let worker: Worker | undefined;
  try {
    const name = (log.bindings() as { capsule?: string }).capsule ?? "";
    worker = new Worker(WORKER, {
      eval: true,
      workerData: { sab, tid: process.pid, thresholdMs, fd: opts.fd ?? 2, name },
      stdout: false,
      stderr: false,
    });
    worker.unref();
    worker.on("error", (e) => log.warn({ err: e.message }, "event-loop stall watchdog stopped"));
  } catch (e) {
    log.warn({ err: (e as Error).message }, "event-loop stall watchdog not started");
  }
  let last = performance.now();
  const timer = setInterval(() => {
    const now = performance.now();
    const late = now - last - BEAT_MS;
    last = now;
    Atomics.add(beat, 0, 1);
    if (late >= thresholdMs) log.warn({ blockedMs: Math.round(late) }, "event loop was blocked");
  }, BEAT_MS);
  timer.unref();
  return {
    stop() {
      clearInterval(timer);
      void worker?.terminate();
      worker = undefined;
    },
  };
}
