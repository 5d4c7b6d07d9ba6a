/**
 * The transparent hand-off from HAProxy to Caddy on an edge.
 *
 * HAProxy owns the public HTTPS port and passes every connection it does not route by SNI to
 * Caddy's TLS listener on {@link CADDY_INTERNAL_HOST} (a loopback address nothing else uses).
 * Caddy 2.6 has no PROXY-protocol listener, so HAProxy connects with the visitor's own address
 * as source (`source 0.0.0.0 usesrc clientip`, IP_TRANSPARENT): Caddy then sees the visitor as
 * the remote address and sets X-Forwarded-For from it.
 *
 * Caddy's replies go to the visitor's address, which the main table routes out of the uplink
 * with a loopback source (dropped). One ip rule sends everything *from* the internal address to
 * a table whose only route is `local 0.0.0.0/0 dev lo`, so those replies are delivered locally
 * to HAProxy's transparent socket. The rule matches on the source address rather than an nft
 * fwmark on purpose: the SYN-ACK's route is looked up before any output hook runs, and that
 * first lookup already fails for a loopback source leaving a non-loopback device
 * (IpOutNoRoutes / ListenDrops, seen in the prototype), so a mark set later is too late.
 *
 * {@link planHandoff} is pure; {@link Handoff} applies it idempotently (reads first, changes
 * only what differs).
 */
import type { CommandRunner } from "../node/host/runner.js";

/** CADDY_INTERNAL_HOST is the loopback address Caddy's TLS listener binds (127/8 is local on lo). */
export const CADDY_INTERNAL_HOST = "127.0.44.3";
/** HANDOFF_TABLE is the routing table of the hand-off (its only route: local 0.0.0.0/0 dev lo). */
export const HANDOFF_TABLE = 5160;
/** HANDOFF_PRIORITY is the ip rule's priority: after `local` (0), before main (32766) and the visitor return path (5163). */
export const HANDOFF_PRIORITY = 5160;

/** HandoffPlan is the rule and route as `ip` prints them. */
export interface HandoffPlan {
  rule: string;
  route: string;
}

/** planHandoff returns the rule and route text as `ip -4 rule/route show` prints them. Pure. */
export function planHandoff(): HandoffPlan {
  return {
    rule: `${HANDOFF_PRIORITY}:\tfrom ${CADDY_INTERNAL_HOST} lookup ${HANDOFF_TABLE}`,
    route: "local default dev lo scope host",
  };
}

/** Handoff installs and removes the hand-off's rule and route through the runner. */
export class Handoff {
  constructor(private readonly runner: CommandRunner) {}

  /** ensure installs the rule and route; idempotent (no change when both are there as planned). */
  async ensure(): Promise<void> {
    const want = planHandoff();
    const rules = (
      await this.runner.run(["ip", "-4", "rule", "show", "priority", String(HANDOFF_PRIORITY)])
    ).stdout
      .split("\n")
      .map((l) => l.trim().replace(/\s+/g, " "))
      .filter(Boolean);
    const wantRule = want.rule.replace(/\s+/g, " ");
    if (rules.length !== 1 || rules[0] !== wantRule) {
      // Anything else at our priority is a stale version of ours: replace it.
      for (let i = 0; i < rules.length; i++)
        await this.runner.run(["ip", "-4", "rule", "del", "priority", String(HANDOFF_PRIORITY)]);
      await this.runner.run([
        "ip",
        "-4",
        "rule",
        "add",
        "priority",
        String(HANDOFF_PRIORITY),
        "from",
        CADDY_INTERNAL_HOST,
        "lookup",
        String(HANDOFF_TABLE),
      ]);
    }
    const routes = (
      await this.runner.run(["ip", "-4", "route", "show", "table", String(HANDOFF_TABLE)], {
        allowFailure: true,
      })
    ).stdout.trim();
    if (routes.replace(/\s+/g, " ") !== want.route)
      await this.runner.run([
        "ip",
        "-4",
        "route",
        "replace",
        "local",
        "0.0.0.0/0",
        "dev",
        "lo",
        "table",
        String(HANDOFF_TABLE),
      ]);
  }

  /** remove deletes the rule and flushes the table; idempotent. */
  async remove(): Promise<void> {
    for (let i = 0; i < 8; i++) {
      const r = await this.runner.run(["ip", "-4", "rule", "del", "priority", String(HANDOFF_PRIORITY)], {
        allowFailure: true,
      });
      if (r.exitCode !== 0) break;
    }
    await this.runner.run(["ip", "-4", "route", "flush", "table", String(HANDOFF_TABLE)], {
      allowFailure: true,
    });
  }
}
