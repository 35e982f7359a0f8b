/**
 * The creator's side of a warm pool, natively (Python: `mvm/pooling/claim.py` and the
 * take of `mvm/pooling/store.py`): find a pool whose members are what this create asks
 * for and whose template build is the current one (a waiting member's supervisor answers
 * the digest: `sandbox.template_digest`), take one member (unlinking its `ready/` entry:
 * of racing creators, in either language, exactly one unlink succeeds) and claim it over
 * its supervisor's socket with
 * the `sandbox.claim` op, which applies the create's name, TTL, env, secrets, metadata
 * and `on_behalf_of`. No serving pool, or no member left: the caller starts a sandbox
 * through `mvmctl up` as usual (which itself claims from a pool when one serves).
 *
 * Layout (`$MVM_HOME/pools/<pool_id>/`): `pool.json` (what the pool serves, its owner,
 * `created_at`) and `ready/<sandbox_id>` (one empty file per waiting member).
 *
 * Names (`$MVM_HOME/names/<name>` holds the id of the sandbox that claimed it) are
 * claimed as Python claims them: a file written beside and hard-linked into place, so it
 * exists whole or not at all. Node has no `flock`, so this side never takes over a stale
 * claim nor moves one: an asked name that is already claimed (stale or not) sends the
 * create to `mvmctl up`, which decides (`NameTaken`, or a stale claim taken over).
 * @internal
 */

import { linkSync, readdirSync, readFileSync, unlinkSync, writeFileSync } from "node:fs";
import { randomBytes } from "node:crypto";
import { join } from "node:path";

import { SupervisorClient, type CallResult } from "./client.js";
import { InvalidArgument, InvalidState, MvmError } from "./errors.js";
import { CONTROL_SOCKET, mvmHome, sandboxesDir } from "./paths.js";
import { ownerAlive, processIs, readJson } from "./state.js";
import type { NetworkPolicy, Resources } from "./policy.js";
import type { Header } from "./protocol.js";

/** How many taken members may fail their claim before the create gives up on pools (Python's `_MAX_ATTEMPTS`). */
const MAX_ATTEMPTS = 4;
const POOL_FILE = "pool.json";
const READY_DIR = "ready";
/** What a claim may set (Python's `mvm.pooling.member.CLAIMED_FIELDS`); the rest is what the pool serves. */
export const CLAIMED_FIELDS = ["name", "workload_id", "ttl_seconds", "auto_pause_seconds", "env", "secret_env_names",
  "tags", "run_id", "on_behalf_of", "created_at"] as const;

export function poolsDir(): string {
  return join(mvmHome(), "pools");
}

function namesDir(): string {
  return join(mvmHome(), "names");
}

/** Every open pool (its `pool.json` readable), oldest first (Python's `store.live_pools`). */
export function livePools(): { directory: string; record: Record<string, unknown> }[] {
  let entries: string[];
  try {
    entries = readdirSync(poolsDir());
  } catch {
    return [];
  }
  const found: { directory: string; record: Record<string, unknown> }[] = [];
  for (const entry of entries) {
    const directory = join(poolsDir(), entry);
    const record = readJson(join(directory, POOL_FILE));
    if (record !== null) found.push({ directory, record });
  }
  return found.sort((a, b) => Number(a.record.created_at ?? 0) - Number(b.record.created_at ?? 0));
}

/** A pool's waiting members, sorted (Python's `store.ready_members`). */
export function readyMembers(directory: string): string[] {
  try {
    return readdirSync(join(directory, READY_DIR)).sort();
  } catch {
    return [];
  }
}

/** Take a member out of its pool: `true` for exactly one caller. */
function take(directory: string, member: string): boolean {
  try {
    unlinkSync(join(directory, READY_DIR, member));
    return true;
  } catch {
    return false;
  }
}

/** What a create asks of a pool member: the pool must serve exactly its template, backend, resources and network. */
export interface PoolAsk {
  template: string;
  backend: string;
  resources: Resources;
  network: NetworkPolicy;
}

/**
 * Python's `PoolSpec.serves` but for the template digest, which hashes the recipe and the
 * Python agent's sources: this SDK does not recompute it but asks a waiting member's
 * supervisor (`currentDigest`) before taking one.
 */
function serves(serving: unknown, ask: PoolAsk): boolean {
  if (typeof serving !== "object" || serving === null) return false;
  const spec = serving as Record<string, unknown>;
  const resources = (spec.resources ?? {}) as Record<string, unknown>;
  const network = (spec.network ?? {}) as Record<string, unknown>;
  const allow = Array.isArray(network.allow) ? network.allow.map(String) : null;
  const wanted = ask.resources.toDict();
  return spec.template === ask.template && spec.backend === ask.backend
    && Number(resources.cpu_cores) === wanted.cpu_cores && Number(resources.memory_mb) === wanted.memory_mb
    && Number(resources.rootfs_size_mb) === wanted.rootfs_size_mb
    && Number(resources.max_processes) === wanted.max_processes
    && network.mode === ask.network.mode && Boolean(network.allow_wildcards) === ask.network.allowWildcards
    && allow !== null && allow.length === ask.network.allow.length && allow.every((a, i) => a === ask.network.allow[i]);
}

/** The file that claims `name` (a name already checked by `validateName`). */
function claimPath(name: string): string {
  return join(namesDir(), name);
}

/** Whether a claim on `name` exists (a stale one too). */
export function nameClaimed(name: string): boolean {
  try {
    readFileSync(claimPath(name));
    return true;
  } catch {
    return false;
  }
}

/** Claim `name` for `sandboxId` if nobody has (Python's `create_private_exclusive`): never a half-written claim. */
function claimName(name: string, sandboxId: string): boolean {
  const path = claimPath(name);
  const temp = join(namesDir(), `.${name}.${randomBytes(6).toString("hex")}.tmp`);
  writeFileSync(temp, sandboxId, { mode: 0o600, flag: "wx" });
  try {
    linkSync(temp, path);
    return true;
  } catch (exc) {
    if ((exc as NodeJS.ErrnoException).code === "EEXIST") return false;
    throw exc;
  } finally {
    unlinkSync(temp);
  }
}

/**
 * Free `name` if `sandboxId` holds it. Without the names lock Python takes: only this
 * create's own claims are freed here, which no other process writes over (a claim is
 * only replaced by its holder's creator, or dropped when its holder no longer exists).
 */
function releaseName(name: string, sandboxId: string): void {
  try {
    if (readFileSync(claimPath(name), "utf8").trim() === sandboxId) unlinkSync(claimPath(name));
  } catch {
    // not there: nothing to free
  }
}

/** The claim's wire arguments (Python's `claim_args`): the create's config fields a member can still take, and secret values. */
export interface ClaimFields {
  /** The asked name; null: derived from the workload id and the member's id (Python's `default_name`). */
  name: string | null;
  workloadId: string | null;
  ttlSeconds: number | null;
  autoPauseSeconds: number | null;
  env: Record<string, string>;
  /** env key -> secret name */
  secretEnvNames: Record<string, string>;
  /** env key -> secret value (sent in the claim, held in the member's memory only) */
  secretEnv: Record<string, string>;
  tags: Record<string, string>;
  onBehalfOf: Record<string, string> | null;
}

/** A claimed member: its id, its name, the supervisor's `describe()` and the connection it was claimed over. */
export interface Claimed {
  id: string;
  name: string;
  state: Header;
  client: SupervisorClient;
}

/**
 * Claim a waiting member of a pool that serves `ask`, or resolve `null` (no pool serves it,
 * no member is left, the asked name is claimed already, or every member tried was gone).
 * `defaultName(id)` is the name a create without `name` gets for sandbox `id`.
 */
export async function claimMember(ask: PoolAsk, fields: ClaimFields, defaultName: (id: string) => string): Promise<Claimed | null> {
  if (fields.name !== null && nameClaimed(fields.name)) return null; // mvmctl up says NameTaken, or takes a stale claim over
  let attempts = 0;
  let digest: string | null | undefined; // the template's current build: asked once, of the first member reached
  for (const { directory, record } of livePools()) {
    if (!serves(record.serves, ask)) continue;
    const members = readyMembers(directory);
    for (let i = members.length - 1; i > 0; i--) { // random order: concurrent creators mostly try different ones
      const j = randomBytes(4).readUInt32LE(0) % (i + 1);
      [members[i], members[j]] = [members[j], members[i]];
    }
    for (const member of members) {
      let client: SupervisorClient;
      try {
        client = await SupervisorClient.connect(join(sandboxesDir(), member, CONTROL_SOCKET), { onBehalfOf: fields.onBehalfOf });
      } catch {
        continue; // it died, expired or was claimed and destroyed after being listed
      }
      if (digest === undefined) digest = await currentDigest(client);
      if (digest === undefined) { // it left before answering: ask the next one
        client.close();
        continue;
      }
      if (digest === null || digest !== (record.serves as Record<string, unknown>).template_digest) {
        client.close(); // made from another build of the template (or none is built now): this pool serves nobody
        break;
      }
      if (!take(directory, member)) { // another creator took it first
        client.close();
        continue;
      }
      attempts += 1;
      const claimed = await claim(directory, member, client, fields, fields.name ?? defaultName(member));
      if (claimed === "name-taken") return null;
      if (claimed !== null) return claimed;
      if (attempts >= MAX_ATTEMPTS) return null;
    }
  }
  return null;
}

/**
 * The digest a create of the member's template gets now, as its supervisor computes it
 * (`sandbox.template_digest`: Python's `ensure_template(...).digest`, without building;
 * `null` when it would build); `undefined` when the member did not answer.
 */
async function currentDigest(client: SupervisorClient): Promise<string | null | undefined> {
  try {
    const digest = (await client.call("sandbox.template_digest", {})).result.digest;
    return typeof digest === "string" ? digest : null;
  } catch {
    return undefined;
  }
}

async function claim(pool: string, member: string, client: SupervisorClient, fields: ClaimFields, name: string): Promise<Claimed | "name-taken" | null> {
  const ownName = name === member; // the member holds its id as its name while it waits
  if (!ownName && !claimName(name, member)) {
    // An asked name someone claimed meanwhile: the member goes back (mvmctl up reports the name).
    // A derived name whose 6 hex digits collide: Python goes on without the claim, so does this.
    if (fields.name !== null) {
      client.close();
      putBack(pool, member);
      return "name-taken";
    }
  }
  let answer: CallResult;
  try {
    answer = await client.call("sandbox.claim", {
      name, workload_id: fields.workloadId, ttl_seconds: fields.ttlSeconds, auto_pause_seconds: fields.autoPauseSeconds,
      env: fields.env, secret_env_names: fields.secretEnvNames, tags: fields.tags,
      run_id: process.env.MVM_RUN_ID || null, on_behalf_of: fields.onBehalfOf, created_at: Date.now() / 1000,
      secret_env: fields.secretEnv,
    });
  } catch (exc) {
    if (!ownName) releaseName(name, member);
    if (exc instanceof InvalidState) { // not waiting any more (expired, its pool closed): never someone else's to end
      client.close();
      return null;
    }
    await destroyOver(client); // taken, so nobody else will: it must not wait for its TTL
    if (exc instanceof InvalidArgument || !(exc instanceof MvmError)) throw exc;
    return null;
  }
  if (!ownName) releaseName(member, member); // its waiting name (its id) is free again
  return { id: member, name, state: answer.result, client };
}

/** List a taken member as waiting again (Python's `store.add_ready`); a pool closed meanwhile is left alone (its members leave by themselves). */
function putBack(pool: string, member: string): void {
  if (readJson(join(pool, POOL_FILE)) === null) return;
  try {
    writeFileSync(join(pool, READY_DIR, member), "", { mode: 0o600, flag: "wx" });
  } catch {
    // the pool's directory is gone
  }
}

/** Python's `ending.destroy_over`: ask the member's supervisor to destroy it, then close. */
async function destroyOver(client: SupervisorClient): Promise<void> {
  try {
    await client.call("sandbox.destroy", {}, undefined, { timeoutSeconds: 60 });
  } catch {
    // already gone or going
  } finally {
    client.close();
  }
}

/**
 * Every open pool of this `$MVM_HOME`, read from its files (Python's `mvm.pools()`): what
 * it serves, its waiting members whose supervisor runs, whether its owner still refills it.
 */
export function poolRecords(): Header[] {
  return livePools().map(({ directory, record }) => {
    const serving = (record.serves ?? {}) as Record<string, unknown>;
    const owner = (record.owner ?? null) as { pid?: unknown; start_ticks?: unknown } | null;
    return {
      id: record.id, template: serving.template, backend: serving.backend, resources: serving.resources,
      network: serving.network, size: record.size,
      ready: readyMembers(directory).filter((member) => ownerAlive(join(sandboxesDir(), member))),
      ttl_seconds: record.member_ttl_seconds, owner_pid: owner?.pid ?? null,
      refilling: owner !== null && processIs(owner.pid, owner.start_ticks), created_at: record.created_at,
      last_error: null, details: { template_digest: serving.template_digest },
    };
  });
}
