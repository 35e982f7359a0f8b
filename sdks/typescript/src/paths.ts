/** Where mvm keeps its state (`$MVM_HOME`, default `~/.mvm`) and where `mvmctl` is. @internal */

import { accessSync, constants, existsSync } from "node:fs";
import { homedir } from "node:os";
import { delimiter, dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

import { SandboxError } from "./errors.js";

export const CONTROL_SOCKET = "control.sock";

/** `$MVM_HOME`, else `~/.mvm` (not created here: reading never makes state). */
export function mvmHome(): string {
  return process.env.MVM_HOME || join(homedir(), ".mvm");
}

export function sandboxesDir(): string {
  return join(mvmHome(), "sandboxes");
}

/** This package's root (`sdks/typescript`), from the compiled module's location. */
export function packageRoot(): string {
  return resolve(dirname(fileURLToPath(import.meta.url)), "..");
}

/** The repository root when the SDK runs from a checkout (`<repo>/sdks/typescript`). */
export function repoRoot(): string {
  return resolve(packageRoot(), "..", "..");
}

function executable(path: string): boolean {
  try {
    accessSync(path, constants.X_OK);
    return true;
  } catch {
    return false;
  }
}

/**
 * The `mvmctl` to spawn: `$MVMCTL`, else `mvmctl` on `PATH`, else `<repo>/.venv/bin/mvmctl`.
 * Returns `null` when none is found.
 */
export function findMvmctl(): string | null {
  const explicit = process.env.MVMCTL;
  if (explicit) return explicit;
  for (const dir of (process.env.PATH ?? "").split(delimiter)) {
    if (!dir) continue;
    const candidate = join(dir, "mvmctl");
    if (existsSync(candidate) && executable(candidate)) return candidate;
  }
  const fallback = join(repoRoot(), ".venv", "bin", "mvmctl");
  return existsSync(fallback) && executable(fallback) ? fallback : null;
}

/** {@link findMvmctl}'s answer, or a `SandboxError` saying where mvmctl is looked for. */
export function requireMvmctl(): string {
  const mvmctl = findMvmctl();
  if (mvmctl === null) {
    throw new SandboxError("mvmctl not found: set $MVMCTL, put mvmctl on PATH, or run ./setup.sh "
      + "(it installs <repo>/.venv/bin/mvmctl)");
  }
  return mvmctl;
}
