/**
 * Finding sandboxes on this host, as `mvm.supervisor.state` does: every directory
 * under `$MVM_HOME/sandboxes/` holds `state.json` (rewritten by its supervisor) or,
 * while it is being created, `config.json`. A sandbox is live when its supervisor's
 * pid is alive and its `control.sock` accepts a connection. Dead ones are skipped
 * here; `mvmctl ls` (Python) cleans them up.
 * @internal
 */

import { readdirSync, readFileSync, statSync } from "node:fs";
import { createConnection } from "node:net";
import { join } from "node:path";

import { SandboxNotFound } from "./errors.js";
import { CONTROL_SOCKET, sandboxesDir } from "./paths.js";
import { repr } from "./pyrepr.js";

export type SandboxRecord = Record<string, unknown> & { id: string; name: string; directory: string };

function readJson(path: string): Record<string, unknown> | null {
  try {
    const data: unknown = JSON.parse(readFileSync(path, "utf8"));
    return typeof data === "object" && data !== null && !Array.isArray(data) ? (data as Record<string, unknown>) : null;
  } catch {
    return null;
  }
}

/** The newest view of a sandbox: state.json if the supervisor wrote one, else config.json. */
export function loadRecord(directory: string): Record<string, unknown> | null {
  return readJson(join(directory, "state.json")) ?? readJson(join(directory, "config.json"));
}

export function pidAlive(pid: unknown): boolean {
  if (typeof pid !== "number" || !Number.isInteger(pid) || pid <= 0) return false;
  try {
    process.kill(pid, 0);
  } catch (exc) {
    if ((exc as NodeJS.ErrnoException).code !== "EPERM") return false;
  }
  try { // a zombie is not alive
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    return stat.slice(stat.lastIndexOf(")") + 1).trim().split(/\s+/)[0] !== "Z";
  } catch {
    return false;
  }
}

function canConnect(path: string, timeoutMs = 2000): Promise<boolean> {
  return new Promise((resolve) => {
    const sock = createConnection({ path });
    const done = (ok: boolean) => {
      clearTimeout(timer);
      sock.destroy();
      resolve(ok);
    };
    const timer = setTimeout(() => done(false), timeoutMs);
    sock.once("connect", () => done(true));
    sock.once("error", () => done(false));
  });
}

export async function supervisorAlive(directory: string, record: Record<string, unknown>): Promise<boolean> {
  if (!pidAlive(record.supervisor_pid)) return false;
  return canConnect(join(directory, CONTROL_SOCKET));
}

/** A warm pool's member nobody claimed yet: not a sandbox anyone created (Python's `state.unclaimed`). */
export function unclaimed(record: Record<string, unknown>): boolean {
  return Boolean(record.pool) && ["creating", "pooled"].includes(String(record.state ?? "creating"));
}

/** Every live sandbox's record (with `directory`), sorted by directory name. */
export async function listSandboxes(): Promise<SandboxRecord[]> {
  let names: string[];
  try {
    names = readdirSync(sandboxesDir()).sort();
  } catch {
    return [];
  }
  const found: SandboxRecord[] = [];
  for (const entry of names) {
    const directory = join(sandboxesDir(), entry);
    try {
      if (!statSync(directory).isDirectory()) continue;
    } catch {
      continue;
    }
    const record = loadRecord(directory);
    if (record === null || unclaimed(record) || !(await supervisorAlive(directory, record))) continue;
    found.push({ ...record, directory } as SandboxRecord);
  }
  return found;
}

/** Locate a live sandbox by id or name; `SandboxNotFound` listing what exists. */
export async function findSandbox(nameOrId: string): Promise<SandboxRecord> {
  const records = await listSandboxes();
  for (const record of records) {
    if (nameOrId === record.id || nameOrId === record.name) return record;
  }
  const names = records.map((r) => String(r.name ?? r.id ?? "?")).sort();
  throw new SandboxNotFound(
    `no running sandbox named ${repr(nameOrId)}` + (names.length ? `; running: ${names.join(", ")}` : "; none running"),
    { name: nameOrId, available: names },
  );
}
