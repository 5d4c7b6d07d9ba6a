#!/usr/bin/env node
/**
 * capsulectl entry point. All behaviour lives in {@link run} (program.ts) so tests drive it
 * in-process; this file only runs it when executed and sets the exit code.
 */
import { realpathSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { run } from "./program.js";

export { run };

function isEntryPoint(): boolean {
  const entry = process.argv[1];
  if (!entry) return false;
  try {
    // npm bin links are symlinks: compare real paths.
    return realpathSync(entry) === realpathSync(fileURLToPath(import.meta.url));
  } catch {
    return false;
  }
}

if (isEntryPoint()) {
  // `capsulectl ... | head` closes the pipe early: that is the reader's choice, not a crash.
  for (const stream of [process.stdout, process.stderr]) {
    stream.on("error", (e: NodeJS.ErrnoException) => {
      if (e.code !== "EPIPE") throw e;
      process.exit();
    });
  }
  process.exitCode = await run(process.argv.slice(2));
  // The answer is printed; nothing may keep the command alive now. RpcClient.close() ends
  // connections stuck in their TLS handshake (see ClosingCredentials in src/api/client.ts), but
  // grpc-js keeps two phases out of reach: the TCP connect (a target dropped at its deadline
  // while its SYN goes unanswered, e.g. a host that is off behind a dropping firewall, holds a
  // socket until the kernel gives up, about two minutes) and the wait for HTTP/2 SETTINGS after
  // the handshake. Unref'd, so a clean exit is not delayed by it; stdout and stderr are
  // synchronous for files and pipes on POSIX, so nothing printed is lost.
  setTimeout(() => process.exit(), 200).unref();
}
