/**
 * A one-shot request over a unix stream socket: write one command line, read until the peer
 * closes. HAProxy's stats and master CLI sockets work that way (non-interactive mode).
 */
import { createConnection } from "node:net";
import { CapsuleError, ErrorCode } from "../errors.js";

/**
 * unixCommand sends `command` + "\n" to the unix socket at `path` and returns everything it
 * answers until it closes. Bounded: throws CAPSULE_TIMEOUT after `timeoutMs`, and
 * CAPSULE_UNREACHABLE when the socket refuses or does not exist.
 */
export function unixCommand(path: string, command: string, timeoutMs: number): Promise<string> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    const sock = createConnection({ path });
    const timer = setTimeout(() => {
      sock.destroy();
      reject(
        new CapsuleError(ErrorCode.Timeout, `${path}: "${command}" got no answer within ${timeoutMs} ms`),
      );
    }, timeoutMs);
    sock.on("connect", () => sock.end(`${command}\n`));
    sock.on("data", (d: Buffer) => chunks.push(d));
    sock.on("error", (e) => {
      clearTimeout(timer);
      reject(new CapsuleError(ErrorCode.Unreachable, `${path}: ${e.message}`, { cause: e }));
    });
    sock.on("close", () => {
      clearTimeout(timer);
      resolve(Buffer.concat(chunks).toString("utf8"));
    });
  });
}
