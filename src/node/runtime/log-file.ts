/**
 * followLog: read a workload's log file (a container's shim output, a microVM's serial
 * console) from its start, and optionally keep reading as it grows.
 */
import { open } from "node:fs/promises";
import { StringDecoder } from "node:string_decoder";
import type { Clock } from "../host/clock.js";

/** FollowLogOptions: all optional. `follow` keeps reading as the file grows until `signal` aborts; `pollMs` unset = 250. */
export interface FollowLogOptions {
  follow?: boolean;
  signal?: AbortSignal;
  pollMs?: number;
}

/**
 * followLog yields the text of the file at `path` from its start. Without `follow` it ends at
 * the end of the file; with it, it waits for more until `signal` aborts (a truncated file is
 * read again from its start). While the file does not exist yet, `missing` decides: it throws
 * (the log's owner does not exist either) or returns normally (keep waiting). Read-only.
 */
export async function* followLog(
  path: string,
  clock: Clock,
  opts: FollowLogOptions,
  missing: () => Promise<void>,
): AsyncGenerator<string> {
  const decoder = new StringDecoder("utf8");
  const buf = Buffer.alloc(64 * 1024);
  let pos = 0;
  let seen = false;
  for (;;) {
    let n = 0;
    const fh = await open(path, "r").catch((e: NodeJS.ErrnoException) => {
      if (e.code === "ENOENT") return undefined;
      throw e;
    });
    if (fh) {
      seen = true;
      try {
        const size = (await fh.stat()).size;
        if (size < pos) pos = 0;
        n = (await fh.read(buf, 0, buf.length, pos)).bytesRead;
      } finally {
        await fh.close();
      }
    } else if (!seen) {
      await missing();
    }
    if (n > 0) {
      pos += n;
      const s = decoder.write(buf.subarray(0, n));
      if (s) yield s;
      continue;
    }
    if (!opts.follow || opts.signal?.aborted) {
      const rest = decoder.end();
      if (rest) yield rest;
      return;
    }
    await clock.sleep(opts.pollMs ?? 250);
    if (opts.signal?.aborted) return;
  }
}
