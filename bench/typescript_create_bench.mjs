// TypeScript SDK: Sandbox.create -> first result (commands.run(["true"])) on the namespace
// backend, no pool: a program's first create (a fresh node process each time: it pays
// Python's start, the imports and the zygote's start) and a later create of the same program.
// With --against DIST (another checkout's sdks/typescript/dist, built) the same runs of
// that code alternate with this one's, so both see the same load. Medians of N.
//
//   npm run build --prefix sdks/typescript && node bench/typescript_create_bench.mjs [N] [--against DIST]
//
// A private MVM_HOME; built templates are shared with ~/.mvm (as the tests do).
import { spawnSync } from "node:child_process";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

import { privateHome } from "./ts_bench_home.mjs";

const REPO = resolve(dirname(fileURLToPath(import.meta.url)), "..");
const cleanup = privateHome();

const args = process.argv.slice(2);
const N = Number(args.find((a, i) => !a.startsWith("--") && args[i - 1] !== "--against") ?? 7);
const against = args.includes("--against") ? resolve(args[args.indexOf("--against") + 1]) : null;
const dists = { this: join(REPO, "sdks", "typescript", "dist"), ...(against ? { against } : {}) };
const median = (values) => [...values].sort((a, b) => a - b)[Math.floor(values.length / 2)];

/** A node program that makes `creates` sandboxes one after another; the ms of each create -> first result. */
function program(dist, creates) {
  const script = `import { Sandbox } from ${JSON.stringify(join(dist, "index.js"))};
const times = [];
for (let i = 0; i < ${creates}; i++) {
  const started = performance.now();
  const sandbox = await Sandbox.create("python-3.13", { ttl: "5m" });
  await sandbox.commands.run(["true"]);
  times.push(performance.now() - started);
  await sandbox.kill();
}
console.log(JSON.stringify(times));`;
  const child = spawnSync(process.execPath, ["--input-type=module", "-e", script], { encoding: "utf8" });
  if (child.status !== 0) throw new Error(`the program failed: ${child.stderr}`);
  return JSON.parse(child.stdout.trim().split("\n").at(-1));
}

try {
  program(dists.this, 1); // the template built and its caches warm before anything is timed
  const first = Object.fromEntries(Object.keys(dists).map((k) => [k, []]));
  const later = Object.fromEntries(Object.keys(dists).map((k) => [k, []]));
  for (let round = 0; round < N; round++) {
    for (const [name, dist] of Object.entries(dists)) {
      const [cold, ...warm] = program(dist, 3);
      first[name].push(cold);
      later[name].push(...warm);
    }
  }
  console.log(`TypeScript Sandbox.create -> first result, namespace backend, medians of ${N} programs (3 creates each)`);
  console.log("| code | a program's first create | a later create |");
  console.log("|---|---|---|");
  for (const name of Object.keys(dists)) {
    console.log(`| ${name} | ${median(first[name]).toFixed(0)} ms | ${median(later[name]).toFixed(0)} ms |`);
  }
} finally {
  cleanup();
}
