// TypeScript SDK: create -> first result (commands.run(["true"])) on the namespace backend,
// through Python (`mvmctl up`'s options in the program's `mvmctl create-server`: the
// baseline, a program's later create) and by claiming a warm pool's member natively (the
// `sandbox.claim` op over the member's socket), measured in the same run, median of N.
// The pool is this program's own (`pool()`, size N, refilled by its holder; each timed
// create waits for a full pool first, so no refill start is timed), or with --cli-pool
// one made by `mvmctl pool up` (nothing refills it).
//
//   npm run build --prefix sdks/typescript && node bench/typescript_pool_bench.mjs [N] [--cli-pool]
//
// A private MVM_HOME; built templates are shared with ~/.mvm (as the tests do).
import { spawnSync } from "node:child_process";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

import { privateHome } from "./ts_bench_home.mjs";

const REPO = resolve(dirname(fileURLToPath(import.meta.url)), "..");
const cleanup = privateHome();
const MVMCTL = process.env.MVMCTL || join(REPO, ".venv", "bin", "mvmctl");
const { Sandbox, pool, resources } = await import(join(REPO, "sdks", "typescript", "dist", "index.js"));

const N = Number(process.argv.slice(2).find((a) => !a.startsWith("--")) ?? 5);
const CLI_POOL = process.argv.includes("--cli-pool");
const median = (values) => [...values].sort((a, b) => a - b)[Math.floor(values.length / 2)];

async function createToFirstResult(options) {
  const started = performance.now();
  const sandbox = await Sandbox.create("python-3.13", { ttl: "5m", ...options });
  await sandbox.commands.run(["true"]);
  const ms = performance.now() - started;
  const pooled = (await sandbox.describe()).pool !== null;
  await sandbox.kill();
  return { ms, pooled };
}

try {
  await createToFirstResult({}); // the template built and its caches warm before anything is timed
  const viaMvmctl = [];
  for (let i = 0; i < N; i++) viaMvmctl.push((await createToFirstResult({})).ms);
  const shape = resources({ memoryMb: 288 });
  let warm = null;
  if (CLI_POOL) {
    const made = spawnSync(MVMCTL, ["pool", "up", "--size", String(N), "--ttl", "5m", "--memory", "288", "--json"],
      { encoding: "utf8" });
    if (made.status !== 0) throw new Error(`mvmctl pool up failed: ${made.stderr}`);
  } else {
    warm = await pool("python-3.13", { size: Math.min(N, 16), ttl: "5m", resources: shape });
  }
  const claimed = [];
  try {
    for (let i = 0; i < N; i++) {
      await warm?.waitReady(120);
      const { ms, pooled } = await createToFirstResult({ resources: shape });
      if (!pooled) throw new Error("a create the pool serves did not claim a member");
      claimed.push(ms);
    }
  } finally {
    await warm?.close();
  }
  const [up, claim] = [median(viaMvmctl), median(claimed)];
  console.log(`create -> first result, median of ${N}: through mvmctl create-server ${up.toFixed(0)} ms; `
    + `native claim from ${CLI_POOL ? "an mvmctl pool up" : "this program's pool()"} ${claim.toFixed(0)} ms `
    + `(${(up / claim).toFixed(1)}x faster)`);
} finally {
  cleanup();
}
