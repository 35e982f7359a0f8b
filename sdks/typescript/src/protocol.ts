/**
 * The mvm framed protocol as a pure codec: bytes in, frames out; no I/O.
 *
 * The same wire format, limits and validation as `src/mvm/protocol/codec.py`
 * (docs/protocol.md):
 *
 *     u32 header_len | u32 payload_len | header (UTF-8 JSON object) | payload (raw bytes)
 *
 * Big-endian lengths. A frame announcing more than `MAX_HEADER`/`MAX_PAYLOAD`, a
 * header that is not a JSON object, or one missing the fields of its kind is a
 * `ProtocolError`; the decoder is then poisoned and every later `feed` throws.
 */

import { shown } from "./shown.js";

export const PROTOCOL_NAME = "mvm";
export const PROTOCOL_VERSION = 1;
/** Size of the length prefix (two big-endian u32). */
export const PREFIX_SIZE = 8;
/** Largest header accepted (JSON metadata only; file bytes go in the payload). */
/** Largest header (JSON only): a command line as long as Linux takes (ARG_MAX, 2 MiB) with JSON escaping. */
export const MAX_HEADER = 4 * 1024 * 1024;
/** Largest payload accepted in one frame. Senders chunk at `CHUNK_SIZE`. */
export const MAX_PAYLOAD = 4 * 1024 * 1024;
/** Size senders use when splitting file and stream bytes into frames. */
export const CHUNK_SIZE = 1024 * 1024;
/**
 * The receive window of every flow-controlled byte stream (Python: `codec.STREAM_WINDOW`;
 * docs/protocol.md, "Flow control"): a request's `data` frames (its header's `window`) are
 * sent only as far as the client grants them back (`data.window`), at least every `GRANT_STEP`.
 */
export const STREAM_WINDOW = 2 * 1024 * 1024;
export const GRANT_STEP = STREAM_WINDOW / 4;
/** The credit events (`bytes` in 1..2**32 more may be sent) and the field naming what they credit. */
export const WINDOW_EVENTS: Readonly<Record<string, string>> = { "tcp.window": "stream", "data.window": "id", "proc.window": "pid" };
/** Largest credit one grant or a request's `window` may give. */
export const MAX_GRANT = 2 ** 32;

export const KINDS = ["hello", "request", "response", "data", "event", "cancel"] as const;
export type FrameKind = (typeof KINDS)[number];

/** A JSON object header. */
export type Header = Record<string, unknown>;

/** The peer sent something that is not a valid mvm frame (not an `MvmError`, like Python's). */
export class ProtocolError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "ProtocolError";
  }
}

/** One decoded frame: a JSON header and raw payload bytes. */
export class Frame {
  constructor(
    readonly header: Header,
    readonly payload: Buffer = Buffer.alloc(0),
  ) {}

  get kind(): FrameKind {
    return this.header.kind as FrameKind;
  }

  /** The request id this frame belongs to, or `null` (hello, event). */
  get id(): number | null {
    const value = this.header.id;
    return isInt(value) ? (value as number) : null;
  }
}

function isInt(value: unknown): boolean {
  return typeof value === "number" && Number.isInteger(value);
}

function isObject(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

/** Check the fields every frame kind requires (not the op-specific arguments). */
export function validateHeader(header: unknown): asserts header is Header {
  if (!isObject(header)) throw new ProtocolError("header must be a JSON object");
  const kind = header.kind;
  if (typeof kind !== "string" || !(KINDS as readonly string[]).includes(kind)) {
    throw new ProtocolError(`unknown frame kind ${shown(kind)}; expected one of ${shown([...KINDS].sort())}`);
  }
  if (kind === "hello") {
    if (header.protocol !== PROTOCOL_NAME || !isInt(header.version)) {
      throw new ProtocolError("hello needs protocol='mvm' and an integer version");
    }
    if (typeof header.role !== "string") throw new ProtocolError("hello needs a string 'role'");
    return;
  }
  if (kind === "event") {
    if (typeof header.event !== "string") throw new ProtocolError("event frame needs a string 'event'");
    const target = Object.hasOwn(WINDOW_EVENTS, header.event) ? WINDOW_EVENTS[header.event] : undefined;
    if (target !== undefined) {
      if (!isInt(header[target]) || (header[target] as number) < 1) {
        throw new ProtocolError(`${header.event} needs an integer '${target}' >= 1`);
      }
      const grant = header.bytes;
      if (!isInt(grant) || (grant as number) < 1 || (grant as number) > MAX_GRANT) {
        throw new ProtocolError(`${header.event} needs an integer 'bytes' in 1..2**32`);
      }
    }
    return;
  }
  const ident = header.id;
  if (!isInt(ident) || (ident as number) < 0) {
    throw new ProtocolError(`${kind} frame needs a non-negative integer 'id'`);
  }
  if (kind === "request" && typeof header.op !== "string") throw new ProtocolError("request frame needs a string 'op'");
  if (kind === "request" && "args" in header && !isObject(header.args)) {
    throw new ProtocolError("request 'args' must be an object");
  }
  if (kind === "request" && "window" in header) {
    const window = header.window;
    if (!isInt(window) || (window as number) < 1 || (window as number) > MAX_GRANT) {
      throw new ProtocolError("request 'window' must be an integer in 1..2**32");
    }
  }
  if (kind === "response") {
    if (typeof header.ok !== "boolean") throw new ProtocolError("response frame needs a boolean 'ok'");
    if (header.ok && header.result !== undefined && header.result !== null && !isObject(header.result)) {
      throw new ProtocolError("response 'result' must be an object");
    }
    if (!header.ok) {
      const error = header.error;
      if (!isObject(error) || typeof error.type !== "string") {
        throw new ProtocolError("failed response needs an 'error' object with a string 'type'");
      }
    }
  }
  if (kind === "data" && typeof header.stream !== "string") throw new ProtocolError("data frame needs a string 'stream'");
}

/** Serialise one frame; throws `ProtocolError` if it would exceed the limits. */
export function encode(header: Header, payload: Uint8Array = Buffer.alloc(0)): Buffer {
  validateHeader(header);
  let text: string;
  try {
    text = JSON.stringify(header);
  } catch (exc) {
    throw new ProtocolError(`header is not JSON-serialisable: ${(exc as Error).message}`);
  }
  const raw = Buffer.from(text, "utf8");
  if (raw.length > MAX_HEADER) throw new ProtocolError(`header of ${raw.length} bytes exceeds MAX_HEADER=${MAX_HEADER}`);
  if (payload.length > MAX_PAYLOAD) {
    throw new ProtocolError(`payload of ${payload.length} bytes exceeds MAX_PAYLOAD=${MAX_PAYLOAD}`);
  }
  const prefix = Buffer.alloc(PREFIX_SIZE);
  prefix.writeUInt32BE(raw.length, 0);
  prefix.writeUInt32BE(payload.length, 4);
  return Buffer.concat([prefix, raw, payload]);
}

/**
 * Incremental decoder: `feed` bytes as they arrive, get whole frames back.
 * After a `ProtocolError` the decoder is poisoned (the stream is out of sync) and
 * every later `feed` throws again.
 */
export class FrameDecoder {
  private chunks: Buffer[] = [];
  private size = 0;
  private failed: string | null = null;

  /** Bytes held waiting for the rest of a frame. */
  get buffered(): number {
    return this.size;
  }

  feed(data: Uint8Array): Frame[] {
    if (this.failed !== null) throw new ProtocolError(this.failed);
    if (data.length) {
      this.chunks.push(Buffer.from(data.buffer, data.byteOffset, data.byteLength));
      this.size += data.length;
    }
    const frames: Frame[] = [];
    try {
      for (;;) {
        const frame = this.next();
        if (frame === null) return frames;
        frames.push(frame);
      }
    } catch (exc) {
      if (exc instanceof ProtocolError) {
        this.failed = exc.message;
        this.chunks = [];
        this.size = 0;
      }
      throw exc;
    }
  }

  private peek(n: number): Buffer {
    if (this.chunks[0].length >= n) return this.chunks[0].subarray(0, n);
    const joined = Buffer.concat(this.chunks, this.size);
    this.chunks = [joined];
    return joined.subarray(0, n);
  }

  private take(n: number): Buffer {
    const joined = this.chunks.length === 1 ? this.chunks[0] : Buffer.concat(this.chunks, this.size);
    // Copy out the frame so the rest of a large read is not pinned by it.
    const out = Buffer.from(joined.subarray(0, n));
    const rest = joined.subarray(n);
    this.chunks = rest.length ? [rest] : [];
    this.size -= n;
    return out;
  }

  private next(): Frame | null {
    if (this.size < PREFIX_SIZE) return null;
    const prefix = this.peek(PREFIX_SIZE);
    const headerLen = prefix.readUInt32BE(0);
    const payloadLen = prefix.readUInt32BE(4);
    if (headerLen === 0 || headerLen > MAX_HEADER) {
      throw new ProtocolError(`header length ${headerLen} outside 1..${MAX_HEADER}`);
    }
    if (payloadLen > MAX_PAYLOAD) throw new ProtocolError(`payload length ${payloadLen} exceeds MAX_PAYLOAD=${MAX_PAYLOAD}`);
    const end = PREFIX_SIZE + headerLen + payloadLen;
    if (this.size < end) return null;
    const whole = this.take(end);
    const raw = whole.subarray(PREFIX_SIZE, PREFIX_SIZE + headerLen);
    const payload = whole.subarray(PREFIX_SIZE + headerLen);
    let header: unknown;
    try {
      header = JSON.parse(new TextDecoder("utf-8", { fatal: true, ignoreBOM: true }).decode(raw));
    } catch (exc) {
      if (exc instanceof RangeError) throw new ProtocolError("header JSON is nested too deeply");
      throw new ProtocolError(`header is not UTF-8 JSON: ${(exc as Error).message}`);
    }
    validateHeader(header);
    return new Frame(header, payload);
  }
}

// ---- constructors: one per frame kind, so no caller spells headers by hand ----

export function hello(role: string, extra: Header = {}): Buffer {
  return encode({ kind: "hello", protocol: PROTOCOL_NAME, version: PROTOCOL_VERSION, role, ...extra });
}

/** A request; with `window` its `data` frames are flow-controlled (`data.window`). */
export function request(ident: number, op: string, args: Header | null = null, payload?: Uint8Array,
  window: number | null = null): Buffer {
  const header: Header = { kind: "request", id: ident, op, args: args ?? {} };
  if (window !== null) header.window = window;
  return encode(header, payload);
}

export function responseOk(ident: number, result: Header | null = null, payload?: Uint8Array): Buffer {
  return encode({ kind: "response", id: ident, ok: true, result: result ?? {} }, payload);
}

export function responseError(ident: number, errorType: string, message: string, details: Header = {}): Buffer {
  return encode({ kind: "response", id: ident, ok: false, error: { type: errorType, message, ...details } });
}

export function data(ident: number, stream: string, payload: Uint8Array, extra: Header = {}): Buffer {
  return encode({ kind: "data", id: ident, stream, ...extra }, payload);
}

export function event(name: string, payload?: Uint8Array, fields: Header = {}): Buffer {
  return encode({ kind: "event", event: name, ...fields }, payload);
}

export function cancel(ident: number): Buffer {
  return encode({ kind: "cancel", id: ident });
}

/** Validate the peer's hello; returns its header. Major version must match. */
export function checkHello(frame: Frame): Header {
  if (frame.kind !== "hello") throw new ProtocolError(`expected hello, got ${frame.kind}`);
  if (frame.header.version !== PROTOCOL_VERSION) {
    throw new ProtocolError(
      `peer speaks mvm protocol v${String(frame.header.version)}, this side v${PROTOCOL_VERSION}`,
    );
  }
  return frame.header;
}
