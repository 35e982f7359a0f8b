/**
 * `Sandbox`: create, connect to, use and end a sandbox (Python: `mvm.Sandbox`).
 *
 * ```ts
 * import { Sandbox } from "@mvm/sdk";
 *
 * await using sandbox = await Sandbox.create("python-3.13", { ttl: "30m" });
 * await sandbox.files.write("/app/main.py", "print('hello from mvm')");
 * const result = await sandbox.commands.run(["python", "/app/main.py"], { timeoutSeconds: 30 });
 * console.log(result.exitCode, result.stdout, result.auditId);
 * ```
 *
 * A live sandbox is created by `mvmctl up --json` (the same machinery as Python: a
 * detached supervisor per sandbox); every other call speaks the framed protocol
 * directly to that supervisor's Unix socket.
 */

import "./polyfill.js";

import { spawn, spawnSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import { join } from "node:path";
import { TextDecoder } from "node:util";

import { SupervisorClient, type CallResult, type StreamChunk } from "./client.js";
import {
  CommandError, CommandTimeout, FileNotFoundInSandbox, fromWire, InvalidArgument, InvalidNetworkPolicy, InvalidState,
  SandboxError, SandboxNotFound,
} from "./errors.js";
import { createWithServer } from "./create_server.js";
import { createDefaults } from "./defaults.js";
import { parseDuration } from "./durations.js";
import { mvmctlError, type MvmctlResult } from "./helper_process.js";
import {
  CommandResult, FileEntry, LogEvent, NetworkInfo, PoolInfo, PortForward, ProcessInfo, SandboxInfo, Snapshot,
} from "./models.js";
import { CONTROL_SOCKET, findMvmctl, requireMvmctl, sandboxesDir } from "./paths.js";
import { network as makeNetwork, NetworkPolicy, Resources, SecretRef, type NetworkMode } from "./policy.js";
import { collectIncludes } from "./includes.js";
import { claimMember, livePools, poolRecords } from "./pooling.js";
import { CHUNK_SIZE, type Header } from "./protocol.js";
import { kindOf, shown } from "./shown.js";
import { resolveSecret } from "./secrets.js";
import {
  absolutePath, askedSpec, callerSite, currentMode, defaultName, scriptDir, splitEnv, validateCommand, validatedSpec,
  validateOnBehalfOf, withDefaults, type AskedSpec, type Env, type Mode, type Spec,
} from "./spec.js";
import { findSandbox, listSandboxes } from "./state.js";
import type { RequestContext, Transport, TransportCallOptions, TransportStreamOptions, WireRequest } from "./transport.js";

/** Default capture per stream for `commands.run` (the supervisor's default too). */
export const DEFAULT_MAX_OUTPUT_BYTES = 4 * 1024 * 1024;
/** Default bound of `files.read`. */
export const DEFAULT_MAX_READ_BYTES = 64 * 1024 * 1024;
/** Signals `Process.signal` accepts by name. */
export const SIGNALS = ["HUP", "INT", "KILL", "TERM"] as const;
/** Secret values shorter than this are not redacted (too likely to appear by chance). */
const MIN_REDACT_LEN = 4;

export interface CreateOptions {
  /** Sandbox name (default: derived from `workloadId`, else the id). */
  name?: string;
  workloadId?: string;
  /** `"30m"`, `"2h"`, seconds; `null` = no expiry. Default: Python's `DEFAULT_TTL` (`mvmctl defaults`). */
  ttl?: string | number | null;
  /** Host paths (relative to the script's folder) copied into `/app`. */
  include?: string[];
  resources?: Resources;
  network?: NetworkPolicy;
  /** Values may be `secret(name)` references (resolved on the host, live mode only). */
  env?: Env;
  /** `"vm"` or `"namespace"` (default: `$MVM_BACKEND`, else the strongest this host can run). */
  backend?: string;
  /** `"record"`, `"plan"` or `"live"`; default `$MVM_MODE`, else live. */
  mode?: Mode;
  tags?: Record<string, string>;
  /** Start from this snapshot id or name; the sandbox takes the snapshot's resources unless `resources` is given. */
  fromSnapshot?: string;
  /** Pause after this long idle (`"5m"`, seconds), resume on the next request; default never. */
  autoPause?: string | number | null;
  /**
   * Who this program acts for (an MCP server names its client), e.g. `{ client: "agent-7" }`:
   * the sandbox's audit chain records it with the creation and with every request of this
   * handle, next to this process's own credentials. Record/plan mode writes it into the IR.
   */
  onBehalfOf?: Record<string, string> | null;
}

/** Guest directory where a `run` stdin larger than one frame is staged (the agent unlinks it on start). */
export const STDIN_STAGING_DIR = "/tmp/.mvm-stdin";

export interface RunOptions {
  env?: Env;
  /** Absolute, or relative to the default working directory (`/` or the template's). */
  cwd?: string;
  /** Run as this guest account (name or uid); an unknown one throws `UserNotFound`. */
  user?: string;
  /** Seconds; past it the whole process group is killed and `CommandTimeout` thrown. Default 60; `null`: none. */
  timeoutSeconds?: number | null;
  /** Capture limit per stream (default 4 MiB); `truncated` says when it was hit. */
  maxOutputBytes?: number;
  stdin?: string | Uint8Array;
  /** Throw `CommandError` for a non-zero exit. */
  check?: boolean;
  onStdout?: (text: string) => void;
  onStderr?: (text: string) => void;
  /** Mask secret values this handle resolved (default true). */
  redact?: boolean;
  /** Resume a paused sandbox instead of failing with `SandboxPaused`. */
  autoResume?: boolean;
}

export interface StartOptions {
  env?: Env;
  cwd?: string;
  user?: string;
  /** Keep the process's stdin open for `sendStdin`. */
  stdin?: boolean;
  autoResume?: boolean;
}

export interface LogsOptions {
  follow?: boolean;
  tail?: number;
  /** Seconds since the epoch. */
  since?: number;
  redact?: boolean;
  /** Seconds without a log line before `StreamIdle` is thrown (the request is cancelled); default: none. */
  idleTimeout?: number | null;
}

/** `Process.output`'s options. */
export interface OutputOptions {
  /** The output printed before the call comes first (default `true`). */
  replay?: boolean;
  /** Seconds of silence before `StreamIdle` is thrown (the process keeps running); default: none. */
  idleTimeout?: number | null;
}

/** `sandbox.ports.forward`'s options (Python: `host=`, `host_port=`, `guest_port=`, ...). */
export interface ForwardOptions {
  /** The guest port, on the guest's `127.0.0.1` (required). */
  guestPort: number;
  /** The host port; `0` (default) picks a free one (`fwd.hostPort`). */
  hostPort?: number;
  /** The host address bound, exactly (default `"127.0.0.1"`). A wildcard needs `allowWildcard`. */
  host?: string;
  /** Accept `"0.0.0.0"`, `"::"` or `""`: every interface of this machine. */
  allowWildcard?: boolean;
  /** Keep the forward when this handle's connection closes (default `true`); `false` ties it to the connection. */
  detach?: boolean;
}

/** `sandbox.network.update`'s options (Python: `allow`, `mode=`, `allow_wildcards=`). */
export interface NetworkUpdateOptions {
  /** The new allow-list (`host:port` entries); omitted or `null`: unchanged. */
  allow?: readonly string[] | null;
  /** `"allow"` or `"deny"`; default `"allow"` for a non-empty list, else `"deny"`. */
  mode?: NetworkMode | null;
  /** Accept `*`, `0.0.0.0`, `::` and CIDR destinations; omitted or `null`: unchanged. */
  allowWildcards?: boolean | null;
}

export interface OutputChunk {
  stream: "stdout" | "stderr" | string;
  text: string;
}

function toBuffer(data: string | Uint8Array, field = "data"): Buffer {
  if (typeof data === "string") return Buffer.from(data, "utf8");
  if (data instanceof Uint8Array) return Buffer.from(data.buffer, data.byteOffset, data.byteLength);
  throw InvalidArgument.create(field, `${kindOf(data)} is not bytes or str`);
}

/** @internal */
export function runMvmctl(args: string[], options: { cwd?: string; env?: NodeJS.ProcessEnv } = {}): Promise<MvmctlResult> {
  return new Promise((resolve, reject) => {
    const mvmctl = requireMvmctl(); // (thrown here: the promise rejects)
    const child = spawn(mvmctl, args, { cwd: options.cwd, env: options.env ?? process.env, stdio: ["ignore", "pipe", "pipe"] });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    child.stdout.on("data", (chunk: Buffer) => out.push(chunk));
    child.stderr.on("data", (chunk: Buffer) => err.push(chunk));
    child.on("error", (exc) => reject(new SandboxError(`cannot run ${mvmctl}: ${exc.message}`)));
    child.on("close", (code) => resolve({
      code, stdout: Buffer.concat(out).toString("utf8"), stderr: Buffer.concat(err).toString("utf8"),
    }));
  });
}

/** A sandbox's on-disk record as a `SandboxInfo` (what `Sandbox.list()` and `gc()` return). */
function infoOf(record: Record<string, unknown>): SandboxInfo {
  return SandboxInfo.fromWire({
    id: record.id, name: record.name, state: record.state ?? "creating", template: record.template,
    backend: record.backend, isolation: record.isolation ?? "unknown", // written at launch; older records lack it
    resources: record.resources ?? {}, network: record.network ?? {}, created_at: record.created_at ?? 0,
    expires_at: record.expires_at ?? null, workload_id: record.workload_id ?? null,
    details: { tags: record.tags ?? {}, run_id: record.run_id ?? null },
  });
}

/**
 * Remove every `lost` sandbox of this host (its supervisor died): leftover guest processes,
 * mounts, cgroups, snapshot leftovers, its directory and name (`mvmctl gc`; Python
 * `mvm.gc()`). Returns what was removed; running sandboxes are never touched.
 */
export async function gc(): Promise<SandboxInfo[]> {
  await liveOnly("gc", "clean up lost sandboxes with `mvmctl gc`");
  const result = await runMvmctl(["gc", "--json"]);
  if (result.code !== 0) throw mvmctlError("mvmctl gc", result);
  const reaped = (JSON.parse(result.stdout) as { reaped: Record<string, unknown>[] }).reaped;
  return reaped.map((raw) => SandboxInfo.fromWire(raw));
}

/** `connect`/`list`/`gc` find running sandboxes: a recording has none (Python's `live_only`). */
async function liveOnly(call: string, hint: string): Promise<void> {
  const mode = currentMode();
  if (mode !== "live") (await import("./recording.js")).notAvailable(call, mode, hint);
}

/** Python's `mvm.security.secrets.Redactor` over `name -> value`. */
function makeRedactor(values: Map<string, string>): (text: string) => string {
  const byValue = new Map<string, string>();
  for (const name of [...values.keys()].sort()) {
    const value = values.get(name) as string;
    if (value.length >= MIN_REDACT_LEN && !byValue.has(value)) byValue.set(value, name);
  }
  if (!byValue.size) return (text) => text;
  const ordered = [...byValue.keys()].sort((a, b) => b.length - a.length || (a < b ? -1 : a > b ? 1 : 0));
  const pattern = new RegExp(ordered.map((v) => v.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")).join("|"), "g");
  return (text) => text.replace(pattern, (match) => `[redacted:${byValue.get(match)}]`);
}

/**
 * Every warm pool of this `$MVM_HOME` (Python's `mvm.pools()`, `mvmctl pool ls`): what each
 * serves and its waiting members. A `Sandbox.create` asking for exactly what one serves
 * (template, backend, resources, network) claims a member: `describe()` then has `pool` set.
 * Read from the pools' files, as Python reads them (no process is started).
 */
export async function pools(): Promise<PoolInfo[]> {
  return poolRecords().map((raw) => PoolInfo.fromWire(raw));
}

/** How a `Sandbox` reaches what answers its requests (`transport.ts`). @internal */
export interface SandboxOptions {
  /** Open the transport (default: the supervisor's socket in `directory`). */
  connect?: () => Promise<Transport>;
  /** An already open transport that also answers synchronously (record/plan mode). */
  recorder?: Transport & { callNow(op: string, args?: Header | null, payload?: Uint8Array, options?: TransportCallOptions): CallResult };
  mode?: Mode;
  /** Who this handle acts for: sent in the hello of each connection it opens. */
  onBehalfOf?: Record<string, string> | null;
  /** A connection already open (a claimed pool member comes with the one it was claimed over). */
  transport?: Transport;
}

/**
 * A sandbox: a microVM or a namespace jail with an agent inside. In record/plan mode the
 * same class talks to a `RecordTransport` (nothing boots; `recorded` is `true`).
 */
export class Sandbox implements AsyncDisposable, Disposable {
  readonly id: string;
  readonly name: string;
  readonly mode: Mode;
  readonly commands: Commands;
  readonly files: Files;
  /** Port forwards from this machine into the sandbox. */
  readonly ports: Ports;
  /** The sandbox's network policy (egress allow-list), changeable while it runs. */
  readonly network: Network;
  /** @internal */
  protected readonly directory: string;
  private conn: Promise<Transport> | null = null;
  private readonly connectTransport: () => Promise<Transport>;
  private readonly recorder: NonNullable<SandboxOptions["recorder"]> | null;
  private readonly secretValues = new Map<string, string>();
  private killed = false;
  private redactCache: ((text: string) => string) | null = null;

  /** @internal use `Sandbox.create` or `Sandbox.connect` */
  constructor(id: string, name: string, directory: string, secretValues?: Map<string, string>,
    options: SandboxOptions = {}) {
    this.id = id;
    this.name = name;
    this.directory = directory;
    this.mode = options.mode ?? "live";
    this.recorder = options.recorder ?? null;
    const recorder = this.recorder;
    const onBehalfOf = options.onBehalfOf ?? null;
    this.connectTransport = recorder !== null ? async () => recorder
      : options.connect ?? (() => SupervisorClient.connect(join(this.directory, CONTROL_SOCKET), { onBehalfOf }));
    for (const [k, v] of secretValues ?? []) this.secretValues.set(k, v);
    if (options.transport !== undefined) this.conn = Promise.resolve(options.transport);
    this.commands = new Commands(this);
    this.files = new Files(this);
    this.ports = new Ports(this);
    this.network = new Network(this);
  }

  /** `true` in record/plan mode: calls are recorded, nothing runs. */
  get recorded(): boolean {
    return this.mode !== "live";
  }

  toString(): string {
    return `<Sandbox ${this.name} (${this.id})>`;
  }

  // ---- creation and discovery ---------------------------------------------------

  /**
   * Create a sandbox from `template` and resolve once its agent answered.
   *
   * `ttl` destroys it even if this process dies. `include` copies host paths
   * (relative to the script's folder) into `/app`. In record/plan mode
   * (`mvmctl compile` / `mvmctl run --mode plan`) nothing boots: the call is recorded
   * and a recorded sandbox with the same surface is returned.
   */
  static async create(template?: string, options: CreateOptions = {}): Promise<Sandbox> {
    const mode = currentMode(options.mode);
    const autoPause = options.autoPause === undefined || options.autoPause === null
      ? null : parseDuration(options.autoPause, "auto_pause");
    const onBehalfOf = validateOnBehalfOf(options.onBehalfOf);
    if (mode !== "live") {
      const at = callerSite(); // before any await: the script's frame is still on the stack
      const { checkTemplate, BACKEND_NAMES, RecordTransport } = await import("./recording.js");
      template ??= createDefaults().template; // (mvmctl compile/run hand them over: no Python call)
      checkTemplate(template);
      const spec = validatedSpec(options);
      const files = collectIncludes(options.include ?? [], scriptDir());
      const backend = options.backend ?? null;
      if (backend !== null && !BACKEND_NAMES.includes(backend)) {
        throw InvalidArgument.create("backend", `unknown backend ${shown(backend)}`, BACKEND_NAMES);
      }
      const fromSnapshot = options.fromSnapshot ?? null;
      if (fromSnapshot !== null && (typeof fromSnapshot !== "string" || !fromSnapshot.trim())) {
        throw InvalidArgument.create("from_snapshot", `${shown(fromSnapshot)} must be a snapshot id or name`);
      }
      const recorder = RecordTransport.open(mode, {
        template, name: spec.name, workloadId: spec.workloadId, backend, resources: spec.resources,
        network: spec.network, ttlSeconds: spec.ttlSeconds, env: spec.env, tags: spec.tags, fromSnapshot,
        autoPauseSeconds: autoPause, onBehalfOf, include: [...(options.include ?? [])], files,
      }, at, (fallback) => defaultName(spec.workloadId, fallback));
      return new Sandbox(recorder.sandboxId, recorder.name, "", undefined, { recorder, mode });
    }
    // Live, what the caller left out is left to `mvmctl up` (Python's defaults, no extra call)
    if (template !== undefined && (typeof template !== "string" || !template)) {
      throw InvalidArgument.create("template", `${shown(template)} is not a template name`);
    }
    const spec = askedSpec(options);
    for (const key of Object.keys(spec.tags)) {
      if (!key || key.includes("=")) { // mvmctl up --tag KEY=VALUE cannot carry them
        throw InvalidArgument.create("tags", `${shown(key)} is not a tag name a live sandbox can have`,
          "a non-empty name without '='");
      }
    }
    for (const key of Object.keys(onBehalfOf ?? {})) {
      if (key.includes("=")) { // mvmctl up --on-behalf-of KEY=VALUE cannot carry it
        throw InvalidArgument.create("on_behalf_of", `${shown(key)} is not a key a live sandbox can record`,
          "a non-empty name without '='");
      }
    }
    const include = options.include ?? [];
    if (typeof include === "string" || !Array.isArray(include)) {
      throw InvalidArgument.create("include", "must be a list of paths, not one string", "e.g. ['src']");
    }
    // A warm pool's member, claimed over its socket (sandbox.claim) when one waits: known only with the
    // backend named (else mvmctl up picks the strongest this host runs) and without a snapshot to start from.
    const backend = options.backend ?? process.env.MVM_BACKEND ?? null;
    if (backend && (options.fromSnapshot === undefined || options.fromSnapshot === null)) {
      const claimed = await Sandbox.fromPool(template, backend, spec, include, onBehalfOf, autoPause);
      if (claimed !== null) return claimed;
    }
    const args: string[] = [];
    if (template !== undefined) args.push("--template", template);
    if (spec.ttlSeconds !== undefined) args.push("--ttl", spec.ttlSeconds === null ? "none" : String(spec.ttlSeconds));
    if (spec.resources !== null) {
      // without them mvmctl up picks the defaults, or a snapshot's own shape with fromSnapshot
      const r = spec.resources;
      args.push("--cpus", String(r.cpuCores), "--memory", String(r.memoryMb), "--disk", String(r.rootfsSizeMb),
        "--max-processes", String(r.maxProcesses));
    }
    if (spec.network !== null) {
      args.push("--network", spec.network.mode);
      for (const entry of spec.network.allow) args.push("--allow", entry);
      if (spec.network.allowWildcards) args.push("--allow-wildcards");
    }
    for (const [key, value] of Object.entries(spec.tags)) args.push("--tag", `${key}=${value}`);
    if (spec.name !== null) args.push("--name", spec.name);
    if (spec.workloadId !== null) args.push("--workload-id", spec.workloadId);
    if (options.backend !== undefined && options.backend !== null) args.push("--backend", String(options.backend));
    if (options.fromSnapshot !== undefined && options.fromSnapshot !== null) {
      args.push("--from-snapshot", String(options.fromSnapshot));
    }
    if (autoPause !== null) args.push("--auto-pause", String(autoPause));
    for (const [key, value] of Object.entries(onBehalfOf ?? {})) args.push("--on-behalf-of", `${key}=${value}`);
    const { literal, secrets } = splitEnv(spec.env);
    for (const [key, value] of Object.entries(literal)) args.push("--env", `${key}=${value}`);
    for (const [key, ref] of Object.entries(secrets)) args.push("--secret-env", `${key}=${ref.name}`);
    for (const path of include) args.push("--include", String(path));
    const base = scriptDir();
    const info = SandboxInfo.fromWire(await createWithServer(args, base, { ...process.env, MVM_INCLUDE_BASE: base }));
    const values = new Map<string, string>();
    for (const ref of Object.values(secrets)) {
      try {
        values.set(ref.name, resolveSecret(ref.name));
      } catch {
        // mvmctl resolved it; this handle only uses values to redact output
      }
    }
    return new Sandbox(info.id, info.name, join(sandboxesDir(), info.id), values, { onBehalfOf });
  }

  /**
   * A member of a pool that serves this create, claimed with the create's name, TTL, env,
   * secrets, tags, `onBehalfOf` and `autoPause` (Python's `mvm.pooling.claim`), its
   * `include` files then written; `null` when no member could be claimed. A secret that
   * does not resolve is left to `mvmctl up` to report.
   */
  private static async fromPool(asked: string | undefined, backend: string, askedFields: AskedSpec, include: string[],
    onBehalfOf: Record<string, string> | null, autoPause: number | null): Promise<Sandbox | null> {
    if (!livePools().length) return null; // no pool on this host: nothing to match, no defaults to ask for
    const template = asked ?? createDefaults().template;
    const spec = withDefaults(askedFields);
    const { literal, secrets } = splitEnv(spec.env);
    const secretEnv: Record<string, string> = {};
    const secretNames: Record<string, string> = {};
    const values = new Map<string, string>();
    try {
      for (const [key, ref] of Object.entries(secrets)) {
        secretEnv[key] = resolveSecret(ref.name);
        secretNames[key] = ref.name;
        values.set(ref.name, secretEnv[key]);
      }
    } catch {
      return null;
    }
    const files = collectIncludes(include, scriptDir());
    const claimed = await claimMember({ template, backend, resources: spec.resources, network: spec.network }, {
      name: spec.name, workloadId: spec.workloadId, ttlSeconds: spec.ttlSeconds, autoPauseSeconds: autoPause,
      env: literal, secretEnvNames: secretNames, secretEnv, tags: spec.tags, onBehalfOf,
    }, (id) => defaultName(spec.workloadId, id));
    if (claimed === null) return null;
    const sandbox = new Sandbox(claimed.id, claimed.name, join(sandboxesDir(), claimed.id), values,
      { onBehalfOf, transport: claimed.client });
    try {
      for (const file of files) await sandbox.files.write(file.guestPath, file.data, { mode: file.mode });
    } catch (exc) {
      await sandbox.kill();
      throw exc;
    }
    return sandbox;
  }

  /**
   * Attach to a running sandbox (created by any process, either language) by name or id;
   * `SandboxLost` if its supervisor died.
   */
  static async connect(nameOrId: string): Promise<Sandbox> {
    await liveOnly("Sandbox.connect", "a recording can only describe sandboxes the script creates "
      + "(connect to a running one in live mode)");
    const record = findSandbox(nameOrId);
    return new Sandbox(record.id, record.name, record.directory);
  }

  /**
   * Every sandbox on this host, read from its on-disk record (no connection to any). One
   * whose supervisor died has state `lost` until `gc()` (`mvmctl gc`) removes it.
   */
  static async list(): Promise<SandboxInfo[]> {
    await liveOnly("Sandbox.list", "list running sandboxes with `mvmctl ls`");
    return listSandboxes().map(infoOf);
  }

  // ---- plumbing -----------------------------------------------------------------

  /** @internal the transport (opened on first use, reopened if it dropped). */
  async client(): Promise<Transport> {
    if (this.killed) {
      throw new InvalidState(`sandbox ${this.name} was destroyed`, { state: "destroyed" });
    }
    const current = this.conn;
    if (current !== null) {
      try {
        const existing = await current;
        if (!existing.closed) return existing;
      } catch {
        // connect failed before: try again below
      }
      if (this.conn !== current && this.conn !== null) return this.conn; // another call reconnected meanwhile
    }
    this.conn = this.connectTransport();
    return this.conn;
  }

  /**
   * @internal the script's `file:line` for a recorded request: taken before the SDK's
   * first await (while the script's frame is on the stack); live requests need none.
   */
  site(): string | null | undefined {
    return this.recorded ? callerSite() : undefined;
  }

  /** @internal one request to the transport (`options.call` names the SDK call for a refusal). */
  async call(op: string, args: Header | null = null, payload?: Uint8Array,
    options: TransportCallOptions = {}): Promise<CallResult> {
    const at = options.at === undefined ? this.site() : options.at; // before the first await
    return (await this.client()).call(op, args, payload, { ...options, at });
  }

  /** @internal a window of requests sent together, acknowledged together (`Transport.callMany`). */
  async callMany(requests: WireRequest[], context: RequestContext = {}): Promise<CallResult[]> {
    const at = context.at === undefined ? this.site() : context.at; // before the first await
    return (await this.client()).callMany(requests, { ...context, at });
  }

  /** @internal the `data` frames of one request (record mode refuses it, naming `options.call`). */
  async *stream(op: string, args: Header | null, options: TransportStreamOptions): AsyncGenerator<StreamChunk, void, undefined> {
    yield* (await this.client()).stream(op, args, options);
  }

  /**
   * @internal every secret value this handle resolved replaced by `[redacted:NAME]`
   * (Python's `Redactor`: values shorter than 4 characters are left, longer values win).
   */
  redactor(text: string): string {
    if (this.redactCache === null) this.redactCache = makeRedactor(this.secretValues);
    return this.redactCache(text);
  }

  /**
   * @internal argv/env/cwd checked; secret references resolved into `env` live (a
   * recording keeps only their names, in `secret_names`).
   */
  commandArgs(argv: string[] | string, env: Env | undefined, cwd: string | undefined, user?: string): Header {
    const checked = validateCommand(argv, env, cwd);
    checkUser(user);
    const { literal, secrets } = splitEnv(checked.env);
    const merged: Record<string, string> = { ...literal };
    const names: Record<string, string> = {};
    for (const [key, ref] of Object.entries(secrets)) {
      names[key] = ref.name;
      if (this.recorded) continue;
      const value = resolveSecret(ref.name);
      merged[key] = value;
      if (this.secretValues.get(ref.name) !== value) {
        this.secretValues.set(ref.name, value);
        this.redactCache = null;
      }
    }
    const args: Header = { argv: checked.argv, env: merged, cwd: cwd ?? null, secret_names: names };
    if (user !== undefined && user !== null) args.user = user;
    return args;
  }

  // ---- information ----------------------------------------------------------------

  /** Identity, state, limits, policy and isolation facts. */
  async describe(): Promise<SandboxInfo> {
    return SandboxInfo.fromWire((await this.call("sandbox.describe")).result);
  }

  /** The current state (`running`, `paused`, `stopped`, ...). */
  async state(): Promise<string> {
    return (await this.describe()).state;
  }

  /**
   * The sandbox's log: lifecycle events, audit entries and process output lines.
   * With `follow` it waits for new lines until the loop is left (which cancels);
   * `idleTimeout` throws `StreamIdle` when nothing was logged for that long.
   *
   * ```ts
   * for await (const event of sandbox.logs({ follow: true })) console.log(event.message);
   * ```
   */
  async *logs(options: LogsOptions = {}): AsyncGenerator<LogEvent, void, undefined> {
    const redact = options.redact ?? true;
    for await (const chunk of this.stream("sandbox.logs", {
      follow: options.follow ?? false, tail: options.tail ?? null, since: options.since ?? null,
    }, { call: "Sandbox.logs", idleTimeout: options.idleTimeout })) {
      const event = LogEvent.fromWire(JSON.parse(chunk.data.toString("utf8")) as Record<string, unknown>);
      yield redact
        ? new LogEvent(event.timestamp, event.source, event.stream, this.redactor(event.message), event.auditId)
        : event;
    }
  }

  // ---- lifecycle ----------------------------------------------------------------------

  /** Halt every process but keep the disk; `start()` runs it again. */
  async stop(): Promise<SandboxInfo> {
    return SandboxInfo.fromWire((await this.call("sandbox.stop")).result);
  }

  async start(): Promise<SandboxInfo> {
    return SandboxInfo.fromWire((await this.call("sandbox.start")).result);
  }

  /** Freeze all execution (the VM stops; namespaces use the cgroup freezer). */
  async pause(): Promise<SandboxInfo> {
    return SandboxInfo.fromWire((await this.call("sandbox.pause")).result);
  }

  /** Continue after `pause()`, or replace the sandbox's state with `snapshot`. */
  async resume(snapshot?: string | Snapshot | null): Promise<SandboxInfo> {
    const snapId = snapshot instanceof Snapshot ? snapshot.id : snapshot ?? null;
    return SandboxInfo.fromWire((await this.call("sandbox.resume", { snapshot: snapId })).result);
  }

  /**
   * Save the sandbox's state (memory+disk on a VM: `kind: "full"`; the writable
   * filesystem on namespaces: `kind: "filesystem"`), sealed at rest.
   */
  async snapshot(name?: string | null, options: { expires?: string | number | null; keep?: boolean } = {}): Promise<Snapshot> {
    const expires = options.expires ?? null;
    if (expires !== null) parseDuration(expires, "expires");
    const { result } = await this.call("sandbox.snapshot", { name: name ?? null, expires, keep: options.keep ?? false });
    return Snapshot.fromWire(result);
  }

  /** Remove the sandbox and everything it made (its snapshots too, unless kept). Safe to call twice. */
  async destroy(): Promise<void> {
    if (this.killed) return;
    try {
      await this.call("sandbox.destroy", {}, undefined, { timeoutSeconds: 120 });
    } catch (exc) {
      if (!(exc instanceof SandboxError || exc instanceof SandboxNotFound)) throw exc;
      // already gone: the supervisor exits right after answering
    } finally {
      this.killed = true;
      this.dropConnection();
    }
  }

  /** Stop and destroy; safe to call twice. `await using` calls it. */
  async kill(): Promise<void> {
    await this.destroy();
  }

  /** Drop this handle's connection without touching the sandbox. */
  close(): void {
    this.dropConnection();
  }

  private dropConnection(): void {
    const conn = this.conn;
    this.conn = null;
    conn?.then((c) => c.close(), () => undefined);
  }

  /** `await using sandbox = await Sandbox.create(...)` destroys it at the end of the block. */
  async [Symbol.asyncDispose](): Promise<void> {
    await this.kill();
  }

  /**
   * `using sandbox = await Sandbox.create(...)` (synchronous disposal): destroys the
   * sandbox with a blocking `mvmctl down`. Prefer `await using`.
   */
  [Symbol.dispose](): void {
    if (this.killed) return;
    if (this.recorder !== null) { // recorded now, in the script's order
      this.recorder.callNow("sandbox.destroy", {}, undefined, { at: callerSite() });
      this.killed = true;
      return;
    }
    this.killed = true;
    this.dropConnection();
    const mvmctl = findMvmctl();
    if (mvmctl === null) throw new SandboxError("mvmctl not found: cannot destroy the sandbox synchronously");
    const result = spawnSync(mvmctl, ["down", "--json", this.id], { encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] });
    if (result.status !== 0) {
      const error = mvmctlError("mvmctl down", { code: result.status, stdout: result.stdout ?? "", stderr: result.stderr ?? "" });
      if (!(error instanceof SandboxNotFound)) throw error;
    }
  }
}

// ---- commands ------------------------------------------------------------------------

/** Processes in the sandbox. Reached as `sandbox.commands`. */
export class Commands {
  /** @internal */
  constructor(protected readonly sandbox: Sandbox) {}

  /**
   * Run `argv` to completion and return its `CommandResult`. A string is run by
   * `/bin/sh -c`. A non-zero exit is a result, not an error (`check: true` throws
   * `CommandError`). Past `timeoutSeconds` the whole process group is killed and
   * `CommandTimeout` carries the partial output.
   */
  async run(argv: string[] | string, options: RunOptions = {}): Promise<CommandResult> {
    const sb = this.sandbox;
    const at = sb.site();
    const args = sb.commandArgs(argv, options.env, options.cwd, options.user);
    args.timeout_seconds = options.timeoutSeconds === undefined ? 60 : options.timeoutSeconds;
    args.max_output_bytes = options.maxOutputBytes ?? DEFAULT_MAX_OUTPUT_BYTES;
    args.auto_resume = options.autoResume ?? false;
    args.redact = options.redact ?? true;
    if (sb.recorded) args.check = Boolean(options.check); // the supervisor has no use for it; the IR keeps it
    let payload = options.stdin === undefined || options.stdin === null ? undefined : toBuffer(options.stdin, "stdin");
    let staged: string | null = null;
    if (payload !== undefined && payload.length > CHUNK_SIZE) {
      // too big for one frame: staged as a guest file the agent opens and unlinks
      staged = `${STDIN_STAGING_DIR}/${randomBytes(8).toString("hex")}`;
      await sb.files.write(staged, payload, { mode: 0o600 });
      args.stdin_path = staged;
      payload = undefined;
    }
    const collected: Record<string, Buffer[]> = { stdout: [], stderr: [] };
    const decoders: Record<string, TextDecoder> = { stdout: new TextDecoder(), stderr: new TextDecoder() };
    const callbacks: Record<string, ((text: string) => void) | undefined> = { stdout: options.onStdout, stderr: options.onStderr };
    const redact = options.redact ?? true;
    const onData = (stream: string, data: Buffer) => {
      if (!(stream in collected)) return;
      collected[stream].push(data);
      const callback = callbacks[stream];
      if (callback !== undefined) {
        const text = decoders[stream].decode(data, { stream: true });
        if (text) callback(redact ? sb.redactor(text) : text);
      }
    };
    const textOf = (stream: string) => {
      const text = Buffer.concat(collected[stream]).toString("utf8");
      return redact ? sb.redactor(text) : text;
    };
    const started = performance.now();
    let result: Header;
    try {
      result = (await sb.call("exec.run", args, payload, { onData, at, call: "commands.run" })).result;
    } catch (exc) {
      if (exc instanceof CommandTimeout) throw exc.withOutput(textOf("stdout"), textOf("stderr"));
      if (staged !== null) await sb.files.remove(staged).catch(() => undefined); // the process never started
      throw exc;
    }
    const commandResult = new CommandResult({
      exitCode: (result.exit_code ?? null) as number | null,
      stdout: textOf("stdout"),
      stderr: textOf("stderr"),
      auditId: (result.audit_id ?? null) as string | null,
      durationSeconds: Number(result.duration_seconds ?? (performance.now() - started) / 1000),
      truncated: Boolean(result.truncated),
      signal: (result.signal ?? null) as number | null,
      pid: (result.pid ?? null) as number | null,
      stdoutBytes: Number(result.stdout_bytes ?? 0),
      stderrBytes: Number(result.stderr_bytes ?? 0),
      receiptPath: (result.receipt_path ?? null) as string | null,
      recorded: Boolean(result.recorded),
    });
    if (options.check && !commandResult.recorded && commandResult.exitCode !== 0) {
      throw new CommandError(`command ${shown(args.argv)} exited with ${commandResult.exitCode}: `
        + commandResult.stderr.trim().slice(-500), {}, undefined, commandResult);
    }
    return commandResult;
  }

  /** Start `argv` and resolve at once with a `Process` handle. */
  async start(argv: string[] | string, options: StartOptions = {}): Promise<Process> {
    const sb = this.sandbox;
    const args = sb.commandArgs(argv, options.env, options.cwd, options.user);
    args.stdin = options.stdin ?? false;
    args.auto_resume = options.autoResume ?? false;
    const { result } = await sb.call("proc.start", args, undefined, { call: "commands.start" });
    const index = result.process === undefined || result.process === null ? null : Number(result.process);
    return new Process(sb, result.pid === undefined || result.pid === null ? null : Number(result.pid),
      (result.audit_id ?? null) as string | null, args.argv as string[], index, agentGeneration(result));
  }

  /** A handle on a process started earlier (by this or another client). */
  async connect(pid: number): Promise<Process> {
    const { result } = await this.sandbox.call("proc.info", { pid: Math.trunc(pid) }, undefined, { call: "commands.connect" });
    return new Process(this.sandbox, Math.trunc(pid), (result.audit_id ?? null) as string | null,
      Array.isArray(result.argv) ? (result.argv as string[]) : [], null, agentGeneration(result));
  }

  /** Processes the guest agent knows (running and recently exited). */
  async list(): Promise<ProcessInfo[]> {
    const { result } = await this.sandbox.call("proc.list", {}, undefined, { call: "commands.list" });
    return (Array.isArray(result.processes) ? result.processes : []).map((p) => ProcessInfo.fromWire(p as Header));
  }
}

/** The `agent_generation` of a `proc.start` / `proc.info` answer (`null` if it has none: a recording). */
function agentGeneration(result: Header): number | null {
  return typeof result.agent_generation === "number" ? result.agent_generation : null;
}

/**
 * A process started in the sandbox; usable from any client that knows its pid.
 * Iterate it for its output: `for await (const { stream, text } of process) ...`.
 */
export class Process implements AsyncIterable<OutputChunk> {
  /** The guest pid; `null` only for a recorded (record/plan mode) process. */
  readonly pid: number | null;
  readonly auditId: string | null;
  readonly argv: string[];
  /** A recorded process's place among the recording's `commands.start`s (`null` live). */
  readonly index: number | null;
  /** Which guest agent started it (the pid alone may be reused after an agent restart). */
  readonly agentGeneration: number | null;
  private exit: [number | null, number | null] | null = null;

  /** @internal */
  constructor(protected readonly sandbox: Sandbox, pid: number | null, auditId: string | null = null, argv: string[] = [],
    index: number | null = null, agentGeneration: number | null = null) {
    this.pid = pid;
    this.auditId = auditId;
    this.argv = argv;
    this.index = index;
    this.agentGeneration = agentGeneration;
  }

  /** `true` for a recorded process (nothing runs). */
  get recorded(): boolean {
    return this.index !== null;
  }

  toString(): string {
    return this.index !== null ? `<Process #${this.index + 1} (recorded) argv=${shown(this.argv)}>`
      : `<Process pid=${this.pid} argv=${shown(this.argv)}>`;
  }

  /** How requests name it: its pid and the agent generation that started it, or its index in a recording. */
  private ref(): Header {
    if (this.index !== null) return { process: this.index };
    return this.agentGeneration === null ? { pid: this.pid } : { pid: this.pid, agent_generation: this.agentGeneration };
  }

  /**
   * Wait until the process exits; resolves with its exit code (128+N if killed by
   * signal N). Throws `CommandTimeout` if it is still running after `timeoutSeconds`.
   */
  async wait(timeoutSeconds?: number): Promise<number> {
    if (this.exit === null) {
      const args: Header = this.ref();
      if (timeoutSeconds !== undefined && timeoutSeconds !== null) args.timeout_seconds = timeoutSeconds;
      const { result } = await this.sandbox.call("proc.wait", args, undefined, { call: "Process.wait" });
      this.exit = [(result.exit_code ?? null) as number | null, (result.signal ?? null) as number | null];
    }
    const code = this.exit[0];
    return code === null ? -1 : code;
  }

  /** The exit code once it exited, else `null` (does not wait). */
  async exitCode(): Promise<number | null> {
    return this.exitCodeFor("Process.exitCode");
  }

  async isRunning(): Promise<boolean> {
    return (await this.exitCodeFor("Process.isRunning")) === null;
  }

  async info(): Promise<ProcessInfo> {
    return this.infoFor("Process.info");
  }

  private async exitCodeFor(call: string): Promise<number | null> {
    if (this.exit === null) {
      const info = await this.infoFor(call);
      if (info.running) return null;
      this.exit = [info.exitCode, null];
    }
    return this.exit[0];
  }

  private async infoFor(call: string): Promise<ProcessInfo> {
    return ProcessInfo.fromWire((await this.sandbox.call("proc.info", this.ref(), undefined, { call })).result);
  }

  /** Send a signal to the process (and by default its whole process group). */
  async signal(sig: string | number = "TERM", options: { group?: boolean } = {}): Promise<void> {
    let name: string | number;
    if (typeof sig === "string") {
      const upper = sig.toUpperCase();
      name = upper.startsWith("SIG") ? upper.slice(3) : upper;
      if (!(SIGNALS as readonly string[]).includes(name)) {
        throw InvalidArgument.create("signal", `unknown signal ${shown(sig)}`, [...SIGNALS]);
      }
    } else {
      name = Math.trunc(sig);
    }
    await this.sandbox.call("proc.signal", { ...this.ref(), signal: name, group: options.group ?? true });
  }

  /** SIGKILL the process group and every descendant. */
  async kill(): Promise<void> {
    await this.signal("KILL");
  }

  /** Write to the process's stdin (it must have been started with `stdin: true`). */
  async sendStdin(data: string | Uint8Array): Promise<void> {
    const at = this.sandbox.site();
    const raw = toBuffer(data);
    for (let start = 0; start < raw.length; start += CHUNK_SIZE) {
      await this.sandbox.call("proc.stdin", { ...this.ref(), eof: false }, raw.subarray(start, start + CHUNK_SIZE), { at });
    }
  }

  async closeStdin(): Promise<void> {
    await this.sandbox.call("proc.stdin", { ...this.ref(), eof: true });
  }

  /**
   * `{stream, text}` chunks as the process prints them, until it exits. With
   * `replay` (default) the output printed before the call comes first. With
   * `idleTimeout` a process silent for that long throws `StreamIdle` (it keeps running).
   */
  output(options: OutputOptions = {}): AsyncGenerator<OutputChunk, void, undefined> {
    return this.outputFor(options, "Process.output");
  }

  private async *outputFor(options: OutputOptions, call: string): AsyncGenerator<OutputChunk, void, undefined> {
    const decoders: Record<string, TextDecoder> = { stdout: new TextDecoder(), stderr: new TextDecoder() };
    for await (const chunk of this.sandbox.stream("proc.attach", { ...this.ref(), replay: options.replay ?? true },
      { call, idleTimeout: options.idleTimeout })) {
      const decoder = decoders[chunk.stream];
      const text = decoder ? decoder.decode(chunk.data, { stream: true }) : chunk.data.toString("utf8");
      if (text) yield { stream: chunk.stream, text: this.sandbox.redactor(text) };
    }
  }

  [Symbol.asyncIterator](): AsyncIterator<OutputChunk> {
    return this.output();
  }

  /**
   * Lines of `which` (`"stdout"` or `"stderr"`, with their newline) from the process's start
   * until it exits; `idleTimeout` as for `output`.
   */
  lines(which: "stdout" | "stderr" = "stdout", options: { idleTimeout?: number | null } = {}): AsyncGenerator<string, void, undefined> {
    if (which !== "stdout" && which !== "stderr") { // refused at the call, like Python's
      throw InvalidArgument.create("which", shown(which), ["stdout", "stderr"]);
    }
    return this.linesOf(which, options.idleTimeout ?? null, "Process.lines");
  }

  private async *linesOf(which: string, idleTimeout: number | null, call: string): AsyncGenerator<string, void, undefined> {
    let pending = "";
    for await (const { stream, text } of this.outputFor({ idleTimeout }, call)) {
      if (stream !== which) continue;
      pending += text;
      const parts = pending.split("\n");
      pending = parts.pop() as string;
      for (const line of parts) yield line + "\n";
    }
    if (pending) yield pending;
  }

  /** The process's stdout lines (from its start) until it exits. */
  stdout(): AsyncGenerator<string, void, undefined> {
    return this.linesOf("stdout", null, "Process.stdout");
  }

  stderr(): AsyncGenerator<string, void, undefined> {
    return this.linesOf("stderr", null, "Process.stderr");
  }
}

// ---- ports and network ------------------------------------------------------------------

/**
 * Port forwards of a sandbox. Reached as `sandbox.ports`. A forward travels over the
 * supervisor's channel to the guest agent, so it needs no guest network interface
 * (it works with `mode: "deny"`).
 */
export class Ports {
  /** @internal */
  constructor(protected readonly sandbox: Sandbox) {}

  /**
   * Listen on `host:hostPort` on this machine and relay every connection to the
   * guest's `127.0.0.1:guestPort`.
   *
   * `hostPort: 0` (default) picks a free port (`fwd.hostPort`). Exactly `host` is bound:
   * a wildcard (`"0.0.0.0"`, `"::"`, `""`) throws `InvalidArgument` unless
   * `allowWildcard: true`; a port already taken throws `PortInUse`. The forward lasts
   * until `fwd.close()` (or the `await using` block ends) or the sandbox ends; with
   * `detach: false` also until this handle's connection closes.
   *
   * ```ts
   * await using fwd = await sandbox.ports.forward({ hostPort: 8080, guestPort: 8000 });
   * const page = await fetch(`http://${fwd.address}/`);
   * ```
   */
  async forward(options: ForwardOptions): Promise<PortForward> {
    const opts = (options ?? {}) as Partial<ForwardOptions>;
    const host = opts.host === undefined ? "127.0.0.1" : opts.host;
    const hostPort = opts.hostPort === undefined ? 0 : opts.hostPort;
    const guestPort = opts.guestPort;
    for (const [name, value, low] of [["guest_port", guestPort, 1], ["host_port", hostPort, 0]] as const) {
      if (typeof value !== "number" || !Number.isInteger(value) || !(low <= value && value <= 65535)) {
        throw InvalidArgument.create(name, `${shown(value)} is not a port number`, `${low}..65535`);
      }
    }
    if (typeof host !== "string") {
      throw InvalidArgument.create("host", `${shown(host)} is not an address`, "e.g. '127.0.0.1'");
    }
    const { result } = await this.sandbox.call("port.forward", {
      host, host_port: hostPort, guest_port: guestPort, allow_wildcard: Boolean(opts.allowWildcard ?? false),
      detach: Boolean(opts.detach ?? true),
    }, undefined, { call: "ports.forward" });
    return PortForward.fromWire(result, this.sandbox);
  }

  /** The sandbox's open forwards (with their connection counts), oldest first. */
  async list(): Promise<PortForward[]> {
    const { result } = await this.sandbox.call("port.list", null, undefined, { call: "ports.list" });
    return (Array.isArray(result.forwards) ? result.forwards : []).map((raw) => PortForward.fromWire(raw as Header, this.sandbox));
  }

  /**
   * Close a forward: a `PortForward`, its `id`, or its host port. Its open connections
   * are reset. `InvalidArgument` when no (single) forward matches.
   */
  async close(forward: PortForward | string | number): Promise<void> {
    let args: Header;
    if (forward instanceof PortForward) args = { id: forward.id };
    else if (typeof forward === "string") args = { id: forward };
    else if (typeof forward === "number" && Number.isInteger(forward)) args = { host_port: forward };
    else throw InvalidArgument.create("forward", shown(forward), "a PortForward, its id or its host port");
    await this.sandbox.call("port.close", args, undefined, { call: "ports.close" });
  }
}

/** The network policy of a running sandbox. Reached as `sandbox.network`. */
export class Network {
  /** @internal */
  constructor(protected readonly sandbox: Sandbox) {}

  /** The policy, open forwards and egress state, as `describe()` shows them. */
  async policy(): Promise<NetworkInfo> {
    return (await this.sandbox.describe()).network;
  }

  /**
   * Replace the egress allow-list of this running sandbox (new connections follow it).
   *
   * `mode` defaults to `"allow"` for a non-empty list and `"deny"` for an empty one;
   * switching between them starts or stops the egress proxy (processes started
   * afterwards get, or lose, `HTTP(S)_PROXY`). A sandbox created with `mode: "open"`
   * cannot be changed. Entries are validated like `network()`.
   *
   * ```ts
   * await sandbox.network.update({ allow: ["pypi.org:443", "files.pythonhosted.org:443"] });
   * await sandbox.network.update(["pypi.org:443"]); // the same, shorter
   * ```
   */
  async update(options: NetworkUpdateOptions | readonly string[] = {}): Promise<NetworkInfo> {
    const opts: NetworkUpdateOptions = Array.isArray(options) ? { allow: options as readonly string[] }
      : ((options ?? {}) as NetworkUpdateOptions);
    const allow: unknown = opts.allow ?? null;
    const mode = opts.mode ?? null;
    const wildcards = opts.allowWildcards ?? null;
    if (typeof allow === "string") {
      throw InvalidNetworkPolicy.create("network.allow", "must be a list of 'host:port' strings, not one string");
    }
    if (allow !== null && !Array.isArray(allow)) {
      throw InvalidNetworkPolicy.create("network.allow", `${kindOf(allow)} is not a list of 'host:port' strings`);
    }
    const entries = allow === null ? null : [...(allow as unknown[])];
    if (entries !== null) {
      const resolved = mode || (entries.length ? "allow" : "deny");
      if (resolved === "allow" || resolved === "deny") { // the supervisor refuses other modes with its own message
        // allowWildcards omitted keeps the sandbox's setting, which only the supervisor knows: it judges
        // wildcard entries then (with the same error). Python's SDK refuses them here as if it were false.
        makeNetwork(resolved, entries as string[], { allowWildcards: wildcards === null ? true : Boolean(wildcards) });
      }
    }
    const { result } = await this.sandbox.call("network.update", { allow: entries, mode, allow_wildcards: wildcards },
      undefined, { call: "network.update" });
    return NetworkInfo.fromWire((result.network ?? {}) as Header);
  }
}

// ---- files -----------------------------------------------------------------------------

/** Files in the sandbox. Reached as `sandbox.files`; paths are absolute guest paths. */
/** `user` of `commands.run`/`commands.start` and the file operations (Python's `check_user`):
 * a guest account name or uid, or absent (the agent's default). @internal */
export function checkUser(user: unknown): void {
  if (user !== undefined && user !== null && (typeof user !== "string" || !user || user.includes("\0"))) {
    throw InvalidArgument.create("user", `${shown(user)} is not a user name`, "a guest user name or uid");
  }
}

/** A file operation's arguments, acting as `user` when one is given (Python's `as_user`). @internal */
export function asUser(args: Header, user: string | undefined): Header {
  checkUser(user);
  return user === undefined || user === null ? args : { ...args, user };
}

/** `user`: the guest account (name or uid) a file operation acts as, with its permissions
 * (a write creates files it owns); `UserNotFound` for one the guest lacks. Default: as commands, the
 * template's image's `User` (an OCI image that sets one), else root. */
export interface FileUserOptions {
  user?: string;
}

/**
 * Chunks of a large `files.write` in flight at once (Python: `mvm.sdk.files.WRITE_WINDOW`):
 * a window is sent whole, then acknowledged together, so the sends, the supervisor's
 * relaying and the agent's disk writes overlap instead of taking turns per chunk.
 */
export const WRITE_WINDOW = 8;

/** The `fs.write_chunk` requests of a large write, `WRITE_WINDOW` at a time, each naming its `offset`. */
function* chunkWindows(handle: unknown, raw: Buffer): Generator<WireRequest[]> {
  for (let first = 0; first < raw.length; first += WRITE_WINDOW * CHUNK_SIZE) {
    const window: WireRequest[] = [];
    for (let start = first; start < Math.min(raw.length, first + WRITE_WINDOW * CHUNK_SIZE); start += CHUNK_SIZE) {
      window.push(["fs.write_chunk", { handle, offset: start }, raw.subarray(start, start + CHUNK_SIZE)]);
    }
    yield window;
  }
}

export class Files {
  /** @internal */
  constructor(protected readonly sandbox: Sandbox) {}

  /** Write `data` to `path` atomically (parents created by default); resolves with its entry. */
  async write(path: string, data: string | Uint8Array,
    options: { mode?: number; makeParents?: boolean } & FileUserOptions = {}): Promise<FileEntry> {
    const sb = this.sandbox;
    const at = sb.site();
    const target = absolutePath(path);
    const raw = toBuffer(data);
    const mode = options.mode ?? 0o644;
    const makeParents = options.makeParents ?? true;
    const begin = asUser({ path: target, mode, make_parents: makeParents }, options.user);
    let answer: Header;
    if (raw.length <= CHUNK_SIZE) {
      answer = (await sb.call("fs.write", { ...begin, append: false }, raw, { at })).result;
    } else {
      const { result } = await sb.call("fs.write_begin", begin, undefined, { at });
      const handle = result.handle;
      let committed = false;
      try {
        for (const window of chunkWindows(handle, raw)) {
          await sb.callMany(window, { at });
        }
        answer = (await sb.call("fs.write_end", { handle, commit: true }, undefined, { at })).result;
        committed = true;
      } finally {
        if (!committed) {
          await sb.call("fs.write_end", { handle, commit: false }, undefined, { at }).catch(() => undefined);
        }
      }
    }
    // a recording answers with the entry (it has nothing to stat)
    return answer.entry ? FileEntry.fromWire(answer.entry as Header) : this.stat(target, { user: options.user });
  }

  /** Read a whole file; `TooLarge` if it holds more than `maxBytes` (default 64 MiB). */
  async read(path: string, options: { maxBytes?: number } & FileUserOptions = {}): Promise<Buffer> {
    return this.readFor(path, options, "files.read");
  }

  private async readFor(path: string, options: { maxBytes?: number } & FileUserOptions, call: string): Promise<Buffer> {
    const target = absolutePath(path);
    const maxBytes = options.maxBytes ?? DEFAULT_MAX_READ_BYTES;
    if (typeof maxBytes !== "number" || !Number.isInteger(maxBytes) || maxBytes <= 0) {
      throw InvalidArgument.create("max_bytes", `${shown(maxBytes)} must be a positive integer`);
    }
    // The file streams back as `data` frames; the supervisor refuses one over `maxBytes` (TooLarge).
    const chunks: Buffer[] = [];
    await this.sandbox.call("fs.read", asUser({ path: target, max_bytes: maxBytes }, options.user), undefined,
      { call, onData: (_stream, data) => { chunks.push(data); } });
    return Buffer.concat(chunks);
  }

  /** `read` decoded as text (invalid bytes become U+FFFD). */
  async readText(path: string, options: { encoding?: BufferEncoding; maxBytes?: number } & FileUserOptions = {}): Promise<string> {
    const data = await this.readFor(path, { maxBytes: options.maxBytes, user: options.user }, "files.readText");
    const encoding = options.encoding ?? "utf8";
    return encoding === "utf8" || encoding === "utf-8" ? new TextDecoder().decode(data) : data.toString(encoding);
  }

  /** Entries of a directory, sorted by name. */
  async list(path = "/", options: FileUserOptions = {}): Promise<FileEntry[]> {
    const args = asUser({ path: absolutePath(path) }, options.user);
    const { result } = await this.sandbox.call("fs.list", args, undefined, { call: "files.list" });
    const entries = (Array.isArray(result.entries) ? result.entries : []).map((e) => FileEntry.fromWire(e as Header));
    return entries.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  }

  async stat(path: string, options: FileUserOptions = {}): Promise<FileEntry> {
    return this.statFor(path, options, "files.stat");
  }

  private async statFor(path: string, options: FileUserOptions, call: string): Promise<FileEntry> {
    const args = asUser({ path: absolutePath(path) }, options.user);
    return FileEntry.fromWire((await this.sandbox.call("fs.stat", args, undefined, { call })).result);
  }

  async exists(path: string, options: FileUserOptions = {}): Promise<boolean> {
    try {
      await this.statFor(path, options, "files.exists");
      return true;
    } catch (exc) {
      if (exc instanceof FileNotFoundInSandbox) return false;
      throw exc;
    }
  }

  async mkdir(path: string, options: { parents?: boolean; mode?: number } & FileUserOptions = {}): Promise<void> {
    await this.sandbox.call("fs.mkdir", asUser({ path: absolutePath(path), parents: options.parents ?? true,
      mode: options.mode ?? 0o755 }, options.user));
  }

  /** Remove a file, or a directory (`recursive: true` for a non-empty one). */
  async remove(path: string, options: { recursive?: boolean } & FileUserOptions = {}): Promise<void> {
    await this.sandbox.call("fs.remove", asUser({ path: absolutePath(path), recursive: options.recursive ?? false },
      options.user));
  }

  async move(src: string, dst: string, options: { overwrite?: boolean } & FileUserOptions = {}): Promise<void> {
    await this.sandbox.call("fs.move", asUser({ src: absolutePath(src), dst: absolutePath(dst),
      overwrite: options.overwrite ?? false }, options.user));
  }
}

export { SecretRef };
