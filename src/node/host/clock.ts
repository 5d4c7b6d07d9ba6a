/** Clock is the time seam: real time in production, {@link FakeClock} in tests. */
export interface Clock {
  /** now returns milliseconds since the Unix epoch. */
  now(): number;
  /** sleep resolves after `ms` milliseconds of this clock's time. */
  sleep(ms: number): Promise<void>;
}

/** SystemClock is the real clock. */
export class SystemClock implements Clock {
  now(): number {
    return Date.now();
  }
  sleep(ms: number): Promise<void> {
    return new Promise((r) => setTimeout(r, ms).unref?.());
  }
}

/** FakeClock is a manual clock for tests: time moves only through {@link FakeClock.advance}. */
export class FakeClock implements Clock {
  private t: number;
  private waiters: { at: number; resolve: () => void }[] = [];

  constructor(start = Date.UTC(2026, 0, 1)) {
    this.t = start;
  }
  now(): number {
    return this.t;
  }
  sleep(ms: number): Promise<void> {
    return new Promise((resolve) => {
      this.waiters.push({ at: this.t + ms, resolve });
    });
  }
  /** advance moves time forward by `ms` and wakes every sleeper whose time has come. */
  advance(ms: number): void {
    this.t += ms;
    const due = this.waiters.filter((w) => w.at <= this.t);
    this.waiters = this.waiters.filter((w) => w.at > this.t);
    for (const w of due) w.resolve();
  }
}
