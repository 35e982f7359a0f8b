/**
 * Entry point for running a workload script with Node, used by `mvmctl run` and
 * `mvmctl compile` (src/mvm/modes/runner.py):
 *
 *     node --enable-source-maps sdks/typescript/dist/runner/boot.js SCRIPT [ARGS...]
 *
 * It registers the module hooks (`@mvm/sdk` → this build, `.ts` transpiled), runs
 * SCRIPT as an ES module with `process.argv = [node, SCRIPT, ...ARGS]`, and — in
 * record/plan mode — reports how the script ended as the `script.error` /
 * `script.exit` event the Python runner reads from the recording, with the script's
 * own `file:line`. `$MVM_RECORD_TIMEOUT` seconds after start it writes
 * `Timeout (...)` to `$MVM_RECORD_TIMEOUT_DUMP` and exits 1, like Python's watchdog.
 * @internal
 */

import "../polyfill.js";

import { readFileSync, writeFileSync } from "node:fs";
import * as nodeModule from "node:module";
import { resolve } from "node:path";
import { pathToFileURL } from "node:url";

import { currentRecording } from "../recording.js";
import { userFrames, type UserFrame } from "../spec.js";

const RECORDED = new Set(["record", "plan"]);

function frameOf(error: unknown, script: string): Record<string, unknown> {
  const stack = error instanceof Error ? error.stack : undefined;
  const frames = userFrames(stack);
  const inScript = frames.filter((f) => f.file === script);
  const frame: UserFrame | undefined = inScript[inScript.length - 1] ?? inScript[0] ?? frames[0];
  const codeAt = (f: UserFrame): string => {
    try {
      return (readFileSync(f.file, "utf8").split("\n")[f.line - 1] ?? "").trim();
    } catch {
      return "";
    }
  };
  if (frame === undefined) return { file: script, line: null, code: null, frames: [] };
  // V8 lists the innermost frame first; Python's traceback lists it last.
  const ordered = [...frames].reverse().slice(-6);
  return {
    file: frame.file, line: frame.line, code: codeAt(frame),
    frames: ordered.map((f) => `File "${f.file}", line ${f.line}, in ${f.fn}\n    ${codeAt(f)}`),
  };
}

async function main(): Promise<void> {
  const [scriptArg, ...args] = process.argv.slice(2);
  if (!scriptArg) {
    process.stderr.write("usage: boot.js SCRIPT [ARGS...]\n");
    process.exit(2);
  }
  const script = resolve(scriptArg);
  const entry = pathToFileURL(script).href;
  const register = (nodeModule as unknown as { register?: (s: string, p: string, o?: unknown) => void }).register;
  if (typeof register !== "function") {
    process.stderr.write(`mvm: running ${scriptArg} needs Node >= 18.19 or >= 20.6 (module.register); this is ${process.version}\n`);
    process.exit(1);
  }
  register("./hooks.js", import.meta.url, { data: { entry } });
  process.argv = [process.argv[0], script, ...args];

  const mode = process.env.MVM_MODE ?? "live";
  const recorded = RECORDED.has(mode);
  let reported = false;

  const timeout = Number(process.env.MVM_RECORD_TIMEOUT || 0);
  const dumpPath = process.env.MVM_RECORD_TIMEOUT_DUMP;
  if (recorded && timeout > 0 && dumpPath) {
    setTimeout(() => {
      writeFileSync(dumpPath, `Timeout (${timeout} s): the script was still running\n`);
      process.exit(1);
    }, timeout * 1000).unref();
  }

  const reportError = (error: unknown) => {
    if (recorded && !reported) {
      reported = true;
      const err = error instanceof Error ? error : new Error(String(error));
      currentRecording().append({
        op: "script.error", status: 1, ...frameOf(err, script),
        exception: err.name || err.constructor?.name || "Error", message: err.message,
        field: (err as { field?: unknown }).field ?? null,
        traceback: err.stack ?? String(err),
      });
    }
  };
  if (recorded) {
    process.on("exit", (exitCode) => {
      const code = exitCode || Number(process.exitCode ?? 0);
      if (code === 13 && !reported) { // Node's "unsettled top-level await": nothing left that could settle it
        reported = true;
        currentRecording().append({
          op: "script.error", status: 1, file: script, line: null, code: null, frames: [],
          exception: "UnsettledTopLevelAwait", field: null, traceback: "",
          message: "the script awaits a promise that can never settle (nothing is left running that could settle it)",
        });
      }
      if (code && !reported) {
        reported = true;
        currentRecording().append({ op: "script.exit", status: code, file: script, line: null, code: null, frames: [] });
      }
    });
  }
  // Recorded: the runner prints the failure with the script's file:line (like Python's
  // child). Live: the error is printed as Node would print it.
  const fail = (error: unknown) => {
    reportError(error);
    if (!recorded) console.error(error instanceof Error && error.stack ? error.stack : error);
  };
  process.on("unhandledRejection", (reason) => {
    fail(reason);
    process.exit(1);
  });
  try {
    await import(entry);
  } catch (error) {
    fail(error);
    process.exitCode = 1;
  }
}

await main();
