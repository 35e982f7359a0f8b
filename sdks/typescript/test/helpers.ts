/**
 * Shared test setup: a private `MVM_HOME` per test file (so tests never see or touch the
 * user's sandboxes), built templates and caches shared with `~/.mvm` (like the Python
 * suite's conftest), the namespace backend unless a test asks for another, and a
 * clean-up that destroys whatever a file left running.
 */

import { spawnSync } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { homedir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

export const PACKAGE_DIR = resolve(dirname(fileURLToPath(import.meta.url)), "..", "..");
export const REPO = resolve(PACKAGE_DIR, "..", "..");
/** The repo's Python (./setup.sh makes it): the Python SDK the TypeScript one is held to. */
export const PYTHON = join(REPO, ".venv", "bin", "python");

const userHome = process.env.MVM_HOME || join(homedir(), ".mvm");
process.env.MVM_TEMPLATES ??= join(userHome, "templates");
process.env.MVM_CACHE ??= join(userHome, "cache");
// Short path: Unix socket paths must stay under 108 bytes.
export const HOME = mkdtempSync("/tmp/mvmts-");
process.env.MVM_HOME = HOME;
// A file that never calls cleanup() (no sandbox of its own) leaves no home behind either.
process.on("exit", () => rmSync(HOME, { recursive: true, force: true }));
process.env.MVM_BACKEND = "namespace";
delete process.env.MVM_MODE;
delete process.env.MVM_RECORDING;
delete process.env.MVM_RUN_ID;
for (const key of Object.keys(process.env)) if (key.startsWith("MVM_SECRET_")) delete process.env[key];

/** Destroy every sandbox still running in this file's home, then remove the home. */
export async function cleanup(): Promise<void> {
  const { Sandbox } = await import("@mvm/sdk");
  for (const info of await Sandbox.list()) {
    try {
      await (await Sandbox.connect(info.id)).kill();
    } catch {
      // already gone
    }
  }
  rmSync(HOME, { recursive: true, force: true });
}

/** Run `fn` and return the error it throws (fails when it does not throw). */
export async function thrown(fn: () => unknown): Promise<Error> {
  try {
    await fn();
  } catch (exc) {
    return exc as Error;
  }
  throw new Error("expected an error, none was thrown");
}

/** Every item of an async iterable. */
export async function collect<T>(iterable: AsyncIterable<T>): Promise<T[]> {
  const out: T[] = [];
  for await (const item of iterable) out.push(item);
  return out;
}

/** How the Python SDK refused a call: its error's wire type, message, field and allowed values. */
export interface PythonError {
  type: string;
  message: string;
  field: unknown;
  allowed: unknown;
}

/**
 * What the Python SDK raises for each source (eval'ed after `prelude`, with `mvm` imported;
 * null for one it does not refuse), so a test can hold the TypeScript errors to it word
 * for word. Python's side runs in this file's `MVM_HOME` (plus `env`).
 */
export function pythonErrors(sources: string[], options: { prelude?: string; env?: Record<string, string> } = {}): (PythonError | null)[] {
  const script = `
import json, mvm
${options.prelude ?? ""}
out = []
for source in json.loads(input()):
    try:
        eval(source)
        out.append(None)
    except mvm.MvmError as exc:
        out.append({"type": exc.wire_type, "message": exc.message, "field": getattr(exc, "field", None),
                    "allowed": getattr(exc, "allowed", None)})
print(json.dumps(out))
`;
  const done = spawnSync(PYTHON, ["-c", script], { input: JSON.stringify(sources) + "\n", encoding: "utf8",
    env: { ...process.env, ...options.env } });
  if (done.status !== 0) throw new Error(`python: ${done.stderr}`);
  return JSON.parse(done.stdout) as (PythonError | null)[];
}
