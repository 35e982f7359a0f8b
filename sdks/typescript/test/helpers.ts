/**
 * Shared test setup: a private `MVM_HOME` per test file (so tests never see or touch the
 * user's sandboxes), built templates and caches shared with `~/.mvm` (like the Python
 * suite's conftest), the namespace backend unless a test asks for another, and a
 * clean-up that destroys whatever a file left running.
 */

import { mkdtempSync, rmSync } from "node:fs";
import { homedir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

export const PACKAGE_DIR = resolve(dirname(fileURLToPath(import.meta.url)), "..", "..");
export const REPO = resolve(PACKAGE_DIR, "..", "..");

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
