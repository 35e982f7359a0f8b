/**
 * The seam between the SDK and whatever answers its requests (Python: `mvm.sdk.transport`).
 *
 * `Sandbox`, `Commands`, `Files`, `Process`, `Ports` and `Network` build wire requests
 * (an op name, a JSON-able `args` object, optional payload bytes), hand them to a
 * `Transport`, and turn the answers into models. The mode picks the transport; the SDK
 * classes are the same in every mode:
 *
 * * `SupervisorClient` — live: the framed protocol over the sandbox supervisor's socket.
 * * `RecordTransport` (`recording.ts`) — record/plan: each request is appended to the
 *   recording the workload IR is built from and answered with a recorded result
 *   (nothing runs); a request that needs a live answer throws `NotAvailableInRecordMode`.
 *
 * The wire vocabulary (op names, args, result fields) is the supervisor's (docs/protocol.md).
 */

import type { CallOptions, CallResult, StreamChunk, StreamOptions } from "./client.js";
import type { Header } from "./protocol.js";

/** What a request says about the SDK call it serves (record mode names it, and the script's line). */
export interface RequestContext {
  /** The SDK call, as a script writes it (`files.readText`, `Process.wait`): named by a refusal. */
  call?: string;
  /** `file:line` of the script's call (captured before the SDK's first await). */
  at?: string | null;
}

export interface TransportCallOptions extends CallOptions, RequestContext {}

/** One request of a `callMany` window: op, args, payload. */
export type WireRequest = [op: string, args: Header, payload: Uint8Array];

/** The answers of a window once all settled: the first rejection (in request order) thrown. */
export function allAnswered(outcomes: PromiseSettledResult<CallResult>[]): CallResult[] {
  return outcomes.map((outcome) => {
    if (outcome.status === "rejected") throw outcome.reason;
    return outcome.value;
  });
}

/** A stream request's context and its `idleTimeout` (seconds without a frame before `StreamIdle`). */
export interface TransportStreamOptions extends StreamOptions, RequestContext {}

/** What the SDK sends its wire requests to. */
export interface Transport {
  /** One request; `data` frames before the answer go to `options.onData`; an error answer throws its typed error. */
  call(op: string, args?: Header | null, payload?: Uint8Array, options?: TransportCallOptions): Promise<CallResult>;
  /**
   * Send every request before waiting for any answer, then wait for all of them (no `data`
   * frames expected); the first error (in request order) throws once every request was
   * answered. How `files.write` keeps a window of chunks in flight.
   */
  callMany(requests: WireRequest[], context?: RequestContext): Promise<CallResult[]>;
  /** The `data` frames of one request until its answer; leaving the loop early cancels it. */
  stream(op: string, args?: Header | null, options?: TransportStreamOptions): AsyncGenerator<StreamChunk, void, undefined>;
  /** Drop the connection; the sandbox keeps running. */
  close(): void;
  /** `true` once the connection is gone (a live transport is then reopened). */
  readonly closed: boolean;
}
