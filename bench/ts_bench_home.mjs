// The environment of the TypeScript benches: a private MVM_HOME (removed by cleanup())
// sharing the built templates and caches of the user's (as the tests do), on the
// namespace backend.
import { mkdtempSync, rmSync } from "node:fs";
import { homedir } from "node:os";
import { join } from "node:path";

export function privateHome() {
  const userHome = process.env.MVM_HOME || join(homedir(), ".mvm");
  process.env.MVM_TEMPLATES ??= join(userHome, "templates");
  process.env.MVM_CACHE ??= join(userHome, "cache");
  process.env.MVM_HOME = mkdtempSync("/tmp/mvm-tsbench-");
  process.env.MVM_BACKEND = "namespace";
  return () => rmSync(process.env.MVM_HOME, { recursive: true, force: true });
}
