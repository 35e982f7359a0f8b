/**
 * Record and plan mode: the record transport and the process-wide recording, appending
 * exactly the events Python's `mvm.modes.recording` writes, so `mvmctl compile`
 * lowers a TypeScript script and its Python twin to the same workload IR.
 *
 * In record/plan mode `Sandbox.create(...)` returns the same `Sandbox` class as in live
 * mode, talking to a `RecordTransport` instead of a supervisor (`transport.ts`): the SDK
 * builds its wire requests exactly as it does live; the record transport checks what
 * the supervisor would check, appends each request, in order and in the IR's
 * vocabulary, to the recording, and answers with a recorded result. Nothing boots.
 *
 * * `commands.run` resolves to `CommandResult { recorded: true, exitCode: null }`.
 * * `commands.start` resolves to a `Process` whose `pid` is `null` (named by its index).
 * * Reads (`files.read/list/stat/exists`, `logs`, a process's output or exit code),
 *   port forwards and policy changes throw `NotAvailableInRecordMode` naming the call.
 * * Secret references are recorded by name only; their values are never looked up.
 *
 * When `$MVM_RECORDING` names a file (`mvmctl compile`/`run` set it), each event is
 * appended to it as a JSON line and bytes go to `<file>.blobs/<sha256>`.
 */

import { spawnSync } from "node:child_process";
import { createHash } from "node:crypto";
import { appendFileSync, existsSync, mkdirSync, renameSync, writeFileSync } from "node:fs";
import { join } from "node:path";

import type { CallResult, StreamChunk } from "./client.js";
import { InvalidArgument, InvalidState, NotAvailableInRecordMode, TemplateNotFound, UnknownOp } from "./errors.js";
import { parseDuration } from "./durations.js";
import { GUEST_ROOT, type IncludedFile } from "./includes.js";
import { findMvmctl } from "./paths.js";
import { NetworkPolicy, Resources, SecretRef } from "./policy.js";
import type { Header } from "./protocol.js";
import { shown } from "./shown.js";
import { STDIN_STAGING_DIR } from "./sandbox.js";
import { absolutePath, type Env } from "./spec.js";
import { allAnswered, type RequestContext, type Transport, type TransportCallOptions, type TransportStreamOptions, type WireRequest } from "./transport.js";

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
    throw InvalidArgument.create(field, `${shown(mode)} is not a file mode`, "0..0o7777, e.g. 0o644");
  }
  return mode;
}

function checkRunLimits(timeoutSeconds: unknown, maxOutputBytes: unknown): void {
  if (typeof maxOutputBytes !== "number" || !Number.isInteger(maxOutputBytes) || !(maxOutputBytes > 0 && maxOutputBytes <= MAX_OUTPUT_LIMIT)) {
    throw InvalidArgument.create("max_output_bytes", `${shown(maxOutputBytes)} is out of range`, `1..${MAX_OUTPUT_LIMIT}`);
  }
  if (timeoutSeconds !== null && (typeof timeoutSeconds !== "number" || !(timeoutSeconds > 0) || timeoutSeconds === Infinity)) {
    throw InvalidArgument.create("timeout_seconds", `${shown(timeoutSeconds)} must be a positive number`);
  }
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

/**
 * The name a mistyped `word` most likely meant, for "did you mean" hints: the one fewest
 * single-character edits away (Levenshtein distance), if that is at most a third of
 * `word`'s length (at least 1); ties go to the first in sorted order. The same rule as
 * Python's `mvm.templates.catalog.closest_name` (test/recording.test.ts compares them).
 */
export function closestName(word: string, names: readonly string[]): string | null {
  const limit = Math.max(1, Math.floor([...word].length / 3));
  let best: [number, string] | null = null;
  for (const name of [...names].sort()) {
    const distance = editDistance(word, name);
    if (distance <= limit && (best === null || distance < best[0])) best = [distance, name];
  }
  return best ? best[1] : null;
}

/** Levenshtein distance: the fewest single-character inserts, deletes and replaces. */
export function editDistance(a: string, b: string): number {
  const right = [...b];
  let previous = Array.from({ length: right.length + 1 }, (_, j) => j);
  for (const [i, charA] of [...a].entries()) {
    const current = [i + 1];
    for (const [j, charB] of right.entries()) {
      current.push(Math.min(previous[j + 1] + 1, current[j] + 1, previous[j] + (charA === charB ? 0 : 1)));
    }
    previous = current;
  }
  return previous[right.length];
}

/** The check Python's record mode makes of a template name, without building. @internal */
export function checkTemplate(template: unknown): string {
  if (typeof template !== "string" || !template) {
    throw InvalidArgument.create("template", `${shown(template)} is not a template name`);
  }
  if (template.endsWith(".toml")) return template; // a custom template file: admission checks it
  if (template.startsWith("oci:")) return template; // an OCI image: admission checks the reference, never pulls
  const catalog = templateCatalog();
  if (catalog === null || catalog.available.includes(template)) return template;
  const available = [...catalog.available].sort();
  let reason = catalog.unbuildable[template];
  if (reason === undefined) {
    const close = closestName(template, available);
    reason = "unknown template" + (close ? `; did you mean '${close}'?` : "");
  }
  throw TemplateNotFound.create(template, available, reason);
}

// ---- the record transport ------------------------------------------------------------------

/** `Sandbox.create`'s arguments, checked once: what a recording's `sandbox.create` holds. */
export interface CreateRequest {
  template: string;
  name: string | null;
  workloadId: string | null;
  backend: string | null;
  resources: Resources;
  network: NetworkPolicy;
  ttlSeconds: number | null;
  env: Env;
  tags: Record<string, string>;
  fromSnapshot: string | null;
  autoPauseSeconds: number | null;
  /** Who the script acts for (audited with the creation and every request). */
  onBehalfOf: Record<string, string> | null;
  /** As given, relative to the script's folder. */
  include: string[];
  files: IncludedFile[];
}

const FILES_HINT = "a recorded sandbox has no files yet (read them from a live sandbox, e.g. `mvmctl fs read`)";
const PROCESS_HINT = "a recorded process never ran, so it has no exit code or output (use commands.run in live "
  + "mode, or `mvmctl proc` on a live sandbox)";
const NETWORK_HINT = "port forwards and policy updates act on a running sandbox: use them in live mode "
  + "(mvmctl run --mode live), or `mvmctl port forward` / `mvmctl network update` on a live one";
const NO_PROCESSES_HINT = "a recorded sandbox has no running processes to attach to";
/** Ops that need a live answer, with the hint of their `NotAvailableInRecordMode` (Python's `_UNAVAILABLE`). */
const UNAVAILABLE: Record<string, string> = {
  "fs.read": FILES_HINT,
  "fs.list": "a recorded sandbox has no files yet (`mvmctl fs ls` on a live one)",
  "fs.stat": "a recorded sandbox has no files yet (`mvmctl fs stat` on a live one)",
  "sandbox.logs": "read logs of a live sandbox with `mvmctl logs NAME`",
  "proc.list": "list processes of a live sandbox with `mvmctl proc ls NAME`",
  "proc.wait": PROCESS_HINT,
  "proc.attach": PROCESS_HINT,
  "port.forward": NETWORK_HINT,
  "port.list": NETWORK_HINT,
  "port.close": NETWORK_HINT,
  "network.update": NETWORK_HINT,
};

/** A command request's env in IR form: its literals, and its secrets by name (never values). */
function irEnv(args: Header): ReturnType<typeof encodeEnv> {
  const names = (args.secret_names ?? {}) as Record<string, string>;
  const env: Env = {};
  for (const [key, value] of Object.entries((args.env ?? {}) as Record<string, string>)) {
    if (!(key in names)) env[key] = value;
  }
  for (const [key, name] of Object.entries(names)) env[key] = new SecretRef(name);
  return encodeEnv(env);
}

type Handler = (args: Header, payload: Buffer, at: string | null) => Header;

/**
 * The transport of a sandbox created in record/plan mode (Python: `RecordTransport`).
 * `Sandbox`, `Commands`, `Files` and `Process` send it the wire requests they send a live
 * supervisor; it appends each to the recording in the IR's vocabulary and answers like
 * the supervisor with recorded results (`recorded: true`, no exit code, no pid: a started
 * process is named by its index, `{process: i}`).
 */
export class RecordTransport implements Transport {
  readonly closed = false;
  readonly sandboxId: string;
  readonly name: string;
  private readonly processes: boolean[] = []; // per recorded process: started with stdin
  private snapshots = 0;
  private readonly writes = new Map<string, [Header, Buffer[]]>(); // handle -> a chunked fs.write
  private readonly staged = new Map<string, Buffer>(); // a run's stdin staged as a guest file
  private destroyed = false;

  private constructor(readonly recording: Recording, readonly index: number, readonly mode: string,
    private readonly info: Header) {
    this.sandboxId = String(info.id);
    this.name = String(info.name);
  }

  /** Record `request` as a `sandbox.create` (included files stored by sha256). */
  static open(mode: string, request: CreateRequest, at: string | null,
    defaultName: (fallback: string) => string): RecordTransport {
    if (!(RECORDED_MODES as readonly string[]).includes(mode)) {
      throw InvalidArgument.create("mode", `${shown(mode)} is not a recording mode`, [...RECORDED_MODES]);
    }
    const recording = currentRecording();
    const byPath = new Map<string, { data: Buffer; mode: number }>();
    for (const file of request.files) byPath.set(file.guestPath, { data: file.data, mode: file.mode });
    const included = [...byPath.keys()].sort().map((guestPath) => {
      const { data, mode: bits } = byPath.get(guestPath) as { data: Buffer; mode: number };
      return { path: guestPath.slice(GUEST_ROOT.length + 1), size: data.length, sha256: recording.store(data), mode: bits };
    });
    const index = recording.newSandbox();
    recording.append({
      op: "sandbox.create", sandbox: index, mode, at,
      template: request.template, name: request.name, workload_id: request.workloadId, backend: request.backend,
      resources: request.resources.toDict(), network: request.network.toDict(),
      ttl_seconds: request.ttlSeconds, tags: request.tags, from_snapshot: request.fromSnapshot,
      env: encodeEnv(request.env),
      include: { guest_root: GUEST_ROOT, paths: [...request.include], files: included },
      auto_pause_seconds: request.autoPauseSeconds, on_behalf_of: request.onBehalfOf,
    });
    const sandboxId = `recorded-${index + 1}`;
    return new RecordTransport(recording, index, mode, {
      id: sandboxId, name: request.name ?? defaultName(`sb-${sandboxId}`), state: "running",
      template: request.template, backend: request.backend ?? "", isolation: "",
      resources: request.resources.toDict(), network: request.network.toDict(), created_at: 0, expires_at: null,
      workload_id: request.workloadId,
      details: { mode, recorded: true, ttl_seconds: request.ttlSeconds, tags: request.tags,
        auto_pause_seconds: request.autoPauseSeconds },
    });
  }

  toString(): string {
    return `<RecordTransport ${this.name} (${this.mode} mode)>`;
  }

  // ---- the Transport shape ----

  async call(op: string, args: Header | null = null, payload?: Uint8Array,
    options: TransportCallOptions = {}): Promise<CallResult> {
    return this.callNow(op, args, payload, options);
  }

  /** `call`, answered at once (recording waits on nothing): `using` disposal records with it. */
  callNow(op: string, args: Header | null = null, payload?: Uint8Array, options: TransportCallOptions = {}): CallResult {
    const request: Header = { ...(args ?? {}) };
    const call = options.call ?? op;
    if (op in UNAVAILABLE) notAvailable(call, this.mode, UNAVAILABLE[op]);
    if (op === "proc.info") notAvailable(call, this.mode, "process" in request ? PROCESS_HINT : NO_PROCESSES_HINT);
    if (op === "sandbox.describe") return { result: this.describe(), payload: Buffer.alloc(0) };
    if (this.destroyed) throw new InvalidState(`sandbox ${this.name} was destroyed`, { state: "destroyed" });
    const handler = this.handlers[op];
    if (handler === undefined) throw new UnknownOp(`${op} cannot be recorded`);
    const data = payload === undefined ? Buffer.alloc(0) : Buffer.from(payload.buffer, payload.byteOffset, payload.byteLength);
    return { result: handler(request, data, options.at ?? null), payload: Buffer.alloc(0) };
  }

  /** Each request recorded in turn (a recording waits on nothing). */
  async callMany(requests: WireRequest[], context: RequestContext = {}): Promise<CallResult[]> {
    return allAnswered(await Promise.allSettled(requests.map(([op, args, payload]) => this.call(op, args, payload, context))));
  }

  // eslint-disable-next-line require-yield
  async *stream(op: string, _args: Header | null = null, context: TransportStreamOptions = {}): AsyncGenerator<StreamChunk, void, undefined> {
    notAvailable(context.call ?? op, this.mode, UNAVAILABLE[op] ?? PROCESS_HINT);
  }

  /** Nothing to disconnect from. */
  close(): void {}

  // ---- ops ----

  private record(op: string, at: string | null, fields: Header = {}): void {
    this.recording.append({ op, sandbox: this.index, at, ...fields });
  }

  private describe(): Header {
    return { ...this.info, state: this.destroyed ? "destroyed" : this.info.state };
  }

  private transition(op: string, state: string, at: string | null, fields: Header = {}): Header {
    this.record(op, at, fields);
    this.info.state = state;
    return this.describe();
  }

  private refuseUser(args: Header, call: string): void {
    if (args.user !== undefined && args.user !== null) { // workload-v1 has no field for it: recording would drop it
      notAvailable(call, this.mode, "the workload IR has no user field; act as another user in live mode");
    }
  }

  private process(args: Header): number {
    const index = args.process;
    if (typeof index !== "number" || !Number.isInteger(index) || index < 0 || index >= this.processes.length) {
      throw InvalidArgument.create("process", `${shown(index)} is not a process this recording started`);
    }
    return index;
  }

  private writeFile(args: Header, payload: Buffer, at: string | null): Header {
    const path = absolutePath(args.path);
    const mode = checkModeBits(args.mode ?? 0o644);
    if (path.startsWith(STDIN_STAGING_DIR + "/")) this.staged.set(path, payload); // a large run stdin, staged
    else {
      this.record("files.write", at, { path, sha256: this.recording.store(payload), size: payload.length, mode,
        make_parents: args.make_parents ?? true });
    }
    const entry = { name: path.replace(/\/+$/, "").split("/").pop() ?? "", path, type: "file", size: payload.length,
      mode, mtime: 0 };
    return { recorded: true, size: payload.length, entry };
  }

  private readonly handlers: Record<string, Handler> = {
    "exec.run": (args, payload, at) => {
      this.refuseUser(args, "commands.run");
      checkRunLimits(args.timeout_seconds ?? null, args.max_output_bytes);
      const stagedPath = String(args.stdin_path ?? "");
      const stdin = this.staged.get(stagedPath) ?? payload;
      this.staged.delete(stagedPath);
      this.record("commands.run", at, {
        argv: args.argv, env: irEnv(args), cwd: args.cwd ?? null, timeout_seconds: args.timeout_seconds ?? null,
        max_output_bytes: args.max_output_bytes, stdin_sha256: stdin.length ? this.recording.store(stdin) : null,
        check: Boolean(args.check), auto_resume: Boolean(args.auto_resume),
      });
      return { recorded: true, exit_code: null, duration_seconds: 0, pid: null };
    },
    "proc.start": (args, _payload, at) => {
      this.refuseUser(args, "commands.start");
      const index = this.processes.length;
      this.record("commands.start", at, { argv: args.argv, env: irEnv(args), cwd: args.cwd ?? null,
        stdin: Boolean(args.stdin), auto_resume: Boolean(args.auto_resume), process: index });
      this.processes.push(Boolean(args.stdin));
      return { recorded: true, pid: null, process: index };
    },
    "proc.signal": (args, _payload, at) => {
      const index = this.process(args);
      this.record("process.signal", at, { process: index, signal: args.signal, group: args.group ?? true });
      return {};
    },
    "proc.stdin": (args, payload, at) => {
      const index = this.process(args);
      if (!this.processes[index]) throw new InvalidState("the process was not started with stdin: true", { state: "no-stdin" });
      if (args.eof) this.record("process.close_stdin", at, { process: index });
      else this.record("process.stdin", at, { process: index, sha256: this.recording.store(payload), size: payload.length });
      return {};
    },
    "fs.write": (args, payload, at) => {
      this.refuseUser(args, "files.write");
      return this.writeFile(args, payload, at);
    },
    "fs.write_begin": (args, _payload, at) => {
      this.refuseUser(args, "files.write");
      absolutePath(args.path);
      checkModeBits(args.mode ?? 0o644);
      const handle = `w${this.writes.size + 1}`;
      this.writes.set(handle, [{ ...args, at }, []]);
      return { handle };
    },
    "fs.write_chunk": (args, payload) => {
      // appended: a window is recorded in turn, so each chunk's `offset` is where the bytes so far end
      this.writes.get(String(args.handle))?.[1].push(payload);
      return {};
    },
    "fs.write_end": (args, _payload, at) => {
      const [begun, chunks]: [Header, Buffer[]] = this.writes.get(String(args.handle)) ?? [{}, []];
      this.writes.delete(String(args.handle));
      if (!args.commit) return { committed: false };
      return { ...this.writeFile(begun, Buffer.concat(chunks), (begun.at as string | null) ?? at), committed: true };
    },
    "fs.mkdir": (args, _payload, at) => {
      this.refuseUser(args, "files.mkdir");
      this.record("files.mkdir", at, { path: absolutePath(args.path), parents: args.parents ?? true,
        mode: checkModeBits(args.mode ?? 0o755) });
      return {};
    },
    "fs.remove": (args, _payload, at) => {
      this.refuseUser(args, "files.remove");
      const path = absolutePath(args.path);
      if (!this.staged.delete(path)) this.record("files.remove", at, { path, recursive: Boolean(args.recursive) });
      return {};
    },
    "fs.move": (args, _payload, at) => {
      this.refuseUser(args, "files.move");
      this.record("files.move", at, { src: args.src, dst: args.dst, overwrite: Boolean(args.overwrite) });
      return {};
    },
    "sandbox.stop": (_args, _payload, at) => this.transition("sandbox.stop", "stopped", at),
    "sandbox.start": (_args, _payload, at) => this.transition("sandbox.start", "running", at),
    "sandbox.pause": (_args, _payload, at) => this.transition("sandbox.pause", "paused", at),
    "sandbox.resume": (args, _payload, at) => {
      const snapId = args.snapshot ?? null;
      let ref: Header | null;
      if (snapId === null) ref = null;
      else if (typeof snapId !== "string" || !snapId) {
        throw InvalidArgument.create("snapshot", `${shown(snapId)} is not a snapshot`, "a Snapshot or its id");
      } else if (snapId.startsWith(`${this.sandboxId}-snapshot-`)) {
        ref = { recorded: parseInt(snapId.slice(snapId.lastIndexOf("-") + 1), 10) - 1 };
      } else ref = { id: snapId };
      return this.transition("sandbox.resume", "running", at, { snapshot: ref });
    },
    "sandbox.snapshot": (args, _payload, at) => {
      const name = args.name ?? null;
      const expires = args.expires ?? null;
      const keep = Boolean(args.keep);
      const expiresSeconds = expires === null ? null : parseDuration(expires as string | number, "expires");
      if (name !== null && (typeof name !== "string" || !name)) {
        throw InvalidArgument.create("name", `${shown(name)} is not a snapshot name`);
      }
      const index = this.snapshots;
      this.record("sandbox.snapshot", at, { name, expires_seconds: expiresSeconds, keep, snapshot: index });
      this.snapshots += 1;
      return { id: `${this.sandboxId}-snapshot-${index + 1}`, name: name || `snapshot-${index + 1}`,
        sandbox_id: this.sandboxId, kind: "recorded", created_at: 0, expires_at: null, size_bytes: 0, keep };
    },
    "sandbox.destroy": (_args, _payload, at) => {
      this.record("sandbox.destroy", at);
      this.destroyed = true;
      return {};
    },
  };
}
