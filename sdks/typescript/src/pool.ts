/**
 * `pool()`: a bounded, TTL'd warm pool of pre-started sandboxes (Python's `mvm.pool`,
 * `mvm/sdk/pool.py`), so that a create is answered by claiming one instead of starting one.
 *
 * ```ts
 * await using warm = await pool("python-3.13", { size: 4, ttl: "10m" });
 * await using sandbox = await warm.create({ name: "job-1" }); // claims a member
 * ```
 *
 * The pool is Python's own: `pool()` starts `mvmctl pool hold`, which makes it with
 * `mvm.pool` (its checks, defaults and error messages, word for word), keeps it filled in
 * its background thread and answers `describe()`, `waitReady()` and `close()` over a pipe.
 * Any create of this `$MVM_HOME` that asks for what the pool serves claims a member —
 * `Sandbox.create` in this or another process, either language, `mvmctl up` — natively
 * over the member's socket from TypeScript (`pooling.ts`).
 *
 * The holder exits when this process does (it reads the end of its stdin), closing a
 * refilled pool as a Python program's exit does: no pooled sandbox outlives its owner but
 * for its TTL (`refill: false`: members wait until claimed, closed or their TTL).
 */

import { spawn, type ChildProcessWithoutNullStreams } from "node:child_process";
import { join } from "node:path";

import { fromWire, InvalidState, MvmError, SandboxError } from "./errors.js";
import { PoolInfo } from "./models.js";
import { holdOpen, mvmctlError, readJsonLines, stderrTail } from "./helper_process.js";
import { requireMvmctl } from "./paths.js";
import { NetworkPolicy, Resources } from "./policy.js";
import { poolsDir } from "./pooling.js";
import { runMvmctl, Sandbox, type CreateOptions } from "./sandbox.js";
import { validatedSpec } from "./spec.js";
import { readJson } from "./state.js";

/** `pool()`'s options (Python's `mvm.pool` keywords); omitted ones take Python's defaults. */
export interface PoolOptions {
  /** Members kept waiting (Python's `DEFAULT_POOL_SIZE` when omitted; at most `MAX_POOL_SIZE`). */
  size?: number;
  /** How long an unclaimed member waits before it ends itself (`"10m"`; 1 s to 24 h). */
  ttl?: string | number;
  /** Pools pre-start `"namespace"` sandboxes only (the default). */
  backend?: string;
  /** What each member is made of: a create must ask for exactly this to claim one. */
  resources?: Resources;
  network?: NetworkPolicy;
  /** `false`: nothing refills the pool, and its members outlive this process until their TTL. */
  refill?: boolean;
}

/** A create a pool serves: everything but what the pool itself fixes (`template`, `backend`, ...). */
export type PoolCreateOptions = Omit<CreateOptions, "backend" | "resources" | "network" | "fromSnapshot">;

/** One line of `mvmctl pool hold`'s answers. */
interface Answer {
  result?: Record<string, unknown>;
  error?: Record<string, unknown>;
}

/** The `mvmctl pool hold` process: one JSON request per line, one answer per line, in order. */
class Holder {
  private readonly stderr: () => string;
  private readonly waiting: { resolve: (answer: Answer) => void; reject: (exc: Error) => void }[] = [];
  /** Why the holder is gone (it exited, or could not start); null while it runs. */
  private gone: Error | null = null;
  readonly exited: Promise<number | null>;

  constructor(readonly child: ChildProcessWithoutNullStreams, mvmctl: string) {
    readJsonLines(child, (message, line) => {
      if (message === undefined) {
        this.waiting.shift()?.reject(new SandboxError(`mvmctl pool hold answered ${JSON.stringify(line.slice(0, 200))}`));
      } else {
        this.waiting.shift()?.resolve(message as Answer);
      }
    }, () => this.hold(this.waiting.length > 0));
    this.stderr = stderrTail(child);
    child.stdin.on("error", () => undefined); // it exited: the request fails below
    this.exited = new Promise((resolve) => {
      child.on("error", (exc) => {
        this.failAll(new SandboxError(`cannot run ${mvmctl}: ${exc.message}`));
        resolve(null);
      });
      child.on("close", (code) => {
        this.failAll(mvmctlError("mvmctl pool hold", { code, stdout: "", stderr: this.stderr() }));
        resolve(code);
      });
    });
  }

  /** The next answer (the first one is the pool's description, or the error that refused it). */
  next(): Promise<Answer> {
    if (this.gone !== null) return Promise.reject(this.gone);
    this.hold(true);
    return new Promise((resolve, reject) => this.waiting.push({ resolve, reject }));
  }

  request(message: Record<string, unknown>): Promise<Answer> {
    const answer = this.next();
    this.child.stdin.write(JSON.stringify(message) + "\n");
    return answer;
  }

  /** End the holder's stdin and resolve once it exited (this process waits for it). */
  async finish(): Promise<void> {
    this.hold(true);
    this.child.stdin.end();
    await this.exited;
  }

  /** Keep this process running while an answer is awaited, and only then. */
  private hold(awaiting: boolean): void {
    holdOpen(this.child, awaiting);
  }

  private failAll(exc: Error): void {
    this.gone ??= exc;
    for (const waiter of this.waiting.splice(0)) waiter.reject(exc);
    this.hold(false);
  }
}

function answered(answer: Answer): Record<string, unknown> {
  if (answer.error) throw fromWire(answer.error);
  return answer.result ?? {};
}

/**
 * A warm pool this process owns: `size` pre-started sandboxes, kept filled until `close()`
 * (or `await using`'s end, or this process's exit). Make one with {@link pool}.
 */
export class Pool {
  private closing: Promise<void> | null = null;

  /** @internal use `pool()` */
  constructor(
    readonly id: string,
    readonly template: string,
    readonly backend: string,
    readonly resources: Resources,
    readonly network: NetworkPolicy,
    readonly size: number,
    readonly ttlSeconds: number,
    /** record/plan mode: nothing starts (creates are recorded, not served). */
    readonly recorded: boolean,
    private readonly holder: Holder,
    private readonly refused: Record<string, Record<string, unknown>>,
  ) {}

  toString(): string {
    return `<Pool ${this.id} ${this.template}/${this.backend} size=${this.size}>`;
  }

  /** Closed by `close()`, or by another process (`mvmctl pool down`). */
  get closed(): boolean {
    return this.closing !== null || (!this.recorded && readJson(join(poolsDir(), this.id, "pool.json")) === null);
  }

  /**
   * `Sandbox.create` with this pool's template, backend, resources and network (so it
   * claims a member when one is ready); `options` are the rest of its options.
   */
  async create(options: PoolCreateOptions = {}): Promise<Sandbox> {
    for (const key of Object.keys(options)) {
      const refusal = this.refused[key.replace(/[A-Z]/g, (c) => `_${c.toLowerCase()}`)];
      if (refusal) throw fromWire(refusal);
    }
    return Sandbox.create(this.template, { ...options, backend: this.backend, resources: this.resources,
      network: this.network });
  }

  /** What the pool serves, its waiting members, and the last error its refill hit. */
  async describe(): Promise<PoolInfo> {
    return PoolInfo.fromWire(answered(await this.request({ op: "describe" })));
  }

  /**
   * Resolve once all `size` members are waiting (a test or a benchmark wants a full pool;
   * a create never waits for one). Python's default timeout when omitted.
   */
  async waitReady(timeoutSeconds?: number): Promise<PoolInfo> {
    return PoolInfo.fromWire(answered(await this.request(
      timeoutSeconds === undefined ? { op: "wait_ready" } : { op: "wait_ready", timeout: timeoutSeconds })));
  }

  /**
   * Stop refilling and destroy every member nobody claimed (claimed ones are ordinary
   * sandboxes now and go on); resolves once they are gone. Safe to call twice. A holder
   * that was killed meanwhile cannot: its waiting members are then destroyed as
   * `mvmctl pool down` destroys them.
   */
  close(): Promise<void> {
    this.closing ??= (async () => {
      let held = true;
      try {
        answered(await this.holder.request({ op: "close" }));
      } catch (exc) {
        if (exc instanceof MvmError && exc.wireType !== "SandboxError") throw exc;
        held = false; // the holder died (killed): Python's close_pool destroys what waits
      } finally {
        await this.holder.finish();
      }
      if (!held && !this.recorded) {
        const down = await runMvmctl(["pool", "down", this.id, "--json"]);
        if (down.code !== 0 && readJson(join(poolsDir(), this.id, "pool.json")) !== null) {
          throw mvmctlError("mvmctl pool down", down);
        }
      }
    })();
    return this.closing;
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }

  private request(message: Record<string, unknown>): Promise<Answer> {
    if (this.closing !== null) {
      return Promise.reject(new InvalidState(`pool ${this.id} is closed`, { state: "closed" }));
    }
    return this.holder.request(message);
  }
}

/**
 * A warm pool of `size` pre-started `template` sandboxes (default: Python's default
 * template), each waiting at most `ttl` unclaimed (Python's `mvm.pool`, with its
 * defaults, checks and messages).
 *
 * A `Sandbox.create` asking for the same template, backend, resources and network policy
 * claims a member. The first member is started before this resolves (a bad template or
 * backend fails here, leaving nothing); the rest, and each refill after a claim, start in
 * the background, and `close()` — or this process's exit — destroys the members still waiting.
 */
export async function pool(template?: string, options: PoolOptions = {}): Promise<Pool> {
  validatedSpec({ resources: options.resources, network: options.network, ttl: null }); // Sandbox.create's checks
  const asked: Record<string, unknown> = template === undefined ? {} : { template }; // omitted: Python's default
  for (const key of ["size", "ttl", "backend", "refill"] as const) {
    if (options[key] !== undefined) asked[key] = options[key];
  }
  if (options.resources) asked.resources = options.resources.toDict();
  if (options.network) asked.network = options.network.toDict();
  const mvmctl = requireMvmctl();
  const holder = new Holder(spawn(mvmctl, ["pool", "hold", "--json"], { stdio: ["pipe", "pipe", "pipe"] }), mvmctl);
  let made: Record<string, unknown>;
  try {
    made = answered(await holder.request(asked));
  } catch (exc) {
    await holder.finish(); // refused: the holder left nothing and exits
    throw exc instanceof MvmError ? exc : new SandboxError(String(exc));
  }
  const info = PoolInfo.fromWire((made.pool ?? {}) as Record<string, unknown>);
  return new Pool(info.id, info.template, info.backend, info.resources, NetworkPolicy.fromDict(info.network),
    info.size, info.ttlSeconds, made.recorded === true, holder,
    (made.refused_options ?? {}) as Record<string, Record<string, unknown>>);
}
