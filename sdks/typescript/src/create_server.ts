/**
 * `Sandbox.create`'s path to Python: one `mvmctl create-server` process per program (per
 * environment it was started with), which makes every sandbox this program creates. Only
 * its first create pays Python's start, the imports and the zygote's start; a later one is
 * a fork of the warm zygote, as in a Python program (a one-shot `mvmctl up` paid all three
 * on every create).
 *
 * The server takes `mvmctl up`'s own arguments (so its checks, defaults and messages are
 * Python's, word for word), one JSON request per line, and answers each by its id when its
 * create ends (creates run at once on the server's threads). It keeps this process alive
 * only while a create is awaited, and ends at the end of its stdin: when this process exits.
 * A server that dies fails the creates it held; the next create starts a new one.
 * @internal
 */

import { spawn, type ChildProcessWithoutNullStreams } from "node:child_process";

import { fromWire, SandboxError, type MvmError } from "./errors.js";
import { holdOpen, mvmctlError, readJsonLines, stderrTail } from "./helper_process.js";
import { requireMvmctl } from "./paths.js";

/** What the server answers a request: the sandbox's description, or a wire error. */
interface Answer {
  id?: unknown;
  result?: Record<string, unknown>;
  error?: Record<string, unknown>;
}

interface Waiter {
  resolve: (description: Record<string, unknown>) => void;
  reject: (exc: Error) => void;
}

class CreateServer {
  private readonly stderr: () => string;
  private nextId = 1;
  private readonly waiting = new Map<number, Waiter>();
  /** Why the server is gone (it exited, or could not start); null while it runs. */
  gone: Error | null = null;

  constructor(private readonly child: ChildProcessWithoutNullStreams, private readonly mvmctl: string) {
    readJsonLines(child, (message, line) => this.received(message, line), () => this.hold(this.waiting.size > 0));
    this.stderr = stderrTail(child);
    child.stdin.on("error", () => undefined); // it exited: its creates fail on close below
    child.on("error", (exc) => this.failAll(new SandboxError(`cannot run ${mvmctl}: ${exc.message}`)));
    child.on("close", (code) => this.failAll(mvmctlError("mvmctl create-server", { code, stdout: "", stderr: this.stderr() })));
    this.hold(false);
  }

  get pid(): number | undefined {
    return this.child.pid;
  }

  /** No more creates: the server answers those under way, then ends. */
  close(): void {
    this.child.stdin.end();
  }

  /** Create with `mvmctl up`'s arguments `args`; the sandbox's description. */
  create(args: string[]): Promise<Record<string, unknown>> {
    if (this.gone !== null) return Promise.reject(this.gone);
    const id = this.nextId++;
    const answer = new Promise<Record<string, unknown>>((resolve, reject) => this.waiting.set(id, { resolve, reject }));
    this.hold(true);
    this.child.stdin.write(JSON.stringify({ id, args }) + "\n");
    return answer;
  }

  private received(message: unknown, line: string): void {
    const answer = (message ?? {}) as Answer;
    const waiter = typeof answer.id === "number" ? this.waiting.get(answer.id) : undefined;
    if (waiter === undefined) return; // not an answer (a stray line), or one nobody waits for
    this.waiting.delete(answer.id as number);
    if (answer.error) waiter.reject(fromWire(answer.error) as MvmError);
    else if (answer.result) waiter.resolve(answer.result);
    else waiter.reject(new SandboxError(`${this.mvmctl} create-server answered ${JSON.stringify(line.slice(0, 200))}`));
  }

  /** Keep this process running while a create is awaited, and only then. */
  private hold(awaiting: boolean): void {
    holdOpen(this.child, awaiting);
  }

  private failAll(exc: Error): void {
    this.gone ??= exc;
    for (const waiter of this.waiting.values()) waiter.reject(exc);
    this.waiting.clear();
    this.hold(false);
  }
}

let current: { key: string; server: CreateServer } | null = null;

/**
 * Create a sandbox with `mvmctl up`'s arguments `args` (without `up`), run from `cwd` with
 * `env`; the sandbox's description. The server is reused while `cwd` and `env` stay the
 * same (a program that changes `process.env` between creates gets a server that sees it).
 */
export async function createWithServer(args: string[], cwd: string, env: NodeJS.ProcessEnv): Promise<Record<string, unknown>> {
  const key = JSON.stringify([cwd, Object.entries(env).sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))]);
  if (current === null || current.key !== key || current.server.gone !== null) {
    const mvmctl = requireMvmctl();
    const child = spawn(mvmctl, ["create-server"], { cwd, env, stdio: ["pipe", "pipe", "pipe"] });
    current?.server.close();
    current = { key, server: new CreateServer(child, mvmctl) };
  }
  return await current.server.create(args);
}

export interface CreateServerInfo {
  pid: number | undefined;
}

/** The running server's pid (tests: one server serves a program's creates). @internal */
export function createServerInfo(): CreateServerInfo | null {
  return current === null || current.server.gone !== null ? null : { pid: current.server.pid };
}
