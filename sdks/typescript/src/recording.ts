/**
 * Record and plan mode: `RecordedSandbox` and the process-wide recording, appending
 * exactly the events Python's `mvm.modes.recording` writes, so `mvmctl compile`
 * lowers a TypeScript script and its Python twin to the same workload IR.
 *
 * In record/plan mode `Sandbox.create(...)` returns a `RecordedSandbox`: the live
 * surface, each call validated as the live path validates it and appended, in order,
 * to the recording. Nothing boots.
 *
 * * `commands.run` resolves to `CommandResult { recorded: true, exitCode: null }`.
 * * `commands.start` resolves to a recorded `Process` whose `pid` is `null`.
 * * Reads (`files.read/list/stat/exists`, `logs`, a process's output or exit code)
 *   throw `NotAvailableInRecordMode` naming the call.
 * * `ports.*` and `network.*` (a forward, a policy change) need a running sandbox:
 *   they throw `NotAvailableInRecordMode` too (the policy given to `Sandbox.create`
 *   is part of the recording already).
 * * Secret references are recorded by name only; their values are never looked up.
 *
 * When `$MVM_RECORDING` names a file (`mvmctl compile`/`run` set it), each event is
 * appended to it as a JSON line and bytes go to `<file>.blobs/<sha256>`.
 */

import { spawnSync } from "node:child_process";
import { createHash } from "node:crypto";
import { appendFileSync, existsSync, mkdirSync, renameSync, writeFileSync } from "node:fs";
import { join } from "node:path";

import { InvalidArgument, InvalidState, NotAvailableInRecordMode, TemplateNotFound } from "./errors.js";
import { parseDuration } from "./durations.js";
import { collectIncludes, GUEST_ROOT } from "./includes.js";
import {
  CommandResult, FileEntry, LogEvent, NetworkInfo, PortForward, ProcessInfo, SandboxInfo, Snapshot,
} from "./models.js";
import { findMvmctl } from "./paths.js";
import { SecretRef } from "./policy.js";
import { repr, typeName } from "./pyrepr.js";
import {
  Commands, DEFAULT_MAX_OUTPUT_BYTES, Files, Network, Ports, Process, Sandbox, SIGNALS, type CreateOptions,
  type ForwardOptions, type LogsOptions, type NetworkUpdateOptions, type OutputChunk, type RunOptions,
  type StartOptions,
} from "./sandbox.js";
import {
  absolutePath, callerSite, defaultName, scriptDir, validateCommand, validatedSpec, type Env, type Mode, type Spec,
} from "./spec.js";

/** The file `mvmctl` tells a recorded script to append its events to. */
export const RECORDING_ENV = "MVM_RECORDING";
export const RECORDED_MODES = ["record", "plan"] as const;
/** Largest `maxOutputBytes` the supervisor accepts for `commands.run`. */
export const MAX_OUTPUT_LIMIT = 256 * 1024 * 1024;
/** Backends a recording may name (`mvm.backends.backend_names()`). */
export const BACKEND_NAMES = ["vm", "namespace"];

type Event = Record<string, unknown>;

/** Python's `json.dumps(obj, sort_keys=True, separators=(",", ":"))` (ASCII-escaped). */
export function pythonJson(value: unknown): string {
  const sortValue = (v: unknown): unknown => {
    if (Array.isArray(v)) return v.map(sortValue);
    if (v instanceof SecretRef) return v.toJSON();
    if (v && typeof v === "object") {
      const out: Record<string, unknown> = {};
      for (const key of Object.keys(v as object).sort()) out[key] = sortValue((v as Record<string, unknown>)[key]);
      return out;
    }
    return v;
  };
  return JSON.stringify(sortValue(value)).replace(/[\u0080-\uffff]/g,
    (c) => "\\u" + c.charCodeAt(0).toString(16).padStart(4, "0"));
}

/** The ordered calls of one process (every sandbox it created), and the bytes written. */
export class Recording {
  readonly path: string | null;
  readonly events: Event[] = [];
  private readonly blobs = new Map<string, Buffer>();
  private sandboxes = 0;

  constructor(path: string | null = null) {
    this.path = path || null;
    if (this.path !== null) mkdirSync(this.blobDir, { recursive: true });
  }

  get blobDir(): string {
    if (this.path === null) throw new Error("an in-memory recording has no blob directory");
    return this.path + ".blobs";
  }

  newSandbox(): number {
    return this.sandboxes++;
  }

  /** Keep `data` (content-addressed); returns its sha256. */
  store(data: Uint8Array): string {
    const digest = createHash("sha256").update(data).digest("hex");
    if (this.path === null) {
      if (!this.blobs.has(digest)) this.blobs.set(digest, Buffer.from(data));
    } else {
      const target = join(this.blobDir, digest);
      if (!existsSync(target)) {
        const tmp = join(this.blobDir, `.${digest}.${process.pid}.tmp`);
        writeFileSync(tmp, data);
        renameSync(tmp, target);
      }
    }
    return digest;
  }

  blob(digest: string): Buffer | undefined {
    return this.blobs.get(digest);
  }

  append(event: Event): Event {
    const full = { seq: this.events.length, ...event };
    this.events.push(full);
    if (this.path !== null) appendFileSync(this.path, pythonJson(full) + "\n", { mode: 0o600 });
    return full;
  }
}

let current: Recording | null = null;

/** The process-wide recording (to `$MVM_RECORDING` when set, else in memory). */
export function currentRecording(): Recording {
  const wanted = process.env[RECORDING_ENV] || null;
  if (current === null || current.path !== wanted) current = new Recording(wanted);
  return current;
}

/** Start a fresh process-wide recording (tests, or a process recording twice). */
export function resetRecording(): Recording {
  current = null;
  return currentRecording();
}

/** The IR form of an env mapping: literal values, or secret references by name only (sorted keys). */
export function encodeEnv(env: Env): Record<string, { kind: string; value?: string; name?: string }> {
  const out: Record<string, { kind: string; value?: string; name?: string }> = {};
  for (const key of Object.keys(env).sort()) {
    const value = env[key];
    out[key] = value instanceof SecretRef ? { kind: "secret_ref", name: value.name } : { kind: "literal", value };
  }
  return out;
}

/** @internal */
export function notAvailable(call: string, mode: string, hint: string): never {
  throw new NotAvailableInRecordMode(
    `${call} is not available in ${mode} mode: nothing runs while a script is recorded, so there is no sandbox `
    + `to read from; ${hint}`, { call, mode });
}

/** @internal */
export function recordedMode(): string {
  const mode = process.env.MVM_MODE;
  return mode === "record" || mode === "plan" ? mode : "record";
}

function checkModeBits(mode: unknown, field = "mode"): number {
  if (typeof mode !== "number" || !Number.isInteger(mode) || mode < 0 || mode > 0o7777) {
    throw InvalidArgument.create(field, `${repr(mode)} is not a file mode`, "0..0o7777, e.g. 0o644");
  }
  return mode;
}

function checkRunLimits(timeoutSeconds: unknown, maxOutputBytes: unknown): void {
  if (typeof maxOutputBytes !== "number" || !Number.isInteger(maxOutputBytes) || !(maxOutputBytes > 0 && maxOutputBytes <= MAX_OUTPUT_LIMIT)) {
    throw InvalidArgument.create("max_output_bytes", `${repr(maxOutputBytes)} is out of range`, `1..${MAX_OUTPUT_LIMIT}`);
  }
  if (timeoutSeconds !== null && (typeof timeoutSeconds !== "number" || !(timeoutSeconds > 0) || timeoutSeconds === Infinity)) {
    throw InvalidArgument.create("timeout_seconds", `${repr(timeoutSeconds)} must be a positive number`);
  }
}

function bytesOf(data: unknown, field: string): Buffer {
  if (typeof data === "string") return Buffer.from(data, "utf8");
  if (data instanceof Uint8Array) return Buffer.from(data.buffer, data.byteOffset, data.byteLength);
  throw InvalidArgument.create(field, `${typeName(data)} is not bytes or str`);
}

// ---- the template check (what Python's record mode does without building) ----------------

interface Catalog {
  available: string[];
  unbuildable: Record<string, string>;
}

let catalogCache: Catalog | null | undefined;

/**
 * The templates this host can build: `$MVM_TEMPLATE_CATALOG` (set by `mvmctl compile`/`run`
 * for a Node script), else `mvmctl template ls --available --json`; `null` when neither is
 * reachable (admission then reports an unknown template).
 */
function templateCatalog(): Catalog | null {
  if (catalogCache !== undefined) return catalogCache;
  catalogCache = null;
  const fromEnv = process.env.MVM_TEMPLATE_CATALOG;
  if (fromEnv) {
    try {
      const parsed = JSON.parse(fromEnv) as Partial<Catalog>;
      catalogCache = { available: parsed.available ?? [], unbuildable: parsed.unbuildable ?? {} };
      return catalogCache;
    } catch {
      // fall through
    }
  }
  const mvmctl = findMvmctl();
  if (mvmctl !== null) {
    const result = spawnSync(mvmctl, ["template", "ls", "--available", "--json"], { encoding: "utf8", timeout: 60_000 });
    if (result.status === 0) {
      try {
        catalogCache = { available: JSON.parse(result.stdout) as string[], unbuildable: {} };
      } catch {
        catalogCache = null;
      }
    }
  }
  return catalogCache;
}

/** difflib's `SequenceMatcher(None, a, b).ratio()` (no junk: template names are short). */
function ratio(a: string, b: string): number {
  const b2j = new Map<string, number[]>();
  [...b].forEach((ch, j) => b2j.set(ch, [...(b2j.get(ch) ?? []), j]));
  let matches = 0;
  const queue: [number, number, number, number][] = [[0, a.length, 0, b.length]];
  while (queue.length) {
    const [alo, ahi, blo, bhi] = queue.pop() as [number, number, number, number];
    let besti = alo;
    let bestj = blo;
    let bestsize = 0;
    let j2len = new Map<number, number>();
    for (let i = alo; i < ahi; i++) {
      const next = new Map<number, number>();
      for (const j of b2j.get(a[i]) ?? []) {
        if (j < blo) continue;
        if (j >= bhi) break;
        const k = (j2len.get(j - 1) ?? 0) + 1;
        next.set(j, k);
        if (k > bestsize) {
          besti = i - k + 1;
          bestj = j - k + 1;
          bestsize = k;
        }
      }
      j2len = next;
    }
    if (bestsize) {
      matches += bestsize;
      if (alo < besti && blo < bestj) queue.push([alo, besti, blo, bestj]);
      if (besti + bestsize < ahi && bestj + bestsize < bhi) queue.push([besti + bestsize, ahi, bestj + bestsize, bhi]);
    }
  }
  const total = a.length + b.length;
  return total ? (2 * matches) / total : 1;
}

function closeMatch(word: string, possibilities: string[]): string | null {
  let best: [number, string] | null = null;
  for (const candidate of possibilities) {
    const score = ratio(candidate, word);
    if (score < 0.6) continue;
    if (best === null || score > best[0] || (score === best[0] && candidate > best[1])) best = [score, candidate];
  }
  return best ? best[1] : null;
}

function checkTemplate(template: unknown): string {
  if (typeof template !== "string" || !template) {
    throw InvalidArgument.create("template", `${repr(template)} is not a template name`);
  }
  if (template.endsWith(".toml")) return template; // a custom template file: admission checks it
  if (template.startsWith("oci:")) return template; // an OCI image: admission checks the reference, never pulls
  const catalog = templateCatalog();
  if (catalog === null || catalog.available.includes(template)) return template;
  const available = [...catalog.available].sort();
  let reason = catalog.unbuildable[template];
  if (reason === undefined) {
    const close = closeMatch(template, available);
    reason = "unknown template" + (close ? `; did you mean ${repr(close)}?` : "");
  }
  throw TemplateNotFound.create(template, available, reason);
}

// ---- the sandbox -------------------------------------------------------------------------

interface RecordedSpec extends Spec {
  template: string;
  backend: string | null;
}

/** What `Sandbox.create` resolves to in record/plan mode: the same surface, nothing boots. */
export class RecordedSandbox extends Sandbox {
  override readonly recorded: boolean = true;
  override readonly mode: Mode;
  /** @internal */
  readonly recording: Recording;
  /** @internal */
  readonly index: number;
  private readonly spec: RecordedSpec;
  private recordedState = "running";
  private destroyed = false;
  /** @internal */
  processes = 0;
  private snapshots = 0;

  /** @internal */
  constructor(recording: Recording, index: number, mode: Mode, spec: RecordedSpec) {
    const id = `recorded-${index + 1}`;
    super(id, spec.name ?? defaultName(spec.workloadId, `sb-recorded-${index + 1}`), "");
    this.recording = recording;
    this.index = index;
    this.mode = mode;
    this.spec = spec;
  }

  protected override makeCommands(): Commands {
    return new RecordedCommands(this);
  }

  protected override makeFiles(): Files {
    return new RecordedFiles(this);
  }

  protected override makePorts(): Ports {
    return new RecordedPorts(this);
  }

  protected override makeNetwork(): Network {
    return new RecordedNetwork(this);
  }

  override toString(): string {
    return `<RecordedSandbox ${this.name} (${this.mode} mode)>`;
  }

  /** Validate like the live create and record the creation; nothing boots. @internal */
  static override async create(template = "python-3.13",
    options: CreateOptions & { at?: string | null } = {}): Promise<RecordedSandbox> {
    const at = options.at !== undefined ? options.at : callerSite();
    const mode = options.mode ?? "record";
    if (!(RECORDED_MODES as readonly string[]).includes(mode)) {
      throw InvalidArgument.create("mode", `${repr(mode)} is not a recording mode`, [...RECORDED_MODES]);
    }
    checkTemplate(template);
    const spec = validatedSpec(options);
    const files = collectIncludes(options.include ?? [], scriptDir());
    const backend = options.backend ?? null;
    if (backend !== null && !BACKEND_NAMES.includes(backend)) {
      throw InvalidArgument.create("backend", `unknown backend ${repr(backend)}`, BACKEND_NAMES);
    }
    const fromSnapshot = options.fromSnapshot ?? null;
    if (fromSnapshot !== null && (typeof fromSnapshot !== "string" || !fromSnapshot.trim())) {
      throw InvalidArgument.create("from_snapshot", `${repr(fromSnapshot)} must be a snapshot id or name`);
    }
    const recording = currentRecording();
    const byPath = new Map<string, { data: Buffer; mode: number }>();
    for (const file of files) byPath.set(file.guestPath, { data: file.data, mode: file.mode });
    const included = [...byPath.keys()].sort().map((guestPath) => {
      const { data, mode: bits } = byPath.get(guestPath) as { data: Buffer; mode: number };
      return { path: guestPath.slice(GUEST_ROOT.length + 1), size: data.length, sha256: recording.store(data), mode: bits };
    });
    const index = recording.newSandbox();
    recording.append({
      op: "sandbox.create", sandbox: index, mode, at,
      template, name: spec.name, workload_id: spec.workloadId, backend,
      resources: spec.resources.toDict(), network: spec.network.toDict(),
      ttl_seconds: spec.ttlSeconds, tags: spec.tags, from_snapshot: fromSnapshot,
      env: encodeEnv(spec.env),
      include: { guest_root: GUEST_ROOT, paths: [...(options.include ?? [])], files: included },
    });
    return new RecordedSandbox(recording, index, mode as Mode, { ...spec, template, backend });
  }

  /** @internal */
  record(op: string, fields: Event = {}, at: string | null = callerSite()): Event {
    if (this.destroyed) throw new InvalidState(`sandbox ${this.name} was destroyed`, { state: "destroyed" });
    return this.recording.append({ op, sandbox: this.index, at, ...fields });
  }

  /** @internal */
  unavailable(call: string, hint: string): never {
    notAvailable(call, this.mode, hint);
  }

  override async client(): Promise<never> {
    return this.unavailable("the supervisor connection", "a recorded sandbox has no supervisor");
  }

  /** What was asked for (no backend facts). */
  override async describe(): Promise<SandboxInfo> {
    return this.describeNow();
  }

  private describeNow(): SandboxInfo {
    return new SandboxInfo(this.id, this.name, this.destroyed ? "destroyed" : this.recordedState, this.spec.template,
      this.spec.backend ?? "", "", this.spec.resources, NetworkInfo.fromWire(this.spec.network.toDict()), 0, null, this.spec.workloadId,
      { mode: this.mode, recorded: true, ttl_seconds: this.spec.ttlSeconds, tags: this.spec.tags });
  }

  // eslint-disable-next-line require-yield
  override async *logs(_options: LogsOptions = {}): AsyncGenerator<LogEvent, void, undefined> {
    return this.unavailable("Sandbox.logs", "read logs of a live sandbox with `mvmctl logs NAME`");
  }

  private transition(op: string, state: string, fields: Event = {}, at: string | null): SandboxInfo {
    this.record(op, fields, at);
    this.recordedState = state;
    return this.describeNow();
  }

  override async stop(): Promise<SandboxInfo> {
    return this.transition("sandbox.stop", "stopped", {}, callerSite());
  }

  override async start(): Promise<SandboxInfo> {
    return this.transition("sandbox.start", "running", {}, callerSite());
  }

  override async pause(): Promise<SandboxInfo> {
    return this.transition("sandbox.pause", "paused", {}, callerSite());
  }

  override async resume(snapshot?: string | Snapshot | null): Promise<SandboxInfo> {
    const at = callerSite();
    const snapId = snapshot instanceof Snapshot ? snapshot.id : snapshot ?? null;
    let ref: Event | null;
    if (snapId === null) ref = null;
    else if (typeof snapId !== "string" || !snapId) {
      throw InvalidArgument.create("snapshot", `${repr(snapshot)} is not a snapshot`, "a Snapshot or its id");
    } else if (snapId.startsWith(`${this.id}-snapshot-`)) {
      ref = { recorded: parseInt(snapId.slice(snapId.lastIndexOf("-") + 1), 10) - 1 };
    } else ref = { id: snapId };
    return this.transition("sandbox.resume", "running", { snapshot: ref }, at);
  }

  override async snapshot(name?: string | null, options: { expires?: string | number | null; keep?: boolean } = {}): Promise<Snapshot> {
    const at = callerSite();
    const expires = options.expires ?? null;
    const expiresSeconds = expires === null ? null : parseDuration(expires, "expires");
    if (name !== undefined && name !== null && (typeof name !== "string" || !name)) {
      throw InvalidArgument.create("name", `${repr(name)} is not a snapshot name`);
    }
    const index = this.snapshots;
    const keep = Boolean(options.keep);
    this.record("sandbox.snapshot", { name: name ?? null, expires_seconds: expiresSeconds, keep, snapshot: index }, at);
    this.snapshots += 1;
    return new Snapshot(`${this.id}-snapshot-${index + 1}`, name || `snapshot-${index + 1}`, this.id, "recorded", 0, null,
      0, keep);
  }

  /** Recorded once; safe to call twice (like the live one). */
  override async destroy(): Promise<void> {
    this.destroyNow(callerSite());
  }

  private destroyNow(at: string | null): void {
    if (this.destroyed) return;
    this.record("sandbox.destroy", {}, at);
    this.destroyed = true;
  }

  override async kill(): Promise<void> {
    this.destroyNow(callerSite());
  }

  /** Nothing to disconnect from. */
  override close(): void {}

  override async [Symbol.asyncDispose](): Promise<void> {
    this.destroyNow(callerSite());
  }

  override [Symbol.dispose](): void {
    this.destroyNow(callerSite());
  }
}

// ---- commands -----------------------------------------------------------------------------

/** `sandbox.commands` in record/plan mode. */
export class RecordedCommands extends Commands {
  private get sb(): RecordedSandbox {
    return this.sandbox as RecordedSandbox;
  }

  /** Record the command; the result says `recorded: true` and has no exit code. */
  override async run(argv: string[] | string, options: RunOptions = {}): Promise<CommandResult> {
    const at = callerSite();
    const checked = validateCommand(argv, options.env, options.cwd);
    const timeoutSeconds = options.timeoutSeconds === undefined ? 60 : options.timeoutSeconds;
    const maxOutputBytes = options.maxOutputBytes ?? DEFAULT_MAX_OUTPUT_BYTES;
    checkRunLimits(timeoutSeconds, maxOutputBytes);
    const payload = options.stdin === undefined || options.stdin === null ? Buffer.alloc(0) : bytesOf(options.stdin, "stdin");
    const sb = this.sb;
    const stdinSha = payload.length ? sb.recording.store(payload) : null;
    sb.record("commands.run", {
      argv: checked.argv, env: encodeEnv(checked.env), cwd: options.cwd ?? null, timeout_seconds: timeoutSeconds,
      max_output_bytes: maxOutputBytes, stdin_sha256: stdinSha, check: Boolean(options.check),
      auto_resume: Boolean(options.autoResume),
    }, at);
    return new CommandResult({ exitCode: null, stdout: "", stderr: "", auditId: null, durationSeconds: 0, recorded: true });
  }

  /** Record the start; resolves to a handle whose `pid` is `null`. */
  override async start(argv: string[] | string, options: StartOptions = {}): Promise<Process> {
    const at = callerSite();
    const checked = validateCommand(argv, options.env, options.cwd);
    const sb = this.sb;
    const index = sb.processes;
    sb.record("commands.start", {
      argv: checked.argv, env: encodeEnv(checked.env), cwd: options.cwd ?? null, stdin: Boolean(options.stdin),
      auto_resume: Boolean(options.autoResume), process: index,
    }, at);
    sb.processes += 1;
    return new RecordedProcess(sb, index, checked.argv, Boolean(options.stdin));
  }

  override async connect(_pid: number): Promise<Process> {
    return this.sb.unavailable("commands.connect", "a recorded sandbox has no running processes to attach to");
  }

  override async list(): Promise<ProcessInfo[]> {
    return this.sb.unavailable("commands.list", "list processes of a live sandbox with `mvmctl proc ls NAME`");
  }
}

/**
 * A process `commands.start` recorded. Signals and stdin are recorded; anything that
 * needs the real process (its exit code, output, info) throws `NotAvailableInRecordMode`.
 */
export class RecordedProcess extends Process {
  override readonly recorded: boolean = true;
  readonly index: number;
  private readonly hasStdin: boolean;

  /** @internal */
  constructor(sandbox: RecordedSandbox, index: number, argv: string[], stdin: boolean) {
    super(sandbox, null, null, argv);
    this.index = index;
    this.hasStdin = stdin;
  }

  private get sb(): RecordedSandbox {
    return this.sandbox as RecordedSandbox;
  }

  override toString(): string {
    return `<RecordedProcess #${this.index + 1} argv=${repr(this.argv)}>`;
  }

  private unavailable(call: string): never {
    return this.sb.unavailable(`Process.${call}`, "a recorded process never ran, so it has no exit code or output (use "
      + "commands.run in live mode, or `mvmctl proc` on a live sandbox)");
  }

  override async wait(_timeoutSeconds?: number): Promise<number> {
    return this.unavailable("wait");
  }

  override async exitCode(): Promise<number | null> {
    return this.unavailable("exitCode");
  }

  override async isRunning(): Promise<boolean> {
    return this.unavailable("isRunning");
  }

  override async info(): Promise<ProcessInfo> {
    return this.unavailable("info");
  }

  // eslint-disable-next-line require-yield
  override async *output(_options: { replay?: boolean } = {}): AsyncGenerator<OutputChunk, void, undefined> {
    return this.unavailable("output");
  }

  override stdout(): AsyncGenerator<string, void, undefined> {
    return this.unavailable("stdout");
  }

  override stderr(): AsyncGenerator<string, void, undefined> {
    return this.unavailable("stderr");
  }

  override async signal(sig: string | number = "TERM", options: { group?: boolean } = {}): Promise<void> {
    const at = callerSite();
    let name: string | number;
    if (typeof sig === "string") {
      const upper = sig.toUpperCase();
      name = upper.startsWith("SIG") ? upper.slice(3) : upper;
      if (!(SIGNALS as readonly string[]).includes(name)) {
        throw InvalidArgument.create("signal", `unknown signal ${repr(sig)}`, [...SIGNALS]);
      }
    } else {
      if (typeof sig !== "number" || !Number.isInteger(sig) || !(sig > 0 && sig < 65)) {
        throw InvalidArgument.create("signal", `${repr(sig)} is not a signal`, [...SIGNALS]);
      }
      name = sig;
    }
    this.sb.record("process.signal", { process: this.index, signal: name, group: options.group ?? true }, at);
  }

  override async kill(): Promise<void> {
    await this.signal("KILL");
  }

  override async sendStdin(data: string | Uint8Array): Promise<void> {
    const at = callerSite();
    if (!this.hasStdin) throw new InvalidState("the process was not started with stdin: true", { state: "no-stdin" });
    const raw = bytesOf(data, "data");
    this.sb.record("process.stdin", { process: this.index, sha256: this.sb.recording.store(raw), size: raw.length }, at);
  }

  override async closeStdin(): Promise<void> {
    const at = callerSite();
    if (!this.hasStdin) throw new InvalidState("the process was not started with stdin: true", { state: "no-stdin" });
    this.sb.record("process.close_stdin", { process: this.index }, at);
  }
}

// ---- files -----------------------------------------------------------------------------------

const READ_HINT = "a recorded sandbox has no files yet (read them from a live sandbox, e.g. `mvmctl fs read`)";

/** `sandbox.files` in record/plan mode: writes are recorded, reads throw. */
export class RecordedFiles extends Files {
  private get sb(): RecordedSandbox {
    return this.sandbox as RecordedSandbox;
  }

  override async write(path: string, data: string | Uint8Array, options: { mode?: number; makeParents?: boolean } = {}): Promise<FileEntry> {
    const at = callerSite();
    const target = absolutePath(path);
    const raw = bytesOf(data, "data");
    const mode = checkModeBits(options.mode ?? 0o644);
    const digest = this.sb.recording.store(raw);
    this.sb.record("files.write", { path: target, sha256: digest, size: raw.length, mode,
      make_parents: options.makeParents ?? true }, at);
    const name = target.replace(/\/+$/, "").split("/").pop() ?? "";
    return new FileEntry(name, target, "file", raw.length, mode, 0);
  }

  override async read(path: string, _options: { maxBytes?: number } = {}): Promise<Buffer> {
    absolutePath(path);
    return this.sb.unavailable("files.read", READ_HINT);
  }

  override async readText(path: string, _options: { encoding?: BufferEncoding; maxBytes?: number } = {}): Promise<string> {
    absolutePath(path);
    return this.sb.unavailable("files.readText", READ_HINT);
  }

  override async list(path = "/"): Promise<FileEntry[]> {
    absolutePath(path);
    return this.sb.unavailable("files.list", "a recorded sandbox has no files yet (`mvmctl fs ls` on a live one)");
  }

  override async stat(path: string): Promise<FileEntry> {
    absolutePath(path);
    return this.sb.unavailable("files.stat", "a recorded sandbox has no files yet (`mvmctl fs stat` on a live one)");
  }

  override async exists(path: string): Promise<boolean> {
    absolutePath(path);
    return this.sb.unavailable("files.exists", "a recorded sandbox has no files yet (`mvmctl fs stat` on a live one)");
  }

  override async mkdir(path: string, options: { parents?: boolean; mode?: number } = {}): Promise<void> {
    const at = callerSite();
    const target = absolutePath(path);
    const mode = checkModeBits(options.mode ?? 0o755);
    this.sb.record("files.mkdir", { path: target, parents: options.parents ?? true, mode }, at);
  }

  override async remove(path: string, options: { recursive?: boolean } = {}): Promise<void> {
    const at = callerSite();
    this.sb.record("files.remove", { path: absolutePath(path), recursive: Boolean(options.recursive) }, at);
  }

  override async move(src: string, dst: string, options: { overwrite?: boolean } = {}): Promise<void> {
    const at = callerSite();
    this.sb.record("files.move", { src: absolutePath(src), dst: absolutePath(dst), overwrite: Boolean(options.overwrite) }, at);
  }
}

// ---- ports and network ------------------------------------------------------------------------

/** Python's `RecordedNetworkOps._HINT`. */
const NETWORK_OPS_HINT = "port forwards and policy updates act on a running sandbox: use them in live mode "
  + "(mvmctl run --mode live), or `mvmctl port forward` / `mvmctl network update` on a live one";

/** `sandbox.ports` in record/plan mode: a forward needs a running sandbox, so each call says so. */
export class RecordedPorts extends Ports {
  private unavailable(call: string): never {
    return (this.sandbox as RecordedSandbox).unavailable(`ports.${call}`, NETWORK_OPS_HINT);
  }

  override async forward(_options: ForwardOptions): Promise<PortForward> {
    return this.unavailable("forward");
  }

  override async list(): Promise<PortForward[]> {
    return this.unavailable("list");
  }

  override async close(_forward: PortForward | string | number): Promise<void> {
    return this.unavailable("close");
  }
}

/**
 * `sandbox.network` in record/plan mode: a policy change needs a running sandbox;
 * `policy()` answers with the policy given to `Sandbox.create` (as `describe()` does,
 * and as Python's record transport does).
 */
export class RecordedNetwork extends Network {
  private unavailable(call: string): never {
    return (this.sandbox as RecordedSandbox).unavailable(`network.${call}`, NETWORK_OPS_HINT);
  }

  override async update(_options?: NetworkUpdateOptions | readonly string[]): Promise<NetworkInfo> {
    return this.unavailable("update");
  }
}
