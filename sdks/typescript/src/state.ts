/**
 * Finding sandboxes on this host from files alone, as `mvm.supervisor.state` does: every
 * directory under `$MVM_HOME/sandboxes/` holds `config.json` and its launcher's stamp
 * (`launcher`, `"PID START"`); the supervisor adds its own stamp (`supervisor.pid`) and
 * rewrites `state.json`. `$MVM_HOME/names/<name>` holds the id of the sandbox that has
 * claimed the name. A sandbox's owner is its supervisor, or while it has none yet its
 * launcher; when the owner no longer runs (same pid *and* start time: a reused pid does
 * not count) the sandbox is `lost` until `mvmctl gc` removes it. Nothing here connects
 * to a sandbox or removes anything.
 * @internal
 */

import { readdirSync, readFileSync, statSync } from "node:fs";
import { join } from "node:path";

import { SandboxLost, SandboxNotFound } from "./errors.js";
import { mvmHome, sandboxesDir } from "./paths.js";
import { shown } from "./shown.js";

export type SandboxRecord = Record<string, unknown> & { id: string; name: string; state: string; directory: string };

/** A JSON object read from `path`; null when it is missing, unreadable or not an object. */
export function readJson(path: string): Record<string, unknown> | null {
  try {
    const data: unknown = JSON.parse(readFileSync(path, "utf8"));
    return typeof data === "object" && data !== null && !Array.isArray(data) ? (data as Record<string, unknown>) : null;
  } catch {
    return null;
  }
}

function readText(path: string): string | null {
  try {
    return readFileSync(path, "utf8");
  } catch {
    return null;
  }
}

/** The newest view of a sandbox: state.json if the supervisor wrote one, else config.json. */
export function loadRecord(directory: string): Record<string, unknown> | null {
  return readJson(join(directory, "state.json")) ?? readJson(join(directory, "config.json"));
}

/** Field 22 of `/proc/<pid>/stat` (its start time), or null if it is gone or a zombie. */
function startTime(pid: number): string | null {
  const stat = readText(`/proc/${pid}/stat`);
  if (stat === null) return null;
  const fields = stat.slice(stat.lastIndexOf(")") + 1).trim().split(/\s+/);
  return fields[0] === "Z" || fields[19] === undefined ? null : fields[19];
}

/** Whether the process a `"PID START"` stamp names still runs (and is not a reused pid). */
export function stampAlive(stamp: string | null): boolean {
  const [pid, start, ...rest] = (stamp ?? "").trim().split(/\s+/);
  if (rest.length || !/^[1-9]\d*$/.test(pid ?? "") || !/^\d+$/.test(start ?? "")) return false;
  return startTime(Number(pid)) === start;
}

/** Whether the process that was `pid` when it started at `startTicks` still runs (Python's `process_is`). */
export function processIs(pid: unknown, startTicks: unknown): boolean {
  return typeof pid === "number" && Number.isInteger(pid) && pid > 0 && typeof startTicks === "number"
    && startTime(pid) === String(startTicks);
}

/** The stamp of whoever owns the sandbox now: its supervisor, else its launcher (null: neither). */
export function readOwnerStamp(directory: string): string | null {
  return readText(join(directory, "supervisor.pid")) ?? readText(join(directory, "launcher"));
}

/** Whether the sandbox's owner runs: its supervisor, else (while it starts) its launcher. */
export function ownerAlive(directory: string): boolean {
  return stampAlive(readOwnerStamp(directory));
}

/** `lost` if the sandbox's owner died, else what its supervisor last wrote (`creating` before). */
export function sandboxState(directory: string, record: Record<string, unknown>): string {
  if (!ownerAlive(directory)) return "lost";
  return typeof record.state === "string" && record.state ? record.state : "creating";
}

function described(directory: string): SandboxRecord | null {
  const record = loadRecord(directory);
  if (record === null) return null;
  return { ...record, state: sandboxState(directory, record), directory } as SandboxRecord;
}

/** A warm pool's member nobody claimed yet: not a sandbox anyone created (Python's `state.unclaimed`). */
export function unclaimed(record: Record<string, unknown>): boolean {
  return Boolean(record.pool) && ["creating", "pooled"].includes(String(record.state ?? "creating"));
}

/** Every sandbox's record (with `state` and `directory`), sorted by id; `lost` ones too, not
 * unclaimed pool members. */
export function listSandboxes(): SandboxRecord[] {
  let names: string[];
  try {
    names = readdirSync(sandboxesDir()).sort();
  } catch {
    return [];
  }
  const found: SandboxRecord[] = [];
  for (const entry of names) {
    if (entry.startsWith(".")) continue; // being made or being removed
    const directory = join(sandboxesDir(), entry);
    try {
      if (!statSync(directory).isDirectory()) continue;
    } catch {
      continue;
    }
    const record = described(directory);
    if (record !== null && !unclaimed(record)) found.push(record);
  }
  return found;
}

function plain(name: string): boolean {
  return name.length > 0 && !name.includes("/") && !name.startsWith(".");
}

/**
 * Locate a sandbox by id or name (the name's claim says its id): `SandboxNotFound` listing
 * what runs if there is none, `SandboxLost` if its supervisor died.
 */
export function findSandbox(nameOrId: string): SandboxRecord {
  let record = plain(nameOrId) ? described(join(sandboxesDir(), nameOrId)) : null;
  if (record === null && plain(nameOrId)) {
    const holder = readText(join(mvmHome(), "names", nameOrId))?.trim();
    if (holder && plain(holder)) record = described(join(sandboxesDir(), holder));
  }
  if (record !== null && unclaimed(record)) record = null; // a waiting pool member is nobody's sandbox yet
  if (record === null) {
    const names = listSandboxes().filter((r) => r.state !== "lost").map((r) => String(r.name ?? r.id ?? "?")).sort();
    throw new SandboxNotFound(
      `no running sandbox named ${shown(nameOrId)}` + (names.length ? `; running: ${names.join(", ")}` : "; none running"),
      { name: nameOrId, available: names },
    );
  }
  if (record.state === "lost") {
    throw new SandboxLost(
      `sandbox ${record.name} (${record.id}) is lost: its supervisor died; \`mvmctl gc\` (mvm.gc()) removes what it left`,
      { sandbox_id: record.id, name: record.name, state: "lost" },
    );
  }
  return record;
}
