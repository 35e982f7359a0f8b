/**
 * Client side of a sandbox supervisor's control socket
 * (`$MVM_HOME/sandboxes/<id>/control.sock`), speaking the framed protocol of
 * docs/protocol.md: a versioned hello, then requests with ids chosen here, any number
 * of `data` frames per request, one final `response`, and `cancel` for a request
 * given up on. Many requests may be in flight on one connection.
 *
 * The socket does not keep Node's event loop alive while no request is pending, so
 * a script that leaves a sandbox running still exits (like Python's daemon reader).
 */

import { createConnection, type Socket } from "node:net";
import { basename, dirname } from "node:path";

import * as codec from "./protocol.js";
import { Frame, FrameDecoder, ProtocolError, type Header } from "./protocol.js";
import { fromWire, ProtocolFailure, SandboxError, SandboxLost, SandboxNotFound, StreamIdle } from "./errors.js";
import { readOwnerStamp, stampAlive } from "./state.js";
import { allAnswered, type WireRequest } from "./transport.js";

/** How long a supervisor may take to answer our hello once connected. */
const HELLO_TIMEOUT_MS = 30_000;
/** How long a supervisor may still show in /proc after its end closed our connection
 * (Python's `client_core.SUPERVISOR_EXIT_GRACE`). */
const SUPERVISOR_EXIT_GRACE_MS = 2_000;

export type DataCallback = (stream: string, data: Buffer) => void;

export interface CallResult {
  result: Header;
  payload: Buffer;
}

export interface StreamChunk {
  stream: string;
  data: Buffer;
}

interface Pending {
  frame(frame: Frame): void;
  /** The connection ended; `lost`: its supervisor died (the sandbox is listed `lost`). */
  closed(lost: boolean): void;
}

export interface CallOptions {
  onData?: DataCallback;
  /** Seconds to wait for the final response before cancelling (default: no limit). */
  timeoutSeconds?: number;
}

export interface StreamOptions {
  /**
   * Seconds a stream may send nothing: past it the request is cancelled and `StreamIdle`
   * thrown (the process or log goes on). Default: wait forever.
   */
  idleTimeout?: number | null;
}

export interface ConnectOptions {
  connectTimeoutSeconds?: number;
  /**
   * Who this client acts for (an MCP server names its client), sent in the hello: the
   * sandbox's audit chain records it with every request of this connection.
   */
  onBehalfOf?: Record<string, string> | null;
}

/** A stream's reader waited `idleTimeout` seconds for a frame (Python: `client_core.stream_idle`). */
export function streamIdle(op: string, idleTimeout: number): StreamIdle {
  return new StreamIdle(`${op}: nothing from the sandbox for ${idleTimeout} s`, { idle_timeout: idleTimeout });
}

/**
 * The credit of one flow-controlled request (Python: `client_core.Grants`): it opens with
 * `STREAM_WINDOW` bytes, and `took` answers the bytes its reader has taken with a
 * `data.window` grant once they make a `GRANT_STEP`. The supervisor never sends more than
 * granted, so a reader that stops taking stops the stream: what is queued here stays within
 * one window, however much the process writes.
 */
export class Grants {
  static readonly WINDOW = codec.STREAM_WINDOW;
  private taken = 0;

  constructor(readonly ident: number) {}

  /** The grant to send after the reader took `size` more bytes, or null (not yet). */
  took(size: number): Buffer | null {
    this.taken += size;
    if (this.taken < codec.GRANT_STEP) return null;
    const grant = this.taken;
    this.taken = 0;
    return codec.event("data.window", undefined, { id: this.ident, bytes: grant });
  }
}

/** One connection to one sandbox's supervisor. */
export class SupervisorClient {
  /** The supervisor's hello header (`role: "supervisor"`, `sandbox_id`). */
  readonly peer: Header;
  private readonly socket: Socket;
  private readonly pending = new Map<number, Pending>();
  private nextId = 1;
  private isClosed = false;
  private closedByUser = false;
  /** Set once the connection ended: whether its supervisor died (null while not known yet). */
  private lostVerdict: boolean | null = null;
  private readonly directory: string;

  private constructor(socket: Socket, peer: Header, decoder: FrameDecoder, leftover: Frame[], directory: string) {
    this.socket = socket;
    this.directory = directory;
    this.peer = peer;
    socket.on("data", (chunk: Buffer) => {
      let frames: Frame[];
      try {
        frames = decoder.feed(chunk);
      } catch {
        socket.destroy(); // poisoned stream: drop the connection, never act on a partial read
        return;
      }
      for (const frame of frames) this.dispatch(frame);
    });
    socket.on("close", () => this.onClosed());
    socket.on("error", () => undefined); // "close" follows
    for (const frame of leftover) this.dispatch(frame);
    this.updateRef();
  }

  /** Connect and exchange hellos. `SandboxNotFound` when nothing listens on `socketPath`. */
  static connect(socketPath: string, options: ConnectOptions = {}): Promise<SupervisorClient> {
    const timeoutMs = (options.connectTimeoutSeconds ?? 5) * 1000;
    const principal = options.onBehalfOf ?? null;
    return new Promise((resolve, reject) => {
      const socket = createConnection({ path: socketPath });
      const decoder = new FrameDecoder();
      let stage: "connect" | "hello" | "done" = "connect";
      const fail = (error: Error) => {
        if (stage === "done") return;
        stage = "done";
        clearTimeout(timer);
        socket.removeAllListeners();
        socket.on("error", () => undefined);
        socket.destroy();
        reject(error);
      };
      const onTimeout = () => {
        fail(stage === "connect"
          ? new SandboxNotFound(`sandbox supervisor is not running (connect timed out after ${timeoutMs / 1000} s)`)
          : new ProtocolFailure(`supervisor handshake failed: no hello within ${HELLO_TIMEOUT_MS / 1000} s`));
      };
      let timer = setTimeout(onTimeout, timeoutMs);
      socket.once("connect", () => {
        stage = "hello";
        clearTimeout(timer);
        timer = setTimeout(onTimeout, HELLO_TIMEOUT_MS);
        socket.write(codec.hello("client", principal !== null ? { on_behalf_of: { ...principal } } : {}));
      });
      socket.on("error", (err: NodeJS.ErrnoException) => {
        if (stage === "connect" && supervisorDiedNow(dirname(socketPath))) fail(lostSandbox("connect", dirname(socketPath)));
        else if (stage === "connect") fail(new SandboxNotFound(`sandbox supervisor is not running (${err.message})`));
        else fail(new ProtocolFailure(`supervisor handshake failed: ${err.message}`));
      });
      socket.on("close", () => fail(new ProtocolFailure("supervisor handshake failed: peer closed the channel")));
      socket.on("data", (chunk: Buffer) => {
        if (stage !== "hello") return;
        let frames: Frame[];
        try {
          frames = decoder.feed(chunk);
          if (!frames.length) return;
          const peer = codec.checkHello(frames[0]);
          stage = "done";
          clearTimeout(timer);
          socket.removeAllListeners();
          resolve(new SupervisorClient(socket, peer, decoder, frames.slice(1), dirname(socketPath)));
        } catch (exc) {
          const message = exc instanceof ProtocolError ? exc.message : String(exc);
          fail(new ProtocolFailure(`supervisor handshake failed: ${message}`));
        }
      });
    });
  }

  get closed(): boolean {
    return this.isClosed;
  }

  /**
   * Send one request; deliver its `data` frames to `onData`; resolve with the final
   * result and payload, or reject with the mapped `MvmError`. With `onData` the data
   * frames are flow-controlled: granted back as `onData` returns.
   */
  call(op: string, args: Header | null = null, payload?: Uint8Array, options: CallOptions = {}): Promise<CallResult> {
    return new Promise<CallResult>((resolve, reject) => {
      const ident = this.open(op);
      const grants = new Grants(ident);
      let timer: NodeJS.Timeout | undefined;
      const finish = () => {
        if (timer !== undefined) clearTimeout(timer);
        this.pending.delete(ident);
        this.updateRef();
      };
      this.pending.set(ident, {
        frame: (frame) => {
          if (frame.kind === "data") {
            if (options.onData === undefined) return;
            try {
              options.onData(String(frame.header.stream), frame.payload);
            } catch (exc) {
              finish();
              this.cancel(ident);
              reject(exc);
              return;
            }
            this.grant(grants, frame.payload.length);
            return;
          }
          if (frame.kind !== "response") return;
          finish();
          try {
            resolve(unwrap(frame));
          } catch (exc) {
            reject(exc);
          }
        },
        closed: (lost) => {
          finish();
          reject(lost ? this.lost(op) : new SandboxError(`${op}: the sandbox closed the connection (it may have been destroyed)`));
        },
      });
      this.updateRef();
      try {
        this.send(codec.request(ident, op, args, payload, options.onData !== undefined ? Grants.WINDOW : null), op);
      } catch (exc) {
        finish();
        reject(exc);
        return;
      }
      if (options.timeoutSeconds !== undefined && options.timeoutSeconds !== null) {
        timer = setTimeout(() => {
          finish();
          this.cancel(ident);
          reject(new SandboxError(`${op}: no answer from the sandbox within ${options.timeoutSeconds} s`));
        }, options.timeoutSeconds * 1000);
      }
    });
  }

  /** Send every request, then wait for every answer (`Transport.callMany`). */
  async callMany(requests: WireRequest[]): Promise<CallResult[]> {
    return allAnswered(await Promise.allSettled(requests.map(([op, args, payload]) => this.call(op, args, payload))));
  }

  /**
   * Yield the `data` frames of a request until its response; leaving the loop early
   * (`break`, `return`, an exception) cancels the request. With `idleTimeout` a request
   * that sends nothing for that long is cancelled and `StreamIdle` thrown. Flow-controlled:
   * the supervisor sends on as the caller takes what was yielded, so a caller that stops
   * reading holds at most `Grants.WINDOW` bytes here (the process waits meanwhile).
   */
  async *stream(op: string, args: Header | null = null, options: StreamOptions = {}): AsyncGenerator<StreamChunk, void, undefined> {
    const idle = options.idleTimeout ?? null;
    const ident = this.open(op);
    const grants = new Grants(ident);
    const queue: (Frame | "closed" | "lost")[] = []; // bounded by the request's window
    let wake: (() => void) | null = null;
    this.pending.set(ident, {
      frame: (frame) => {
        queue.push(frame);
        wake?.();
      },
      closed: (lost) => {
        queue.push(lost ? "lost" : "closed");
        wake?.();
      },
    });
    this.updateRef();
    let finished = false;
    try {
      this.send(codec.request(ident, op, args, undefined, Grants.WINDOW), op);
      for (;;) {
        while (!queue.length) {
          let timer: NodeJS.Timeout | undefined;
          const idled = await new Promise<boolean>((resolve) => {
            wake = () => resolve(false);
            if (idle !== null) timer = setTimeout(() => resolve(true), Math.max(0, idle * 1000));
          });
          if (timer !== undefined) clearTimeout(timer);
          wake = null;
          if (idled && !queue.length) throw streamIdle(op, idle as number);
        }
        wake = null;
        const item = queue.shift() as Frame | "closed" | "lost";
        if (item === "lost") {
          finished = true;
          throw this.lost(op);
        }
        if (item === "closed") {
          finished = true;
          return; // the sandbox was destroyed: its stream ends
        }
        if (item.kind === "data") {
          yield { stream: String(item.header.stream), data: item.payload };
          this.grant(grants, item.payload.length); // the caller took it: send more
          continue;
        }
        if (item.kind !== "response") continue;
        finished = true;
        unwrap(item);
        return;
      }
    } finally {
      if (!finished) this.cancel(ident);
      this.pending.delete(ident);
      this.updateRef();
    }
  }

  /** Drop the connection (pending requests fail with `SandboxError`). */
  close(): void {
    if (this.isClosed) return;
    this.isClosed = true;
    this.closedByUser = true;
    this.socket.destroy();
    this.onClosed();
  }

  // -- internals ------------------------------------------------------------

  private open(op: string): number {
    if (this.closedByUser) throw new SandboxError("this sandbox handle is closed");
    if (this.isClosed) throw this.gone(op);
    return this.nextId++;
  }

  private send(encoded: Buffer, op: string): void {
    if (this.isClosed || this.socket.destroyed || !this.socket.writable) throw this.gone(op);
    this.socket.write(encoded);
  }

  private gone(op: string): SandboxError {
    if (this.lostVerdict ?? supervisorDiedNow(this.directory)) return this.lost(op);
    return new SandboxError(`${op}: the sandbox is gone (its supervisor closed the connection)`);
  }

  private lost(op: string): SandboxLost {
    return lostSandbox(op, this.directory);
  }

  private grant(grants: Grants, size: number): void {
    const grant = grants.took(size);
    if (grant === null || this.isClosed || this.socket.destroyed || !this.socket.writable) return;
    this.socket.write(grant);
  }

  private cancel(ident: number): void {
    if (this.isClosed || this.socket.destroyed || !this.socket.writable) return;
    this.socket.write(codec.cancel(ident));
  }

  private dispatch(frame: Frame): void {
    const ident = frame.id;
    if (ident === null) return; // events are not for clients
    this.pending.get(ident)?.frame(frame);
  }

  private onClosed(): void {
    if (this.isClosed && this.lostVerdict !== null) return;
    this.isClosed = true;
    const settle = (lost: boolean) => {
      this.lostVerdict = lost;
      const waiting = [...this.pending.values()];
      this.pending.clear();
      for (const entry of waiting) entry.closed(lost);
      this.updateRef();
    };
    if (this.closedByUser) settle(false);
    else void supervisorDied(this.directory).then(settle);
  }

  private updateRef(): void {
    if (this.pending.size > 0 && !this.isClosed) this.socket.ref();
    else this.socket.unref();
  }
}

/** Whether the supervisor of sandbox `directory` died leaving it behind (`lost`), rather than
 * destroying it (its directory is retired first, so no stamp is left): Python's
 * `client_core.supervisor_died`. Waits up to `SUPERVISOR_EXIT_GRACE_MS` for a dying one to go. */
async function supervisorDied(directory: string): Promise<boolean> {
  const deadline = Date.now() + SUPERVISOR_EXIT_GRACE_MS;
  for (;;) {
    const stamp = readOwnerStamp(directory);
    if (stamp === null) return false;
    if (!stampAlive(stamp)) return true;
    if (Date.now() >= deadline) return false;
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

function lostSandbox(op: string, directory: string): SandboxLost {
  const sandboxId = basename(directory);
  return new SandboxLost(
    `${op}: sandbox ${sandboxId} is lost: its supervisor died; \`mvmctl gc\` (mvm.gc()) removes what it left`,
    { sandbox_id: sandboxId, state: "lost" },
  );
}

function supervisorDiedNow(directory: string): boolean {
  const stamp = readOwnerStamp(directory);
  return stamp !== null && !stampAlive(stamp);
}

function unwrap(frame: Frame): CallResult {
  if (frame.header.ok) {
    const result = frame.header.result;
    return { result: (result && typeof result === "object" ? { ...(result as Header) } : {}) as Header, payload: frame.payload };
  }
  throw fromWire((frame.header.error ?? {}) as Record<string, unknown>);
}
