/**
 * KeyedLock runs one operation per key at a time, in call order: a run and a stop racing on one
 * container or VM id would otherwise each act on what the other is changing. A failed operation
 * does not block the next. Entries are dropped when their queue empties.
 */
export class KeyedLock {
  private readonly tails = new Map<string, Promise<unknown>>();

  /** run calls `fn` once every earlier operation on `key` has settled, and returns its result. */
  run<T>(key: string, fn: () => Promise<T>): Promise<T> {
    const prev = this.tails.get(key) ?? Promise.resolve();
    const run = prev.then(fn, fn);
    const tail = run.catch(() => undefined);
    this.tails.set(key, tail);
    void tail.then(() => {
      if (this.tails.get(key) === tail) this.tails.delete(key);
    });
    return run;
  }
}
