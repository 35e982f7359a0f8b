/**
 * What a create asks for where it names nothing (template, TTL, resources, network), as
 * Python's `mvm.spec.create_defaults()` defines it: `$MVM_CREATE_DEFAULTS` (set by
 * `mvmctl run`/`compile` for a Node script), else `mvmctl defaults --json`, asked once per
 * process. This SDK keeps no copy of these values. Asked only where TypeScript must know
 * them itself (a recording, a pool claim when a pool exists, `resources()`/`network()`
 * filling what they are not given): a live create leaves out what its caller left out
 * and `mvmctl up` applies them, so it costs no second Python start.
 * @internal
 */

import { spawnSync } from "node:child_process";

import { SandboxError } from "./errors.js";
import { requireMvmctl } from "./paths.js";

export interface CreateDefaults {
  template: string;
  ttl_seconds: number | null;
  resources: { cpu_cores: number; memory_mb: number; rootfs_size_mb: number; max_processes: number };
  network: { mode: string; allow: string[]; allow_wildcards: boolean };
}

let cached: CreateDefaults | null = null;

export function createDefaults(): CreateDefaults {
  if (cached !== null) return cached;
  let text = process.env.MVM_CREATE_DEFAULTS;
  if (!text) {
    const mvmctl = requireMvmctl();
    const result = spawnSync(mvmctl, ["defaults", "--json"], { encoding: "utf8", timeout: 60_000 });
    if (result.status !== 0) {
      throw new SandboxError(`mvmctl defaults failed: ${(result.stderr || String(result.error ?? "")).trim()}`);
    }
    text = result.stdout;
  }
  try {
    cached = JSON.parse(text) as CreateDefaults;
  } catch (exc) {
    throw new SandboxError(`no create defaults from Python (${(exc as Error).message})`);
  }
  return cached;
}
