import { hostname } from "node:os";
import { isIP } from "node:net";
import { splitHostPort } from "../api/client.js";
import { invalidArgument } from "../errors.js";
import { parseDuration } from "./duration.js";

/** DaemonConfig is capsuled's validated configuration (contract: ../shared/CONTRACT.md). */
export interface DaemonConfig {
  name: string;
  stateDir: string;
  listen: { host: string; port: number };
  fabricIface: string;
  fabricPort: number;
  /** endpoint is where peers dial us for WireGuard; undefined = behind NAT. */
  endpoint: { host: string; port: number } | undefined;
  claimWindowMs: number;
  metrics: { host: string; port: number } | undefined;
  logLevel: "trace" | "debug" | "info" | "warn" | "error" | "fatal";
  edge: boolean;
  acmeCa: string;
  /** acmeCaRoot is a PEM file of extra roots to trust for the ACME directory (a lab or LAN CA). */
  acmeCaRoot: string | undefined;
  /** acmeEmail is the ACME account contact; unset = none. */
  acmeEmail: string | undefined;
  publicAddress: string | undefined;
  /** fabric is false with --no-fabric (API-only: tests on loopback, hosts without WireGuard). */
  fabric: boolean;
}

/** DaemonFlags are the raw flag values as parsed from the command line (all optional). */
export interface DaemonFlags {
  name?: string;
  stateDir?: string;
  listen?: string;
  fabricIface?: string;
  fabricPort?: string;
  endpoint?: string;
  claimWindow?: string;
  metrics?: string;
  logLevel?: string;
  edge?: boolean;
  acmeCa?: string;
  acmeCaRoot?: string;
  acmeEmail?: string;
  publicAddress?: string;
  /** fabric: commander sets false for --no-fabric. */
  fabric?: boolean;
}

/** LETS_ENCRYPT_DIRECTORY is the default ACME directory. */
export const LETS_ENCRYPT_DIRECTORY = "https://acme-v02.api.letsencrypt.org/directory";

function hostPort(flag: string, value: string, allowZero = false) {
  try {
    return splitHostPort(value, { allowZero });
  } catch {
    throw invalidArgument(flag, `"${value}" is not HOST:PORT`, `for example ${flag} 192.0.2.10:50000`);
  }
}

/** resolveConfig validates flags and applies the contract's defaults; any bad flag is named in the error. */
export function resolveConfig(f: DaemonFlags): DaemonConfig {
  const name = f.name ?? hostname().split(".")[0] ?? "capsule";
  if (!/^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$/i.test(name)) {
    throw invalidArgument(
      "--name",
      `"${name}" is not a valid capsule name`,
      "use letters, digits and inner dashes",
    );
  }
  const iface = f.fabricIface ?? "capsule0";
  if (!/^[A-Za-z0-9_.-]{1,15}$/.test(iface)) {
    throw invalidArgument(
      "--fabric-iface",
      `"${iface}" is not a valid interface name`,
      "at most 15 characters",
    );
  }
  const fabricPort = Number(f.fabricPort ?? "51820");
  if (!Number.isInteger(fabricPort) || fabricPort < 1 || fabricPort > 65535) {
    throw invalidArgument("--fabric-port", `"${f.fabricPort}" is not a port`, "use 1-65535");
  }
  const levels = ["trace", "debug", "info", "warn", "error", "fatal"] as const;
  const logLevel = (f.logLevel ?? "info") as DaemonConfig["logLevel"];
  if (!levels.includes(logLevel))
    throw invalidArgument("--log-level", `"${f.logLevel}"`, `use one of ${levels.join(", ")}`);
  const endpoint = f.endpoint ? hostPort("--endpoint", f.endpoint) : undefined;
  const acmeCa = f.acmeCa ?? LETS_ENCRYPT_DIRECTORY;
  if (acmeCa !== "internal" && !/^https?:\/\//.test(acmeCa)) {
    throw invalidArgument(
      "--acme-ca",
      `"${acmeCa}" is neither a URL nor "internal"`,
      "give the ACME directory URL",
    );
  }
  if (f.acmeCaRoot !== undefined && !f.acmeCaRoot.startsWith("/"))
    throw invalidArgument(
      "--acme-ca-root",
      `"${f.acmeCaRoot}" is not an absolute path`,
      "give the PEM file's full path",
    );
  if (f.acmeEmail !== undefined && !/^[^\s@]+@[^\s@]+\.[^\s@]+$/.test(f.acmeEmail))
    throw invalidArgument("--acme-email", `"${f.acmeEmail}" is not an email address`);
  if (f.publicAddress && !isIP(f.publicAddress)) {
    throw invalidArgument("--public-address", `"${f.publicAddress}" is not an IP address`);
  }
  return {
    name,
    stateDir: f.stateDir ?? "/var/lib/capsule",
    listen: hostPort("--listen", f.listen ?? "0.0.0.0:50000", true),
    fabricIface: iface,
    fabricPort,
    endpoint,
    claimWindowMs: parseDuration(f.claimWindow ?? "30m", "--claim-window"),
    metrics: f.metrics ? hostPort("--metrics", f.metrics, true) : undefined,
    logLevel,
    edge: f.edge ?? false,
    acmeCa,
    acmeCaRoot: f.acmeCaRoot,
    acmeEmail: f.acmeEmail,
    publicAddress: f.publicAddress ?? endpoint?.host,
    fabric: f.fabric ?? true,
  };
}
