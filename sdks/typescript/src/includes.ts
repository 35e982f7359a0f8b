/**
 * `include: [...]` in record/plan mode: host files that would be copied into the
 * sandbox's `/app`, collected exactly as `mvm.sdk.includes.collect_includes` does
 * (in live mode `mvmctl up --include` collects them itself). Paths are relative to a
 * base folder and keep their layout (`src/x.py` → `/app/src/x.py`); nothing outside
 * the base is read, and a symlink whose target lies outside the included tree is
 * skipped, never followed.
 * @internal
 */

import { existsSync, readdirSync, readFileSync, realpathSync, statSync } from "node:fs";
import { join, relative, resolve, sep } from "node:path";

import { InvalidArgument } from "./errors.js";
import { shown } from "./shown.js";

export const GUEST_ROOT = "/app";
/** Refuse to copy more than this into a sandbox at create. */
export const MAX_INCLUDE_BYTES = 512 * 1024 * 1024;

export interface IncludedFile {
  guestPath: string;
  data: Buffer;
  mode: number;
}

function within(child: string, root: string): boolean {
  return child === root || child.startsWith(root.endsWith(sep) ? root : root + sep);
}

function realpath(path: string): string {
  try {
    return realpathSync(path);
  } catch {
    return resolve(path);
  }
}

function walk(target: string): string[] {
  let isDir = false;
  try {
    isDir = statSync(target).isDirectory();
  } catch {
    isDir = false;
  }
  if (!isDir) return [target];
  const files: string[] = [];
  const visit = (dir: string) => {
    const entries = readdirSync(dir, { withFileTypes: true });
    const dirs = entries.filter((e) => e.isDirectory() && e.name !== "__pycache__").map((e) => e.name).sort();
    const names = entries.filter((e) => !e.isDirectory()).map((e) => e.name).sort();
    for (const name of names) files.push(join(dir, name));
    for (const name of dirs) visit(join(dir, name));
  };
  visit(target);
  return files;
}

export function collectIncludes(paths: unknown, baseDir: string): IncludedFile[] {
  if (typeof paths === "string") {
    throw InvalidArgument.create("include", "must be a list of paths, not one string", "e.g. ['src']");
  }
  if (!Array.isArray(paths)) throw InvalidArgument.create("include", "must be a list of paths", "e.g. ['src']");
  const base = realpath(baseDir);
  const out: IncludedFile[] = [];
  let total = 0;
  for (const entry of paths as unknown[]) {
    if (typeof entry !== "string" || !entry) throw InvalidArgument.create("include", `${shown(entry)} is not a path`);
    const target = realpath(resolve(base, entry));
    if (!within(target, base)) {
      throw InvalidArgument.create("include", `${shown(entry)} lies outside ${base}`, `paths under ${base}`);
    }
    if (!existsSync(target)) throw InvalidArgument.create("include", `${shown(entry)} does not exist under ${base}`);
    for (const path of walk(target)) {
      const real = realpath(path);
      if (!within(real, target)) continue; // a symlink out of the included tree: never followed
      let isFile = false;
      try {
        isFile = statSync(real).isFile();
      } catch {
        isFile = false;
      }
      if (!isFile) continue;
      const rel = relative(base, path).split(sep).join("/");
      const data = readFileSync(real);
      total += data.length;
      if (total > MAX_INCLUDE_BYTES) throw InvalidArgument.create("include", `more than ${MAX_INCLUDE_BYTES} bytes to copy`);
      out.push({ guestPath: `${GUEST_ROOT}/${rel}`, data, mode: statSync(real).mode & 0o777 });
    }
  }
  return out;
}
