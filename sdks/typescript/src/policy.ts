/**
 * The policy builders of the seed's example: `resources()`, `network()`, `secret()`,
 * with the validation and messages of Python's `mvm.sdk.policy`. They validate at the
 * call, so a typo fails where it was written, naming the field and the allowed values.
 *
 * Field names in errors are the wire/IR names (`resources.memory_mb`,
 * `network.allow['x']`) — the same strings the Python SDK and `mvmctl run --mode plan`
 * print. Options accept camelCase (`memoryMb`) or the Python spelling (`memory_mb`).
 */

import { BlockList, isIP } from "node:net";

import { createDefaults } from "./defaults.js";
import { InvalidArgument, InvalidNetworkPolicy } from "./errors.js";
import { kindOf, shown } from "./shown.js";

/** Bounds a sandbox may ask for (the host policy of `mvmctl run --mode plan` may be tighter). */
export const LIMITS = {
  cpu_cores: [0.1, 64],
  memory_mb: [64, 262144],
  rootfs_size_mb: [64, 1048576],
  max_processes: [8, 65536],
} as const;
export const NETWORK_MODES = ["deny", "allow", "open"] as const;
export type NetworkMode = (typeof NETWORK_MODES)[number];
/**
 * The guest's name for the host's own loopback (127.0.0.1) in mode `allow`, through the
 * egress proxy, for ports listed as `host.mvm.internal:PORT` (the guest's 127.0.0.1 is the guest).
 */
export const HOST_ALIAS = "host.mvm.internal";

const HOST_RE = /^(?=.{1,253}$)[A-Za-z0-9*]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*$/;
const SECRET_NAME_RE = /^[A-Za-z0-9_.-]{1,128}$/;
const SECRET_ALLOWED = "1-128 characters from A-Z a-z 0-9 _ . -";

/** Limits the backend enforces: CPU, memory, writable disk, process count. Build with `resources()`. */
export class Resources {
  /** @internal use `resources()` */
  constructor(
    readonly cpuCores: number,
    readonly memoryMb: number,
    readonly rootfsSizeMb: number,
    readonly maxProcesses: number,
  ) {
    Object.freeze(this);
  }

  /** The wire/IR form (Python's `Resources` dataclass fields). */
  toDict(): { cpu_cores: number; memory_mb: number; rootfs_size_mb: number; max_processes: number } {
    return {
      cpu_cores: this.cpuCores, memory_mb: this.memoryMb, rootfs_size_mb: this.rootfsSizeMb,
      max_processes: this.maxProcesses,
    };
  }

  static fromDict(raw: Record<string, unknown>): Resources {
    return new Resources(Number(raw.cpu_cores ?? 0), Number(raw.memory_mb ?? 0), Number(raw.rootfs_size_mb ?? 0),
      Number(raw.max_processes ?? 0));
  }
}

export interface ResourcesOptions {
  cpuCores?: number;
  memoryMb?: number;
  rootfsSizeMb?: number;
  maxProcesses?: number;
  /** Python spellings, accepted too. */
  cpu_cores?: number;
  memory_mb?: number;
  rootfs_size_mb?: number;
  max_processes?: number;
}

const RESOURCE_KEYS: Record<string, keyof typeof LIMITS> = {
  cpuCores: "cpu_cores", memoryMb: "memory_mb", rootfsSizeMb: "rootfs_size_mb", maxProcesses: "max_processes",
  cpu_cores: "cpu_cores", memory_mb: "memory_mb", rootfs_size_mb: "rootfs_size_mb", max_processes: "max_processes",
};

/**
 * CPU, memory, writable disk and process limits.
 *
 * ```ts
 * resources({ cpuCores: 1, memoryMb: 512, rootfsSizeMb: 1024 })
 * ```
 */
export function resources(options: ResourcesOptions = {}): Resources {
  const values: Record<keyof typeof LIMITS, unknown> = { ...createDefaults().resources }; // Python's, for what is not asked
  for (const [key, value] of Object.entries(options ?? {})) {
    const field = RESOURCE_KEYS[key];
    if (field === undefined) {
      throw InvalidArgument.create("resources", `unknown option ${shown(key)}`,
        ["cpuCores", "memoryMb", "rootfsSizeMb", "maxProcesses"]);
    }
    if (value !== undefined) values[field] = value;
  }
  for (const field of Object.keys(LIMITS) as (keyof typeof LIMITS)[]) {
    const value = values[field];
    const [low, high] = LIMITS[field];
    if (typeof value !== "number" || Number.isNaN(value)) {
      throw InvalidArgument.create(`resources.${field}`, `${shown(value)} is not a number`, `${low}..${high}`);
    }
    if (field !== "cpu_cores" && !Number.isInteger(value)) {
      throw InvalidArgument.create(`resources.${field}`, `${shown(value)} must be a whole number`, `${low}..${high}`);
    }
    if (!(low <= value && value <= high)) {
      throw InvalidArgument.create(`resources.${field}`, `${shown(value)} is out of range`, `${low}..${high}`);
    }
  }
  return new Resources(values.cpu_cores as number, values.memory_mb as number, values.rootfs_size_mb as number,
    values.max_processes as number);
}

/** The sandbox's network policy. Build with `network()`. */
export class NetworkPolicy {
  readonly allow: readonly string[];

  /** @internal use `network()` */
  constructor(
    readonly mode: NetworkMode,
    allow: readonly string[],
    readonly allowWildcards: boolean,
  ) {
    this.allow = Object.freeze([...allow]);
    if (new.target === NetworkPolicy) Object.freeze(this); // a subclass (NetworkInfo) freezes itself
  }

  /** The wire/IR form (`{mode, allow, allow_wildcards}`). */
  toDict(): { mode: NetworkMode; allow: string[]; allow_wildcards: boolean } {
    return { mode: this.mode, allow: [...this.allow], allow_wildcards: this.allowWildcards };
  }

  static fromDict(raw: Record<string, unknown>): NetworkPolicy {
    return new NetworkPolicy((raw.mode ?? "deny") as NetworkMode, Array.isArray(raw.allow) ? (raw.allow as string[]) : [],
      Boolean(raw.allow_wildcards));
  }
}

export interface NetworkOptions {
  mode?: NetworkMode;
  allow?: readonly string[];
  /** Accept `*`, `0.0.0.0`, `::` and CIDR destinations (refused otherwise). */
  allowWildcards?: boolean;
  /** Python spelling, accepted too. */
  allow_wildcards?: boolean;
}

/**
 * The sandbox's network: `deny` (default: no interface at all but loopback),
 * `allow` (egress only to `host:port` entries, through mvm's egress proxy), or
 * `open` (full outbound access: an explicit opt-in).
 *
 * The host's own loopback services are `host.mvm.internal:PORT`, listed explicitly;
 * `127.0.0.1`/`localhost` entries are refused (in the guest they are the guest itself).
 *
 * ```ts
 * network({ mode: "deny" })
 * network({ mode: "allow", allow: ["host.mvm.internal:11434"] }) // http://host.mvm.internal:11434
 * network({ mode: "allow", allow: ["pypi.org:443", "files.pythonhosted.org:443"] })
 * network("allow", ["pypi.org:443"])
 * ```
 */
export function network(mode?: NetworkMode | NetworkOptions, allow?: readonly string[],
  options: { allowWildcards?: boolean } = {}): NetworkPolicy {
  let opts: NetworkOptions;
  if (typeof mode === "object" && mode !== null && !Array.isArray(mode)) {
    opts = mode;
  } else {
    opts = { mode: mode as NetworkMode, allow, allowWildcards: options.allowWildcards };
  }
  const chosen: unknown = opts.mode ?? createDefaults().network.mode; // Python's default mode
  const entriesRaw: unknown = opts.allow ?? [];
  const wildcards = Boolean(opts.allowWildcards ?? opts.allow_wildcards ?? false);
  if (typeof chosen !== "string" || !(NETWORK_MODES as readonly string[]).includes(chosen)) {
    throw InvalidNetworkPolicy.create("network.mode", `unknown mode ${shown(chosen)}`, [...NETWORK_MODES]);
  }
  if (typeof entriesRaw === "string") {
    throw InvalidNetworkPolicy.create("network.allow", "must be a list of 'host:port' strings, not one string");
  }
  if (!Array.isArray(entriesRaw)) {
    throw InvalidNetworkPolicy.create("network.allow", `${kindOf(entriesRaw)} is not a list of 'host:port' strings`);
  }
  const entries = entriesRaw as unknown[];
  if (chosen !== "allow" && entries.length) {
    throw InvalidNetworkPolicy.create("network.allow", `an allow-list needs mode='allow' (mode is ${shown(chosen)})`);
  }
  if (chosen === "allow" && !entries.length) {
    throw InvalidNetworkPolicy.create("network.allow", "mode='allow' needs at least one 'host:port' entry");
  }
  for (const entry of entries) validateDestination(entry, wildcards);
  return new NetworkPolicy(chosen as NetworkMode, entries as string[], wildcards);
}

function validateDestination(entry: unknown, allowWildcards: boolean): void {
  const field = `network.allow[${shown(entry)}]`;
  if (typeof entry !== "string" || !entry.includes(":")) {
    throw InvalidNetworkPolicy.create(field, "must be 'host:port'", "e.g. 'pypi.org:443'");
  }
  const cut = entry.lastIndexOf(":");
  const host = entry.slice(0, cut).replace(/^[[\]]+|[[\]]+$/g, "");
  const portText = entry.slice(cut + 1);
  if (!/^[0-9]+$/.test(portText) || !(1 <= parseInt(portText, 10) && parseInt(portText, 10) <= 65535)) {
    throw InvalidNetworkPolicy.create(field, `port ${shown(portText)} is not valid`, "1..65535");
  }
  if (isLoopback(host)) {
    // Python's message word for word
    throw InvalidNetworkPolicy.create(field, `${host} is the sandbox's own loopback, not the host's; to reach a `
      + `service on the host's 127.0.0.1 allow '${HOST_ALIAS}:${portText}' and connect to ${HOST_ALIAS}:${portText} `
      + "(through the egress proxy the guest's HTTP_PROXY points at)", `'${HOST_ALIAS}:${portText}'`);
  }
  const wildcard = host.includes("*") || host === "0.0.0.0" || host === "::" || host.includes("/");
  if (wildcard && !allowWildcards) {
    // Python's message word for word (the option is `allowWildcards` here)
    throw InvalidNetworkPolicy.create(field, "wildcards are refused unless allow_wildcards is true");
  }
  if (host.includes("/")) {
    if (!validNetwork(host)) throw InvalidNetworkPolicy.create(field, `${shown(host)} is not a valid network`);
    return;
  }
  if (isIP(host)) return;
  if (!HOST_RE.test(host)) throw InvalidNetworkPolicy.create(field, `${shown(host)} is not a valid host name`);
}

/** `localhost`, a loopback address or a block inside the loopback range (as Python's `_is_loopback`). */
function isLoopback(host: string): boolean {
  if (host.toLowerCase().replace(/\.$/, "") === "localhost") return true;
  const [address, prefix] = host.split("/");
  const version = isIP(address);
  if (version === 4) {
    if (address.split(".")[0] !== "127") return false;
    if (prefix === undefined) return true;
    const bits = /^[0-9]+$/.test(prefix) ? parseInt(prefix, 10) : NaN;
    return bits >= 8 && bits <= 32 && validNetwork(host);
  }
  if (version === 6) {
    const loopback = new BlockList();
    loopback.addAddress("::1", "ipv6");
    loopback.addSubnet("127.0.0.0", 8, "ipv4");
    if (prefix === undefined) return loopback.check(address, "ipv6");
    return prefix === "128" && loopback.check(address, "ipv6");
  }
  return false;
}

function validNetwork(text: string): boolean {
  const parts = text.split("/");
  if (parts.length !== 2) return false;
  const [address, prefix] = parts;
  const version = isIP(address);
  if (!version) return false;
  const bits = version === 4 ? 32 : 128;
  if (/^[0-9]+$/.test(prefix)) return parseInt(prefix, 10) <= bits;
  if (version === 4 && isIP(prefix) === 4) {
    // a netmask (255.255.0.0) or, as Python's ipaddress also accepts, a hostmask (0.0.255.255)
    const mask = prefix.split(".").reduce((acc, octet) => acc * 256 + parseInt(octet, 10), 0);
    return contiguousNetmask(mask) || contiguousNetmask(~mask >>> 0);
  }
  return false;
}

/** `mask` (32 bits) is ones then zeros. */
function contiguousNetmask(mask: number): boolean {
  const inverted = (~mask >>> 0) + 1; // 2**k for a netmask
  return mask === 0 || (inverted & (inverted - 1)) === 0;
}

/**
 * A reference to a secret by name; holds no value. Usable as an env value: the value
 * is resolved only in live mode (keystore, then `MVM_SECRET_<NAME>`), only into the
 * env of the process that asked; recordings, plans, logs and audit entries hold the
 * name only.
 */
export class SecretRef {
  constructor(readonly name: string) {
    validateSecretName(name);
    Object.freeze(this);
  }

  /** The form used in recordings: `{secret: NAME}`. */
  toJSON(): { secret: string } {
    return { secret: this.name };
  }

  toString(): string {
    return `<secret ${this.name}>`;
  }
}

export function validateSecretName(name: unknown, field = "secret name"): string {
  if (typeof name !== "string" || !SECRET_NAME_RE.test(name)) {
    throw InvalidArgument.create(field, `${shown(name)} is not a valid secret name`, SECRET_ALLOWED);
  }
  return name;
}

/**
 * `secret("api-key")`: a reference to a host secret (`mvmctl secret set api-key`, or
 * `MVM_SECRET_API_KEY` in the environment).
 *
 * ```ts
 * env: { API_KEY: secret("api-key") }
 * ```
 */
export function secret(name: string): SecretRef {
  return new SecretRef(name);
}
