import { CapsuleError, ErrorCode } from "../errors.js";
import type { Clock } from "./host/clock.js";
import type { Store } from "./store/store.js";

/**
 * ClaimWindow is the one chance to enroll the first operator: open while there are zero
 * operator keys and the timer (from first start) runs; closed for good once it expires or an
 * operator is enrolled. Both facts are persisted, so a restart never reopens it.
 */
export class ClaimWindow {
  constructor(
    private readonly store: Store,
    private readonly clock: Clock,
    private readonly windowMs: number,
  ) {
    if (!store.getMeta("claim_opened_at")) store.setMeta("claim_opened_at", String(clock.now()));
  }

  /** closesAt is when the window closes (ms since epoch), or undefined when already closed. */
  closesAt(): number | undefined {
    if (!this.isOpen()) return undefined;
    return Number(this.store.getMeta("claim_opened_at")) + this.windowMs;
  }

  /** isOpen reports whether a Claim would be accepted now; it records a closing it observes. */
  isOpen(): boolean {
    if (this.store.getMeta("claim_closed")) return false;
    const opened = Number(this.store.getMeta("claim_opened_at"));
    if (this.store.operatorCount() > 0 || this.clock.now() >= opened + this.windowMs) {
      this.close();
      return false;
    }
    return true;
  }

  /** close closes the window for good (idempotent). */
  close(): void {
    if (!this.store.getMeta("claim_closed"))
      this.store.setMeta("claim_closed", new Date(this.clock.now()).toISOString());
  }

  /** assertOpen throws CAPSULE_CLAIM_CLOSED with the way forward when the window is closed. */
  assertOpen(): void {
    if (!this.isOpen()) {
      throw new CapsuleError(
        ErrorCode.ClaimClosed,
        "claim window is closed: this capsule already has its operators",
        {
          hint: "ask an adopted operator to add your key (capsulectl operator add), or reset the capsule's state dir to claim it anew",
        },
      );
    }
  }
}
