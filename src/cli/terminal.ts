/**
 * Terminal: what interactive commands (`workload exec -t -i`) need of the user's terminal:
 * its size, raw mode with a guaranteed restore, and the signals that change or end a session.
 * {@link processTerminal} is the real one; {@link FakeTerminal} the test double.
 */
import type { ReadStream } from "node:tty";

/** TerminalSize is a size in character cells. */
export interface TerminalSize {
  rows: number;
  cols: number;
}

/** Terminal is the seam over the process's terminal; every method is safe when there is none. */
export interface Terminal {
  /** size is stdout's terminal size; undefined when stdout is not a terminal. */
  size(): TerminalSize | undefined;
  /**
   * raw puts stdin in raw mode (every key, Ctrl-C included, is read as a byte) when it is a
   * terminal, and returns the restore. Restoring is idempotent and also happens when the
   * process exits without it.
   */
  raw(): () => void;
  /** onResize calls `fn` whenever the terminal changes size (SIGWINCH); returns the undo. */
  onResize(fn: () => void): () => void;
  /** onTerminate calls `fn` on SIGTERM and SIGHUP instead of dying at once; returns the undo. */
  onTerminate(fn: () => void): () => void;
}

/** processTerminal is the real {@link Terminal}: process.stdin, process.stdout and the process's signals. */
export function processTerminal(): Terminal {
  const on = (signals: NodeJS.Signals[], fn: () => void) => {
    for (const s of signals) process.on(s, fn);
    return () => {
      for (const s of signals) process.removeListener(s, fn);
    };
  };
  return {
    size: () => {
      const out = process.stdout;
      return out.isTTY && out.rows > 0 && out.columns > 0 ? { rows: out.rows, cols: out.columns } : undefined;
    },
    raw: () => {
      const stdin = process.stdin as Partial<ReadStream>;
      if (!stdin.isTTY || typeof stdin.setRawMode !== "function") return () => {};
      stdin.setRawMode(true);
      let restored = false;
      const restore = () => {
        if (restored) return;
        restored = true;
        try {
          stdin.setRawMode?.(false);
        } catch {
          // The terminal is gone (hung up): nothing left to restore.
        }
      };
      process.once("exit", restore);
      return () => {
        process.removeListener("exit", restore);
        restore();
      };
    },
    onResize: (fn) => on(["SIGWINCH"], fn),
    onTerminate: (fn) => on(["SIGTERM", "SIGHUP"], fn),
  };
}

/**
 * FakeTerminal is a scriptable {@link Terminal}: `current` is the size it reports, `resize()`
 * changes it and fires the resize handlers, `terminate()` fires the terminate handlers, and
 * `events` records `raw on`, `raw off`.
 */
export class FakeTerminal implements Terminal {
  readonly events: string[] = [];
  current: TerminalSize | undefined;
  private readonly resizers = new Set<() => void>();
  private readonly terminators = new Set<() => void>();

  constructor(size?: TerminalSize) {
    this.current = size;
  }

  size(): TerminalSize | undefined {
    return this.current;
  }

  raw(): () => void {
    this.events.push("raw on");
    let done = false;
    return () => {
      if (done) return;
      done = true;
      this.events.push("raw off");
    };
  }

  onResize(fn: () => void): () => void {
    this.resizers.add(fn);
    return () => this.resizers.delete(fn);
  }

  onTerminate(fn: () => void): () => void {
    this.terminators.add(fn);
    return () => this.terminators.delete(fn);
  }

  /** resize changes the size and tells every resize handler. */
  resize(size: TerminalSize): void {
    this.current = size;
    for (const f of [...this.resizers]) f();
  }

  /** terminate fires the terminate handlers, as SIGTERM would. */
  terminate(): void {
    for (const f of [...this.terminators]) f();
  }

  /** listeners counts the handlers still installed (0 after a clean end). */
  get listeners(): number {
    return this.resizers.size + this.terminators.size;
  }
}
