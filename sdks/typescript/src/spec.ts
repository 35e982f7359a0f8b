/**
 * Argument checks shared by the live and the recorded sandbox (Python:
 * `mvm.sdk.sandbox.validate_command` / `validated_spec`), with the same fields and
 * messages, so a bad call fails the same way in every mode and in both languages.
 * @internal
 */

import { existsSync, realpathSync } from "node:fs";
import { dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";

import { createDefaults } from "./defaults.js";
import { InvalidArgument } from "./errors.js";
import { parseDuration } from "./durations.js";
import { network as makeNetwork, NetworkPolicy, resources as makeResources, Resources, SecretRef } from "./policy.js";
import { kindOf, shown } from "./shown.js";

export const MODES = ["record", "plan", "live"] as const;
export type Mode = (typeof MODES)[number];
export type EnvValue = string | SecretRef;
export type Env = Record<string, EnvValue>;

const NAME_RE = /^[a-z0-9][a-z0-9_.-]{0,62}$/;

/** `mode` wins, else `$MVM_MODE` (set by `mvmctl run`/`compile`), else live. */
export function currentMode(explicit?: string | null): Mode {
  const mode = explicit || process.env.MVM_MODE || "live";
  if (!(MODES as readonly string[]).includes(mode)) {
    throw InvalidArgument.create("mode", `unknown mode ${shown(mode)}`, [...MODES]);
  }
  return mode as Mode;
}

export function validateName(name: unknown): string {
  if (typeof name !== "string" || !NAME_RE.test(name)) {
    throw InvalidArgument.create("name", `${shown(name)} is not a valid sandbox name`,
      "lowercase letters, digits, '-', '_', '.'; 1-63 chars");
  }
  return name;
}

function checkEnv(env: unknown): Env {
  if (env === undefined || env === null) return {};
  if (typeof env !== "object" || Array.isArray(env)) {
    throw InvalidArgument.create("env", `${kindOf(env)} is not a mapping`, "{ NAME: 'value' | secret('name') }");
  }
  const out: Env = {};
  for (const [key, value] of Object.entries(env as Record<string, unknown>)) {
    if (!key || key.includes("=") || key.includes("\0")) {
      throw InvalidArgument.create("env", `${shown(key)} is not a valid variable name`);
    }
    if (typeof value !== "string" && !(value instanceof SecretRef)) {
      throw InvalidArgument.create(`env[${shown(key)}]`, `${kindOf(value)} value`, "a string or secret(name)");
    }
    out[key] = value;
  }
  return out;
}

/**
 * Check a command's argv, env and cwd. A string argv becomes `["/bin/sh", "-c", argv]`.
 * Env values stay strings or `SecretRef`s (nothing is resolved here).
 */
export function validateCommand(argv: unknown, env: unknown, cwd: unknown): { argv: string[]; env: Env } {
  let list: unknown[] = [];
  if (typeof argv === "string") list = ["/bin/sh", "-c", argv];
  else if (Array.isArray(argv)) list = [...argv];
  if (!list.length || !list.every((a) => typeof a === "string")) {
    throw InvalidArgument.create("argv", "must be a non-empty list of strings (or one shell string)",
      "e.g. ['python', '/app/main.py']");
  }
  if (cwd !== undefined && cwd !== null && (typeof cwd !== "string" || !cwd || cwd.includes("\0"))) {
    throw InvalidArgument.create("cwd", `${shown(cwd)} is not a guest directory`, "an absolute path, or one relative to the default working directory");
  }
  return { argv: list as string[], env: checkEnv(env) };
}

export interface Spec {
  name: string | null;
  workloadId: string | null;
  resources: Resources;
  network: NetworkPolicy;
  ttlSeconds: number | null;
  env: Env;
  tags: Record<string, string>;
}

/**
 * A create's arguments as the caller gave them, checked: what it left out is `null`
 * (resources, network) or `undefined` (ttl), for Python's defaults to fill — by
 * `withDefaults`, or by `mvmctl up` itself on the live path (no extra Python call there).
 */
export interface AskedSpec extends Omit<Spec, "resources" | "network" | "ttlSeconds"> {
  resources: Resources | null;
  network: NetworkPolicy | null;
  ttlSeconds: number | null | undefined;
}

/** `Sandbox.create`'s arguments checked (the template is checked by the caller); no defaults applied. */
export function askedSpec(options: {
  name?: string | null; workloadId?: string | null; ttl?: string | number | null; resources?: unknown;
  network?: unknown; env?: unknown; tags?: unknown;
}): AskedSpec {
  const name = options.name ?? null;
  if (name !== null) validateName(name);
  const workloadId = options.workloadId ?? null;
  if (workloadId !== null && (typeof workloadId !== "string" || !workloadId.trim())) {
    throw InvalidArgument.create("workload_id", `${shown(workloadId)} must be a non-empty string`);
  }
  if (options.resources !== undefined && options.resources !== null && !(options.resources instanceof Resources)) {
    throw InvalidArgument.create("resources", "use resources(...)", "resources({ cpuCores: ..., ... })");
  }
  if (options.network !== undefined && options.network !== null && !(options.network instanceof NetworkPolicy)) {
    throw InvalidArgument.create("network", "use network(...)", "network({ mode: 'deny' | 'allow' | 'open' })");
  }
  const env = checkEnv(options.env);
  const tags: Record<string, string> = {};
  if (options.tags !== undefined && options.tags !== null) {
    if (typeof options.tags !== "object" || Array.isArray(options.tags)) {
      throw InvalidArgument.create("tags", "keys and values must be strings");
    }
    for (const [key, value] of Object.entries(options.tags as Record<string, unknown>)) {
      if (typeof value !== "string") throw InvalidArgument.create("tags", "keys and values must be strings");
      tags[key] = value;
    }
  }
  const ttl = options.ttl;
  return {
    name, workloadId, env, tags,
    ttlSeconds: ttl === undefined ? undefined : ttl === null ? null : parseDuration(ttl, "ttl"),
    resources: (options.resources as Resources | null | undefined) ?? null,
    network: (options.network as NetworkPolicy | null | undefined) ?? null,
  };
}

/** What was left out of `asked`, filled with Python's create defaults. */
export function withDefaults(asked: AskedSpec): Spec {
  return {
    ...asked,
    ttlSeconds: asked.ttlSeconds === undefined ? createDefaults().ttl_seconds : asked.ttlSeconds,
    resources: asked.resources ?? makeResources(),
    network: asked.network ?? makeNetwork(),
  };
}

/** `Sandbox.create`'s arguments checked, with Python's defaults for what they leave out. */
export function validatedSpec(options: Parameters<typeof askedSpec>[0]): Spec {
  return withDefaults(askedSpec(options));
}

/**
 * Who a host client acts for (Python's `validate_on_behalf_of`): a non-empty object of
 * strings, or absent. Audited with each request, next to the client's own credentials.
 */
export function validateOnBehalfOf(principal: unknown): Record<string, string> | null {
  if (principal === undefined || principal === null) return null;
  if (typeof principal !== "object" || Array.isArray(principal) || principal instanceof Map
    || !Object.keys(principal).length
    || !Object.values(principal as Record<string, unknown>).every((v) => typeof v === "string")) {
    throw InvalidArgument.create("on_behalf_of", shown(principal), "a non-empty dict of str to str");
  }
  return { ...(principal as Record<string, string>) };
}

/** Python's `_default_name`: `<workload-id slug>-<6 chars of the id>`, else the id. */
export function defaultName(workloadId: string | null, sandboxId: string): string {
  if (workloadId) {
    const slug = [...workloadId.toLowerCase()].map((c) => (/[\p{L}\p{N}]/u.test(c) || "-_.".includes(c) ? c : "-")).join("");
    const base = [...slug.replace(/^[-_.]+|[-_.]+$/g, "")].slice(0, 40).join("");
    if (base) return `${base}-${sandboxId.slice(3, 9)}`;
  }
  return sandboxId;
}

export function absolutePath(path: unknown, field = "path"): string {
  if (typeof path !== "string" || !path.startsWith("/")) {
    throw InvalidArgument.create(field, `${shown(path)} must be an absolute guest path`, "e.g. '/app/main.py'");
  }
  return path;
}

/**
 * The folder `include` paths are relative to: `$MVM_INCLUDE_BASE` (set by `mvmctl run`
 * and `compile`), else the running script's folder, else the cwd.
 */
export function scriptDir(): string {
  const base = process.env.MVM_INCLUDE_BASE;
  if (base) return resolve(base);
  const main = process.argv[1];
  if (main && existsSync(main)) {
    try {
      return dirname(realpathSync(main));
    } catch {
      return dirname(resolve(main));
    }
  }
  return process.cwd();
}

/** Python's `_split_env`-style ordering: literal values first, then secret references. */
export function splitEnv(env: Env): { literal: Record<string, string>; secrets: Record<string, SecretRef> } {
  const literal: Record<string, string> = {};
  const secrets: Record<string, SecretRef> = {};
  for (const [key, value] of Object.entries(env)) {
    if (value instanceof SecretRef) secrets[key] = value;
    else literal[key] = value;
  }
  return { literal, secrets };
}

const SDK_DIR = dirname(fileURLToPath(import.meta.url));
/** This SDK's own files: the build, and (through source maps) its sources. */
const SDK_DIRS = [SDK_DIR, resolve(SDK_DIR, "..", "src")].map((d) => d + "/");
const FRAME_RE = /(?:\(|at )((?:file:\/\/)?\/[^()]*?):(\d+):(\d+)\)?$/;

/** One parsed stack frame outside this SDK and Node's internals. @internal */
export interface UserFrame {
  file: string;
  line: number;
  fn: string;
}

/** The frames of `stack` that belong to user code (not this SDK, not `node:` internals). @internal */
export function userFrames(stack: string | undefined): UserFrame[] {
  const out: UserFrame[] = [];
  for (const raw of (stack ?? "").split("\n").slice(1)) {
    const line = raw.trim();
    const match = FRAME_RE.exec(line);
    if (!match) continue;
    let file = match[1];
    if (file.startsWith("file://")) {
      try {
        file = decodeURIComponent(new URL(file).pathname);
      } catch {
        continue;
      }
    }
    if (SDK_DIRS.some((d) => file.startsWith(d))) continue;
    const fnMatch = /^at (?:async )?(?:new )?([^\s(]+) \(/.exec(line);
    const fn = fnMatch && fnMatch[1] !== "<anonymous>" ? fnMatch[1] : "<module>";
    out.push({ file, line: Number(match[2]), fn });
  }
  return out;
}

/** `file:line` of the first frame outside this SDK: the script's line that made the call. @internal */
export function callerSite(): string | null {
  const frame = userFrames(new Error().stack)[0];
  if (!frame) return null;
  return `${frame.file.slice(frame.file.lastIndexOf("/") + 1)}:${frame.line}`;
}
