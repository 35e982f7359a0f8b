/**
 * The Python helpers the SDK keeps on pipes for a program's life (`mvmctl pool hold` in
 * pool.ts, `mvmctl create-server` in create_server.ts), and the error an `mvmctl` run
 * reports. @internal
 */

import type { ChildProcessWithoutNullStreams } from "node:child_process";
import type { Socket } from "node:net";

import { fromWire, SandboxError, type MvmError } from "./errors.js";

/**
 * Whether `child` keeps this program running: only while an answer from it is awaited
 * (`awaiting`); otherwise the program may end, and the helper with it (it reads the end
 * of its stdin), as a Python program's helper thread would not keep it alive either.
 */
export function holdOpen(child: ChildProcessWithoutNullStreams, awaiting: boolean): void {
  for (const stream of [child.stdout, child.stderr, child.stdin] as unknown as Socket[]) {
    if (awaiting) stream.ref();
    else stream.unref();
  }
  if (awaiting) child.ref();
  else child.unref();
}

/**
 * Hand each line `child` prints on stdout to `each`, parsed as JSON (`undefined`: the line
 * is not JSON), then call `after` once the chunk's lines are handled.
 */
export function readJsonLines(child: ChildProcessWithoutNullStreams, each: (message: unknown, line: string) => void,
  after: () => void): void {
  let buffer = "";
  child.stdout.setEncoding("utf8");
  child.stdout.on("data", (chunk: string) => {
    buffer += chunk;
    for (let end = buffer.indexOf("\n"); end >= 0; end = buffer.indexOf("\n")) {
      const line = buffer.slice(0, end);
      buffer = buffer.slice(end + 1);
      let message: unknown;
      try {
        message = JSON.parse(line);
      } catch {
        message = undefined;
      }
      each(message, line);
    }
    after();
  });
}

/** The last 16 KiB `child` printed on stderr, kept for the error that reports its end. */
export function stderrTail(child: ChildProcessWithoutNullStreams): () => string {
  let tail = "";
  child.stderr.setEncoding("utf8");
  child.stderr.on("data", (chunk: string) => {
    tail = (tail + chunk).slice(-16384);
  });
  return () => tail;
}

/** @internal */
export interface MvmctlResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** The typed error `mvmctl --json` printed on stderr (`{"error": {...}}`), else a `SandboxError`. @internal */
export function mvmctlError(what: string, result: MvmctlResult): MvmError {
  const lines = result.stderr.trim().split("\n").reverse();
  for (const line of lines) {
    if (!line.startsWith("{")) continue;
    try {
      const parsed = JSON.parse(line) as { error?: Record<string, unknown> };
      if (parsed.error && typeof parsed.error === "object") return fromWire(parsed.error);
    } catch {
      continue;
    }
  }
  const tail = result.stderr.trim().split("\n").slice(-8).join("\n  ");
  return new SandboxError(`${what} failed (exit status ${result.code})${tail ? ":\n  " + tail : ""}`);
}
