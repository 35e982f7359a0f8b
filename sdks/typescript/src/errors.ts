/**
 * Typed errors mirroring `mvm/errors.py`. Everything the SDK throws on purpose is an
 * `MvmError`; errors that cross the protocol carry a wire `type` (docs/protocol.md)
 * and are rebuilt by `fromWire` into the class of the same name.
 *
 * Python → TypeScript names: `FileNotFoundInSandbox`, `FileExistsInSandbox` keep
 * their Python names; `TemplateNotFound.name` (the template) is `template` here,
 * `SecretNotFound.name` is `secretName` (a JS error's `name` is its class name).
 * Detail fields are reachable both raw (`error.details.audit_id`) and as camelCase
 * getters (`error.auditId`).
 */

import { shown } from "./shown.js";

export type Details = Record<string, unknown>;

function camel(key: string): string {
  return key.replace(/_([a-z0-9])/g, (_, c: string) => c.toUpperCase());
}

/** Base class of every mvm error. */
export class MvmError extends Error {
  static readonly wireType: string = "Internal";
  /** The error's extra fields, as on the wire (`field`, `allowed`, `path`, `pid`, ...). */
  readonly details: Details;
  private readonly receivedType?: string;

  constructor(message: string, details: Details = {}, receivedType?: string) {
    super(message);
    this.name = new.target.name;
    this.details = { ...details };
    if (receivedType !== undefined) this.receivedType = receivedType;
  }

  /** The protocol `type` string of this error (`InvalidArgument`, `FileNotFound`, ...). */
  get wireType(): string {
    return this.receivedType ?? (this.constructor as typeof MvmError).wireType;
  }

  /** A detail by its wire name or camelCase name. */
  detail<T = unknown>(key: string): T | undefined {
    if (key in this.details) return this.details[key] as T;
    for (const [k, v] of Object.entries(this.details)) if (camel(k) === key) return v as T;
    return undefined;
  }

  get auditId(): string | undefined {
    return this.detail<string>("audit_id");
  }

  toWire(): Details {
    const out: Details = { type: this.wireType, message: this.message };
    for (const [k, v] of Object.entries(this.details)) {
      if (v === null || ["string", "number", "boolean"].includes(typeof v) || Array.isArray(v)) out[k] = v;
    }
    return out;
  }
}

// ---- input and policy -------------------------------------------------------

/** A parameter has a value outside what is allowed; `field` names it. */
export class InvalidArgument extends MvmError {
  static override readonly wireType: string = "InvalidArgument";

  /** Build the Python-identical message `"{field}: {message} (allowed: {allowed})"`. */
  static create<T extends typeof InvalidArgument>(this: T, field: string, message: string, allowed?: unknown): InstanceType<T> {
    let text = `${field}: ${message}`;
    if (allowed !== undefined && allowed !== null) text += ` (allowed: ${formatAllowed(allowed)})`;
    return new this(text, { field, allowed: allowed ?? null }) as InstanceType<T>;
  }

  get field(): string {
    return String(this.details.field ?? "");
  }

  get allowed(): unknown {
    return this.details.allowed ?? null;
  }
}

function formatAllowed(allowed: unknown): string {
  return typeof allowed === "string" ? allowed : shown(allowed);
}

export class InvalidNetworkPolicy extends InvalidArgument {
  static override readonly wireType: string = "InvalidNetworkPolicy";
}

/**
 * Another sandbox on this host has the name a create asked for (a kind of `InvalidArgument`;
 * `field` is `name`, `sandboxId` the holder's id).
 */
export class NameTaken extends InvalidArgument {
  static override readonly wireType: string = "NameTaken";

  get sandboxId(): string | null {
    return typeof this.details.sandbox_id === "string" ? this.details.sandbox_id : null;
  }
}

/**
 * The host address and port a port forward asked for are already taken (a kind of
 * `InvalidArgument`; `field` is `host_port`).
 */
export class PortInUse extends InvalidArgument {
  static override readonly wireType: string = "PortInUse";
}

/** `{ user }` (`commands.run`, `files.*`) named an account the guest does not have (`field` is `user`). */
export class UserNotFound extends InvalidArgument {
  static override readonly wireType: string = "UserNotFound";
}

/** The template cannot be built on this host; `available` lists those that can. */
export class TemplateNotFound extends MvmError {
  static override readonly wireType: string = "TemplateNotFound";

  static create(name: string, available: string[], reason = ""): TemplateNotFound {
    const why = reason ? ` (${reason})` : "";
    return new TemplateNotFound(
      `template ${shown(name)} cannot be built here${why}; available templates: ${available.join(", ")}`,
      { name, available },
    );
  }

  /** The template name asked for (Python: `.name`). */
  get template(): string {
    return String(this.details.name ?? "");
  }

  get available(): string[] {
    return Array.isArray(this.details.available) ? (this.details.available as string[]) : [];
  }
}

export class TemplateBuildError extends MvmError {
  static override readonly wireType: string = "TemplateBuildError";
}

/** A template from an OCI image or Dockerfile could not be made; `detail("image")` names it. */
export class ImageError extends TemplateBuildError {
  static override readonly wireType: string = "ImageError";
}

/** The registry has no such repository, or no such tag/digest in it. */
export class ImageNotFound extends ImageError {
  static override readonly wireType: string = "ImageNotFound";
}

/** The registry could not be reached. */
export class RegistryUnavailable extends ImageError {
  static override readonly wireType: string = "RegistryUnavailable";
}

/** The registry refused the credentials (or wanted some). */
export class RegistryAuthError extends ImageError {
  static override readonly wireType: string = "RegistryAuthError";
}

/** The image is for another OS/architecture; `detail("allowed")` is this host's. */
export class ImagePlatformMismatch extends ImageError {
  static override readonly wireType: string = "ImagePlatformMismatch";
}

/** A Dockerfile instruction failed: `detail("step")`, `detail("index")` (1-based). */
export class DockerfileStepFailed extends ImageError {
  static override readonly wireType: string = "DockerfileStepFailed";
}

/** A `secret(name)` reference has no value in the keystore or environment. */
export class SecretNotFound extends MvmError {
  static override readonly wireType: string = "SecretNotFound";

  static create(name: string, hint = ""): SecretNotFound {
    return new SecretNotFound(`secret ${shown(name)} is not set${hint ? ": " + hint : ""}`, { name });
  }

  /** The secret's name (Python: `.name`). */
  get secretName(): string {
    return String(this.details.name ?? "");
  }
}

export class BackendUnavailable extends MvmError {
  static override readonly wireType: string = "BackendUnavailable";
}

// ---- sandbox lifecycle ------------------------------------------------------

export class SandboxNotFound extends MvmError {
  static override readonly wireType: string = "SandboxNotFound";

  get available(): string[] {
    return Array.isArray(this.details.available) ? (this.details.available as string[]) : [];
  }
}

/** The operation is not allowed in the sandbox's current state. */
export class InvalidState extends MvmError {
  static override readonly wireType: string = "InvalidState";

  get state(): string | undefined {
    return this.details.state as string | undefined;
  }
}

export class SandboxPaused extends InvalidState {
  static override readonly wireType: string = "SandboxPaused";
}

/** The sandbox (or its supervisor) failed; `details` says what was seen. */
export class SandboxError extends MvmError {
  static override readonly wireType: string = "SandboxError";
}

/**
 * The sandbox's supervisor died (or, in a cluster, its node): it is listed with state
 * `lost` until `mvmctl gc` (Python: `mvm.gc()`) removes what it left.
 */
export class SandboxLost extends SandboxError {
  static override readonly wireType: string = "SandboxLost";
}

/** No cluster node can take the sandbox (limits, template, backend); `details` says what each node answered. */
export class NoCapacity extends MvmError {
  static override readonly wireType: string = "NoCapacity";
}

export class NotAvailableInRecordMode extends MvmError {
  static override readonly wireType: string = "NotAvailableInRecordMode";
}

export class SnapshotNotFound extends MvmError {
  static override readonly wireType: string = "SnapshotNotFound";
}

export class SnapshotTampered extends MvmError {
  static override readonly wireType: string = "SnapshotTampered";
}

// ---- commands ---------------------------------------------------------------

/** Thrown by `commands.run(..., { check: true })` for a non-zero exit; `result` is the `CommandResult`. */
export class CommandError extends MvmError {
  static override readonly wireType: string = "CommandError";
  readonly result: unknown;

  constructor(message: string, details: Details = {}, receivedType?: string, result?: unknown) {
    super(message, details, receivedType);
    this.result = result ?? null;
  }
}

/**
 * The command ran past its timeout; its process group was killed.
 * `stdout`/`stderr` hold what it printed before that.
 */
export class CommandTimeout extends MvmError {
  static override readonly wireType: string = "CommandTimeout";
  stdout = "";
  stderr = "";

  withOutput(stdout: string, stderr: string): this {
    this.stdout = stdout;
    this.stderr = stderr;
    return this;
  }

  get pid(): number | undefined {
    return this.details.pid as number | undefined;
  }

  get timeoutSeconds(): number | undefined {
    return this.details.timeout_seconds as number | undefined;
  }
}

/**
 * A stream (process output, logs) sent nothing for `idleTimeout` seconds; the request was
 * cancelled and the process goes on. Thrown on the client side only, by readers given
 * `idleTimeout` (`logs`, `Process.output`/`lines`).
 */
export class StreamIdle extends SandboxError {
  static override readonly wireType: string = "StreamIdle";

  get idleTimeout(): number | undefined {
    return this.details.idle_timeout as number | undefined;
  }
}

export class ProcessNotFound extends MvmError {
  static override readonly wireType: string = "ProcessNotFound";

  get pid(): number | undefined {
    return this.details.pid as number | undefined;
  }
}

// ---- files ------------------------------------------------------------------

/** Base of errors about a guest path; `path` names it. */
export class FileError extends MvmError {
  get path(): string {
    return String(this.details.path ?? "");
  }
}

export class FileNotFoundInSandbox extends FileError {
  static override readonly wireType: string = "FileNotFound";
}

export class NotADirectory extends FileError {
  static override readonly wireType: string = "NotADirectory";
}

export class IsADirectory extends FileError {
  static override readonly wireType: string = "IsADirectory";
}

export class FileExistsInSandbox extends FileError {
  static override readonly wireType: string = "FileExists";
}

export class DirectoryNotEmpty extends FileError {
  static override readonly wireType: string = "DirectoryNotEmpty";
}

export class PermissionDenied extends FileError {
  static override readonly wireType: string = "PermissionDenied";
}

export class TooLarge extends MvmError {
  static override readonly wireType: string = "TooLarge";
}

/** The peer broke the framed protocol or the channel closed unexpectedly. */
export class ProtocolFailure extends MvmError {
  static override readonly wireType: string = "Protocol";
}

export class Cancelled extends MvmError {
  static override readonly wireType: string = "Cancelled";
}

export class UnknownOp extends MvmError {
  static override readonly wireType: string = "UnknownOp";
}

// ---- network ------------------------------------------------------------------

/**
 * Nothing accepts the connection on the guest side (the agent's `tcp.connect`);
 * `port` and `errno` say where and why.
 */
export class ConnectionRefused extends MvmError {
  static override readonly wireType: string = "ConnectionRefused";

  get port(): number | undefined {
    return this.details.port as number | undefined;
  }

  get errno(): number | undefined {
    return this.details.errno as number | undefined;
  }
}

// ---- security -----------------------------------------------------------------

export class KeystoreError extends MvmError {
  static override readonly wireType: string = "KeystoreError";
}

export class AuditError extends MvmError {
  static override readonly wireType: string = "AuditError";
}

export class AuditEntryNotFound extends AuditError {
  static override readonly wireType: string = "AuditEntryNotFound";
}

const CLASSES: (typeof MvmError)[] = [
  MvmError, InvalidArgument, InvalidNetworkPolicy, PortInUse, TemplateNotFound, TemplateBuildError, SecretNotFound,
  ImageError, ImageNotFound, RegistryUnavailable, RegistryAuthError, ImagePlatformMismatch, DockerfileStepFailed,
  BackendUnavailable, SandboxNotFound, InvalidState, SandboxPaused, SandboxError, SandboxLost, NameTaken, NoCapacity,
  NotAvailableInRecordMode, StreamIdle,
  SnapshotNotFound, SnapshotTampered, CommandError, CommandTimeout, ProcessNotFound, UserNotFound, FileNotFoundInSandbox,
  NotADirectory, IsADirectory, FileExistsInSandbox, DirectoryNotEmpty, PermissionDenied, TooLarge, ProtocolFailure,
  Cancelled, UnknownOp, ConnectionRefused, KeystoreError, AuditError, AuditEntryNotFound,
];

/** Every wire type this SDK maps to a class (the others become a plain `MvmError`). */
export const WIRE_TYPES: Readonly<Record<string, typeof MvmError>> = Object.freeze(
  Object.fromEntries(CLASSES.map((cls) => [cls.wireType, cls])),
);

/** Rebuild the right error class from a protocol `error` object (Python: `mvm.errors.from_wire`). */
export function fromWire(error: Details | null | undefined): MvmError {
  const raw = error ?? {};
  const wireType = String(raw.type ?? "Internal");
  const message = String(raw.message ?? wireType);
  const details: Details = {};
  for (const [k, v] of Object.entries(raw)) if (k !== "type" && k !== "message") details[k] = v;
  const cls = Object.prototype.hasOwnProperty.call(WIRE_TYPES, wireType) ? WIRE_TYPES[wireType] : undefined;
  if (cls === undefined) return new MvmError(message, details, wireType);
  return new cls(message, details);
}
