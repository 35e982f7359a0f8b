// Run the compiled tests with Node's own test runner (Node 18 and 20): the test files
// are listed explicitly (Node 18 and 20 differ on directories and globs), and files
// run a few at a time where the runner supports --test-concurrency.
import { spawnSync } from "node:child_process";
import { readdirSync } from "node:fs";
import { join } from "node:path";

const dir = join("build-test", "test");
const only = process.argv.slice(2);
const files = readdirSync(dir).filter((n) => n.endsWith(".test.js")).sort()
  .filter((n) => !only.length || only.some((o) => n.includes(o))).map((n) => join(dir, n));
const [major, minor] = process.versions.node.split(".").map(Number);
const args = ["--enable-source-maps", "--test"];
if (major > 20 || (major === 20 && minor >= 10)) args.push("--test-concurrency=4");
const result = spawnSync(process.execPath, [...args, ...files], { stdio: "inherit" });
process.exit(result.status ?? 1);
