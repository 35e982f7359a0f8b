/**
 * Result types, field for field the Python SDK's `mvm.sdk.models`, in camelCase.
 * Each has `toDict()` returning the Python/wire spelling (what `mvmctl --json` prints).
 *
 * | TypeScript            | Python / wire         |
 * |-----------------------|-----------------------|
 * | `exitCode`            | `exit_code`           |
 * | `auditId`             | `audit_id`            |
 * | `durationSeconds`     | `duration_seconds`    |
 * | `stdoutBytes`/`stderrBytes` | `stdout_bytes`/`stderr_bytes` |
 * | `receiptPath`         | `receipt_path`        |
 * | `symlinkTarget`       | `symlink_target`      |
 * | `createdAt`/`expiresAt` | `created_at`/`expires_at` (seconds since the epoch) |
 * | `workloadId`          | `workload_id`         |
 * | `sandboxId`/`sizeBytes` | `sandbox_id`/`size_bytes` |
 * | `startedAt`           | `started_at`          |
 * | `hostPort`/`guestPort` | `host_port`/`guest_port` |
 * | `PortForward.totalConnections`/`failedConnections` | `total_connections`/`failed_connections` |
 * | `PortForward.bytesIn`/`bytesOut` | `bytes_in`/`bytes_out` |
 * | `Resources.cpuCores`… | `resources.cpu_cores`… |
 * | `NetworkPolicy.allowWildcards` | `network.allow_wildcards` |
 *
 * `SandboxInfo.details` is passed through as the supervisor sent it (snake_case keys).
 */

import "./polyfill.js";

import { InvalidArgument, InvalidState, SandboxError, SandboxNotFound } from "./errors.js";
import { NetworkPolicy, Resources, type NetworkMode } from "./policy.js";

type Raw = Record<string, unknown>;

function num(value: unknown, fallback = 0): number {
  return typeof value === "number" ? value : value === undefined || value === null ? fallback : Number(value);
}

function optNum(value: unknown): number | null {
  return value === undefined || value === null ? null : Number(value);
}

function optStr(value: unknown): string | null {
  return value === undefined || value === null ? null : String(value);
}

/**
 * What `commands.run` returns. `exitCode` is `null` only for a recorded (record/plan
 * mode) result, never an invented value. `truncated` says output capture hit
 * `maxOutputBytes`.
 */
export class CommandResult {
  readonly exitCode: number | null;
  readonly stdout: string;
  readonly stderr: string;
  readonly auditId: string | null;
  readonly durationSeconds: number;
  readonly truncated: boolean;
  readonly signal: number | null;
  readonly pid: number | null;
  readonly stdoutBytes: number;
  readonly stderrBytes: number;
  readonly receiptPath: string | null;
  readonly recorded: boolean;

  constructor(fields: {
    exitCode: number | null; stdout: string; stderr: string; auditId: string | null; durationSeconds: number;
    truncated?: boolean; signal?: number | null; pid?: number | null; stdoutBytes?: number; stderrBytes?: number;
    receiptPath?: string | null; recorded?: boolean;
  }) {
    this.exitCode = fields.exitCode;
    this.stdout = fields.stdout;
    this.stderr = fields.stderr;
    this.auditId = fields.auditId;
    this.durationSeconds = fields.durationSeconds;
    this.truncated = fields.truncated ?? false;
    this.signal = fields.signal ?? null;
    this.pid = fields.pid ?? null;
    this.stdoutBytes = fields.stdoutBytes ?? 0;
    this.stderrBytes = fields.stderrBytes ?? 0;
    this.receiptPath = fields.receiptPath ?? null;
    this.recorded = fields.recorded ?? false;
    Object.freeze(this);
  }

  /** `exitCode === 0`. */
  get ok(): boolean {
    return this.exitCode === 0;
  }

  toDict(): Raw {
    return {
      exit_code: this.exitCode, stdout: this.stdout, stderr: this.stderr, audit_id: this.auditId,
      duration_seconds: this.durationSeconds, truncated: this.truncated, signal: this.signal, pid: this.pid,
      stdout_bytes: this.stdoutBytes, stderr_bytes: this.stderrBytes, receipt_path: this.receiptPath,
      recorded: this.recorded,
    };
  }
}

export type FileType = "file" | "dir" | "symlink" | "other";

/** One entry of `files.list` / `files.stat`. `mtime` is seconds since the epoch. */
export class FileEntry {
  constructor(
    readonly name: string,
    readonly path: string,
    readonly type: FileType,
    readonly size: number,
    readonly mode: number,
    readonly mtime: number,
    readonly symlinkTarget: string | null = null,
  ) {
    Object.freeze(this);
  }

  static fromWire(raw: Raw): FileEntry {
    return new FileEntry(String(raw.name), String(raw.path), raw.type as FileType, Math.trunc(num(raw.size)),
      Math.trunc(num(raw.mode)), num(raw.mtime), optStr(raw.symlink_target));
  }

  get isFile(): boolean {
    return this.type === "file";
  }

  get isDir(): boolean {
    return this.type === "dir";
  }

  toDict(): Raw {
    return { name: this.name, path: this.path, type: this.type, size: this.size, mode: this.mode, mtime: this.mtime,
      symlink_target: this.symlinkTarget };
  }
}

/**
 * One line of a sandbox's log: `source` is `supervisor`, `process:<pid>`, `network`…;
 * `stream` is `stdout`/`stderr`/`system`. `timestamp` is seconds since the epoch.
 */
export class LogEvent {
  constructor(
    readonly timestamp: number,
    readonly source: string,
    readonly stream: string,
    readonly message: string,
    readonly auditId: string | null = null,
  ) {
    Object.freeze(this);
  }

  static fromWire(raw: Raw): LogEvent {
    return new LogEvent(num(raw.timestamp), String(raw.source), String(raw.stream), String(raw.message),
      optStr(raw.audit_id));
  }

  toDict(): Raw {
    return { timestamp: this.timestamp, source: this.source, stream: this.stream, message: this.message,
      audit_id: this.auditId };
  }
}

/** A process the sandbox knows (`commands.list`, `Process.info`). */
export class ProcessInfo {
  constructor(
    readonly pid: number,
    readonly argv: string[],
    readonly running: boolean,
    readonly exitCode: number | null,
    readonly startedAt: number,
  ) {
    Object.freeze(this);
  }

  static fromWire(raw: Raw): ProcessInfo {
    return new ProcessInfo(Math.trunc(num(raw.pid)), Array.isArray(raw.argv) ? (raw.argv as string[]).map(String) : [],
      Boolean(raw.running), optNum(raw.exit_code), num(raw.started_at));
  }

  toDict(): Raw {
    return { pid: this.pid, argv: this.argv, running: this.running, exit_code: this.exitCode, started_at: this.startedAt };
  }
}

/**
 * A sandbox's states (Python: `mvm.supervisor.state.STATES`). `lost`: its supervisor died;
 * `Sandbox.list()` shows it so until `mvmctl gc` removes what it left.
 */
export const SANDBOX_STATES = Object.freeze(
  ["creating", "running", "paused", "stopped", "destroyed", "error", "lost"] as const,
);
export type SandboxState = (typeof SANDBOX_STATES)[number];

/**
 * `describe()`: the sandbox's identity, state, policy and isolation facts.
 * `state` is one of `SANDBOX_STATES`; `isolation` is `vm` or `namespace`; `details`
 * holds the backend's specifics.
 */
/** Which warm pool a sandbox came from (`SandboxInfo.pool`). */
export interface PoolMembership {
  readonly id: string;
  readonly prestartedAt: number;
  readonly claimedAt: number | null;
  /** The audit entry of its pre-start (its chain then has the claim as `sandbox.create`). */
  readonly prestartAuditId: string | null;
}

/**
 * A warm pool as `pools()` reports it (Python's `mvm.PoolInfo`, `mvmctl pool ls --json`):
 * what a create must ask for to claim one of its `ready` members.
 */
export class PoolInfo {
  constructor(
    readonly id: string,
    readonly template: string,
    readonly backend: string,
    readonly resources: Resources,
    readonly network: Raw,
    readonly size: number,
    readonly ready: readonly string[],
    readonly ttlSeconds: number,
    readonly ownerPid: number | null,
    readonly refilling: boolean,
    readonly createdAt: number,
    /** The last error its refill hit (`null` after a success). */
    readonly lastError: string | null = null,
    /** `template_digest`: the template build its members were made from. */
    readonly details: Raw = {},
  ) {
    Object.freeze(this);
  }

  static fromWire(raw: Raw): PoolInfo {
    return new PoolInfo(String(raw.id), String(raw.template), String(raw.backend),
      Resources.fromDict((raw.resources ?? {}) as Raw), (raw.network ?? {}) as Raw, num(raw.size),
      Array.isArray(raw.ready) ? raw.ready.map(String) : [], num(raw.ttl_seconds), optNum(raw.owner_pid),
      raw.refilling === true, num(raw.created_at), optStr(raw.last_error), (raw.details ?? {}) as Raw);
  }
}

export class SandboxInfo {
  constructor(
    readonly id: string,
    readonly name: string,
    readonly state: SandboxState | string,
    readonly template: string,
    readonly backend: string,
    readonly isolation: string,
    readonly resources: Resources,
    readonly network: NetworkInfo,
    readonly createdAt: number,
    readonly expiresAt: number | null,
    readonly workloadId: string | null = null,
    readonly details: Raw = {},
  ) {
    Object.freeze(this);
  }

  static fromWire(raw: Raw): SandboxInfo {
    return new SandboxInfo(String(raw.id), String(raw.name), String(raw.state ?? "creating"), String(raw.template),
      String(raw.backend ?? ""), String(raw.isolation ?? ""), Resources.fromDict((raw.resources ?? {}) as Raw),
      NetworkInfo.fromWire((raw.network ?? {}) as Raw), num(raw.created_at), optNum(raw.expires_at),
      optStr(raw.workload_id), (raw.details ?? {}) as Raw);
  }

  /**
   * Set when the sandbox was a warm pool's pre-started member (`mvmctl pool up`, Python's
   * `mvm.pool`) that this create claimed: `details.pool` in camelCase; null otherwise.
   */
  get pool(): PoolMembership | null {
    const raw = this.details.pool;
    if (typeof raw !== "object" || raw === null) return null;
    const fields = raw as Raw;
    return { id: String(fields.id), prestartedAt: num(fields.prestarted_at), claimedAt: optNum(fields.claimed_at),
      prestartAuditId: optStr(fields.prestart_audit_id) };
  }

  toDict(): Raw {
    return {
      id: this.id, name: this.name, state: this.state, template: this.template, backend: this.backend,
      isolation: this.isolation, resources: this.resources.toDict(), network: this.network.toDict(),
      created_at: this.createdAt, expires_at: this.expiresAt, workload_id: this.workloadId, details: this.details,
    };
  }
}

export type SnapshotKind = "full" | "filesystem" | "recorded";

/**
 * A saved sandbox state, sealed at rest: the one snapshot type, field for field Python's
 * `mvm.Snapshot` (`mvm/snapshots/model.py`), which the store, the supervisor and the CLI
 * use too. `kind` is `full` (memory+disk, VM), `filesystem` (namespace) or `recorded`
 * (record/plan mode). Times are epoch seconds; `sizeBytes` on disk, `plainBytes` unsealed;
 * `auditId` is set on the reply to `sandbox.snapshot()` only.
 */
export class Snapshot {
  constructor(
    readonly id: string,
    readonly name: string,
    readonly sandboxId: string,
    readonly kind: SnapshotKind,
    readonly createdAt: number,
    readonly expiresAt: number | null,
    readonly sizeBytes: number,
    readonly keep: boolean = false,
    readonly plainBytes: number = 0,
    readonly files: readonly string[] = [],
    readonly details: Raw = {},
    readonly auditId: string | null = null,
  ) {
    Object.freeze(this);
  }

  static fromWire(raw: Raw): Snapshot {
    return new Snapshot(String(raw.id), String(raw.name), String(raw.sandbox_id), raw.kind as SnapshotKind,
      num(raw.created_at), optNum(raw.expires_at), Math.trunc(num(raw.size_bytes)), Boolean(raw.keep),
      Math.trunc(num(raw.plain_bytes)), Array.isArray(raw.files) ? raw.files.map(String) : [],
      (raw.details ?? {}) as Raw, optStr(raw.audit_id));
  }

  /** The wire dict (Python's `Snapshot.to_wire()`). */
  toDict(): Raw {
    return { id: this.id, name: this.name, sandbox_id: this.sandboxId, kind: this.kind, created_at: this.createdAt,
      expires_at: this.expiresAt, size_bytes: this.sizeBytes, keep: this.keep, plain_bytes: this.plainBytes,
      files: [...this.files], details: this.details, audit_id: this.auditId };
  }
}

/** What a `PortForward` needs of its sandbox to close itself. @internal */
export interface ForwardOwner {
  readonly ports: { close(forward: PortForward | string | number): Promise<void> };
}

/** The fields of a `PortForward` (as `sandbox.ports.forward` / `sandbox.ports.list` give them). */
export interface PortForwardFields {
  host: string;
  hostPort: number;
  guestPort: number;
  id?: string | null;
  detached?: boolean;
  connections?: number;
  totalConnections?: number;
  failedConnections?: number;
  bytesIn?: number;
  bytesOut?: number;
  auditId?: string | null;
}

/**
 * A host listener relayed to a guest port (`sandbox.ports.forward`); `close()` it, or
 * let `await using` close it. The counters are as of the call that returned it
 * (`sandbox.ports.list()` for fresh ones): `connections` open now, `bytesIn`
 * (host → guest) and `bytesOut` (guest → host) of finished connections.
 *
 * ```ts
 * await using fwd = await sandbox.ports.forward({ hostPort: 8080, guestPort: 8000 });
 * await fetch(`http://${fwd.address}/`);
 * ```
 */
export class PortForward implements AsyncDisposable {
  readonly host: string;
  readonly hostPort: number;
  readonly guestPort: number;
  readonly id: string | null;
  readonly detached: boolean;
  readonly connections: number;
  readonly totalConnections: number;
  readonly failedConnections: number;
  readonly bytesIn: number;
  readonly bytesOut: number;
  readonly auditId: string | null;
  readonly #sandbox: ForwardOwner | null;

  constructor(fields: PortForwardFields, sandbox: ForwardOwner | null = null) {
    this.host = fields.host;
    this.hostPort = fields.hostPort;
    this.guestPort = fields.guestPort;
    this.id = fields.id ?? null;
    this.detached = fields.detached ?? true;
    this.connections = fields.connections ?? 0;
    this.totalConnections = fields.totalConnections ?? 0;
    this.failedConnections = fields.failedConnections ?? 0;
    this.bytesIn = fields.bytesIn ?? 0;
    this.bytesOut = fields.bytesOut ?? 0;
    this.auditId = fields.auditId ?? null;
    this.#sandbox = sandbox;
    Object.freeze(this);
  }

  /** A supervisor `Forward` (snake_case); bound to `sandbox` so that `close()` works. */
  static fromWire(raw: Raw, sandbox: ForwardOwner | null = null): PortForward {
    return new PortForward({
      host: String(raw.host), hostPort: Math.trunc(num(raw.host_port)), guestPort: Math.trunc(num(raw.guest_port)),
      id: optStr(raw.id), detached: raw.detached === undefined || raw.detached === null ? true : Boolean(raw.detached),
      connections: Math.trunc(num(raw.connections)), totalConnections: Math.trunc(num(raw.total_connections)),
      failedConnections: Math.trunc(num(raw.failed_connections)), bytesIn: Math.trunc(num(raw.bytes_in)),
      bytesOut: Math.trunc(num(raw.bytes_out)), auditId: optStr(raw.audit_id),
    }, sandbox);
  }

  /** `host:port` to connect to (`[::1]:port` for IPv6). */
  get address(): string {
    return this.host.includes(":") ? `[${this.host}]:${this.hostPort}` : `${this.host}:${this.hostPort}`;
  }

  /**
   * Stop listening and reset this forward's connections. A no-op once closed (or once
   * the sandbox is gone, and its forwards with it).
   */
  async close(): Promise<void> {
    const sandbox = this.#sandbox;
    if (sandbox === null) {
      throw new InvalidState("this PortForward is not bound to a sandbox (close it with sandbox.ports.close(forward))");
    }
    try {
      await sandbox.ports.close(this);
    } catch (exc) {
      if (exc instanceof InvalidArgument) return; // already closed
      if (exc instanceof SandboxError || exc instanceof SandboxNotFound || exc instanceof InvalidState) return;
      throw exc;
    }
  }

  /** `await using fwd = await sandbox.ports.forward(...)` closes it at the end of the block. */
  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }

  toString(): string {
    return `<PortForward ${this.address} -> guest 127.0.0.1:${this.guestPort}${this.id ? ` (${this.id})` : ""}>`;
  }

  /** The Python/wire spelling (Python's `PortForward.to_dict()`). */
  toDict(): Raw {
    return {
      host: this.host, host_port: this.hostPort, guest_port: this.guestPort, id: this.id, detached: this.detached,
      connections: this.connections, total_connections: this.totalConnections,
      failed_connections: this.failedConnections, bytes_in: this.bytesIn, bytes_out: this.bytesOut,
      audit_id: this.auditId,
    };
  }
}

/** The egress proxy of a `mode: "allow"` sandbox, as `describe()` reports it. */
export interface EgressInfo {
  /** The guest-side proxy URL (`http://127.0.0.1:3128`). */
  proxy: string;
  /** The guest listener is up. */
  ready: boolean;
  /** Destinations allowed and refused so far. */
  allowed: number;
  refused: number;
}

/**
 * The network of a sandbox as `describe()`, `sandbox.network.policy()` and
 * `sandbox.network.update()` report it: the policy (`mode`, `allow`,
 * `allowWildcards`, as a `NetworkPolicy`) plus its open `forwards` and, in mode
 * `allow`, the `egress` proxy's state. `toDict()` gives what the supervisor sent.
 */
export class NetworkInfo extends NetworkPolicy {
  /** Open port forwards (not bound to a sandbox: close them with `sandbox.ports.close`). */
  readonly forwards: readonly PortForward[];
  readonly egress: EgressInfo | null;
  /**
   * Who copies forwarded and egress bytes: `"supervisor-splice"` (namespace backend: the
   * agent hands the guest's socket to the supervisor, which splices it to the host side) or
   * `"agent-channel"` (a VM: stream frames over the agent channel); `null` when not reported.
   */
  readonly relay: string | null;
  readonly #raw: Raw;

  /** @internal use `NetworkInfo.fromWire` */
  constructor(policy: NetworkPolicy, forwards: readonly PortForward[], egress: EgressInfo | null, raw: Raw) {
    super(policy.mode, policy.allow, policy.allowWildcards);
    this.forwards = Object.freeze([...forwards]);
    this.egress = egress === null ? null : Object.freeze({ ...egress });
    this.relay = typeof raw.relay === "string" ? raw.relay : null;
    this.#raw = JSON.parse(JSON.stringify(raw)) as Raw;
    Object.freeze(this);
  }

  static fromWire(raw: Raw): NetworkInfo {
    const policy = NetworkPolicy.fromDict(raw);
    const forwards = Array.isArray(raw.forwards) ? raw.forwards.map((f) => PortForward.fromWire(f as Raw)) : [];
    let egress: EgressInfo | null = null;
    if (raw.egress && typeof raw.egress === "object") {
      const e = raw.egress as Raw;
      egress = { proxy: String(e.proxy ?? ""), ready: Boolean(e.ready), allowed: num(e.allowed), refused: num(e.refused) };
    }
    return new NetworkInfo(policy, forwards, egress, raw);
  }

  /** The supervisor's form: `{mode, allow, allow_wildcards, forwards?, relay?, egress?, ...}` (Python's dict). */
  override toDict(): { mode: NetworkMode; allow: string[]; allow_wildcards: boolean } & Raw {
    return { ...(JSON.parse(JSON.stringify(this.#raw)) as Raw), ...super.toDict() };
  }
}
