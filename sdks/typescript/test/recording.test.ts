/**
 * Record/plan mode in-process: `Sandbox.create` returns a `Sandbox` talking to a
 * `RecordTransport`, every call appends the event Python's record transport appends, nothing boots, reads throw
 * NotAvailableInRecordMode. (tests/modes/test_typescript_modes.py checks that
 * `mvmctl compile` lowers a TypeScript script and its Python twin to the same IR.)
 */

import "./helpers.js";

import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { createHash } from "node:crypto";
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { after, beforeEach, describe, test } from "node:test";

import {
  closestName, CommandResult, gc, InvalidArgument, InvalidState, network, NetworkInfo, NotAvailableInRecordMode,
  Process, resetRecording, resources, Sandbox, secret, TemplateNotFound,
} from "@mvm/sdk";

import { HOME, PACKAGE_DIR, PYTHON, pythonErrors, thrown } from "./helpers.js";

const work = mkdtempSync("/tmp/mvm-rec-");
const recording = join(work, "recording.jsonl");
const project = join(work, "project");
mkdirSync(join(project, "src", "__pycache__"), { recursive: true });
writeFileSync(join(project, "src", "util.py"), "VALUE = 42\n");
writeFileSync(join(project, "src", "__pycache__", "util.pyc"), "x");
writeFileSync(join(work, "outside.txt"), "secret stuff");
symlinkSync(join(work, "outside.txt"), join(project, "src", "escape.txt"));

function events(): Record<string, unknown>[] {
  return existsSync(recording) ? readFileSync(recording, "utf8").trim().split("\n").filter(Boolean).map((l) => JSON.parse(l)) : [];
}

beforeEach(() => {
  rmSync(recording, { force: true });
  rmSync(recording + ".blobs", { recursive: true, force: true });
  process.env.MVM_MODE = "record";
  process.env.MVM_RECORDING = recording;
  process.env.MVM_INCLUDE_BASE = project;
  process.env.MVM_TEMPLATE_CATALOG = JSON.stringify({
    available: ["minimal", "node-20", "python-3.11", "python-3.13"],
    unbuildable: { "python-3.12": "no Debian release ships Python 3.12 (bookworm has 3.11, trixie 3.13)" },
  });
  resetRecording();
});

after(() => {
  for (const key of ["MVM_MODE", "MVM_RECORDING", "MVM_INCLUDE_BASE", "MVM_TEMPLATE_CATALOG"]) delete process.env[key];
  rmSync(work, { recursive: true, force: true });
});

/** The messages of Python's refusals (NotAvailableInRecordMode) for the same calls, each
 * source eval'ed after `prelude`; null for a call Python does not refuse, or null without
 * the Python SDK. Any other Python error fails the test. */
function pythonRefusals(sources: string[], env: Record<string, string>, prelude = ""): (string | null)[] | null {
  if (!existsSync(PYTHON)) return null;
  return pythonErrors(sources, { prelude, env }).map((error) => {
    if (error === null) return null;
    assert.equal(error.type, "NotAvailableInRecordMode", error.message);
    return error.message;
  });
}

describe("record mode", () => {
  test("the seed example records Python's events, and nothing boots", async () => {
    {
      await using sandbox = await Sandbox.create("python-3.13", {
        workloadId: "agent-tool", ttl: "30m", include: ["src"],
        resources: resources({ cpuCores: 1, memoryMb: 512, rootfsSizeMb: 1024 }),
      });
      assert.equal(sandbox.constructor, Sandbox); // the live class: only its transport differs
      assert.equal(sandbox.recorded, true);
      assert.equal(sandbox.mode, "record");
      assert.match(sandbox.name, /^agent-tool-record$/);
      await sandbox.files.write("/app/main.py", "print('hello from mvm')");
      await sandbox.commands.start(["python", "/app/main.py"], { env: { MODE: "dev", API_KEY: secret("api-key") } });
    }
    const [create, write, start, destroy, ...rest] = events();
    assert.equal(rest.length, 0);
    const digest = createHash("sha256").update("VALUE = 42\n").digest("hex");
    assert.deepEqual({ ...create, at: undefined }, {
      seq: 0, op: "sandbox.create", sandbox: 0, mode: "record", at: undefined, template: "python-3.13", name: null,
      workload_id: "agent-tool", backend: null,
      resources: { cpu_cores: 1, memory_mb: 512, rootfs_size_mb: 1024, max_processes: 256 },
      network: { mode: "deny", allow: [], allow_wildcards: false }, ttl_seconds: 1800, tags: {}, from_snapshot: null,
      env: {}, include: { guest_root: "/app", paths: ["src"], files: [{ path: "src/util.py", size: 11, sha256: digest, mode: 0o644 }] },
      auto_pause_seconds: null, on_behalf_of: null,
    });
    assert.match(String(create.at), /^recording\.test\.(ts|js):\d+$/);
    assert.equal(write.op, "files.write");
    assert.equal(write.size, 23);
    assert.equal(readFileSync(join(recording + ".blobs", String(write.sha256)), "utf8"), "print('hello from mvm')");
    assert.deepEqual(start.env, { API_KEY: { kind: "secret_ref", name: "api-key" }, MODE: { kind: "literal", value: "dev" } });
    assert.deepEqual({ ...start, seq: 0, at: null }, {
      seq: 0, at: null, op: "commands.start", sandbox: 0, argv: ["python", "/app/main.py"], env: start.env, cwd: null,
      stdin: false, auto_resume: false, process: 0,
    });
    assert.equal(destroy.op, "sandbox.destroy");
    assert.deepEqual(readdirSync(HOME).filter((n) => n === "sandboxes"), []);
  });

  test("run, processes, files and lifecycle are recorded; reads are refused", async () => {
    const sandbox = await Sandbox.create("python-3.13", { name: "rec", mode: "plan", backend: "namespace" });
    const result = await sandbox.commands.run("echo hi", { stdin: "in", timeoutSeconds: 5, check: true });
    assert.ok(result instanceof CommandResult);
    assert.equal(result.recorded, true);
    assert.equal(result.exitCode, null);
    const proc = await sandbox.commands.start(["cat"], { stdin: true });
    assert.ok(proc instanceof Process && proc.recorded);
    assert.equal(proc.pid, null);
    assert.equal(String(proc), "<Process #1 (recorded) argv=['cat']>");
    await proc.sendStdin("data");
    await proc.closeStdin();
    await proc.signal("SIGTERM", { group: false });
    await proc.kill();
    await sandbox.files.mkdir("/data", { mode: 0o700 });
    await sandbox.files.move("/data/a", "/data/b", { overwrite: true });
    await sandbox.files.remove("/data", { recursive: true });
    await sandbox.pause();
    await sandbox.resume();
    const snap = await sandbox.snapshot("s1", { expires: "1d", keep: true });
    assert.equal(snap.kind, "recorded");
    await sandbox.resume(snap);
    await sandbox.stop();
    await sandbox.start();
    assert.equal((await sandbox.describe()).state, "running");
    for (const call of [() => sandbox.files.read("/x"), () => sandbox.files.list("/"), () => sandbox.files.exists("/x"),
      () => proc.wait(), () => proc.exitCode(), () => sandbox.commands.list(), async () => { for await (const _ of sandbox.logs()) break; },
      async () => { for await (const _ of proc) break; }]) {
      const exc = await thrown(call);
      assert.ok(exc instanceof NotAvailableInRecordMode, String(exc));
      assert.match(exc.message, /is not available in plan mode/);
    }
    // the workload IR has no user field: acting as another user is refused, never silently dropped
    for (const call of [() => sandbox.files.write("/x", "y", { user: "nobody" }), () => sandbox.files.mkdir("/d", { user: "nobody" }),
      () => sandbox.files.remove("/x", { user: "nobody" }), () => sandbox.files.move("/x", "/y", { user: "nobody" })]) {
      const exc = await thrown(call);
      assert.ok(exc instanceof NotAvailableInRecordMode, String(exc));
      assert.match(exc.message, /no user field/);
    }
    await sandbox.kill();
    await sandbox.kill();
    assert.ok((await thrown(() => sandbox.files.write("/x", "y"))) instanceof InvalidState);
    const ops = events().map((e) => e.op);
    assert.deepEqual(ops, ["sandbox.create", "commands.run", "commands.start", "process.stdin", "process.close_stdin",
      "process.signal", "process.signal", "files.mkdir", "files.move", "files.remove", "sandbox.pause", "sandbox.resume",
      "sandbox.snapshot", "sandbox.resume", "sandbox.stop", "sandbox.start", "sandbox.destroy"]);
    const all = events();
    assert.deepEqual(all[1].argv, ["/bin/sh", "-c", "echo hi"]);
    assert.equal(all[1].check, true);
    assert.equal(all[1].timeout_seconds, 5);
    assert.equal(all[5].signal, "TERM");
    assert.equal(all[6].signal, "KILL");
    assert.deepEqual(all[11].snapshot, null);
    assert.deepEqual(all[13].snapshot, { recorded: 0 });
    assert.equal(all[12].expires_seconds, 86400);
    assert.equal(all[0].mode, "plan");
  });

  test("bad calls fail as in Python, before anything is recorded", async () => {
    const template = await thrown(() => Sandbox.create("python-3.12"));
    assert.ok(template instanceof TemplateNotFound);
    assert.match(template.message, /^template 'python-3\.12' cannot be built here \(no Debian release ships Python 3\.12/);
    const typo = await thrown(() => Sandbox.create("python-3.1"));
    assert.match(typo.message, /unknown template; did you mean 'python-3.11'\?/);
    const include = await thrown(() => Sandbox.create("python-3.13", { include: ["../outside.txt"] }));
    assert.ok(include instanceof InvalidArgument);
    assert.equal((include as InvalidArgument).field, "include");
    const backend = await thrown(() => Sandbox.create("python-3.13", { backend: "docker" }));
    assert.match(backend.message, /^backend: unknown backend 'docker' \(allowed: \['vm', 'namespace'\]\)$/);
    assert.deepEqual(events(), []);
    const sandbox = await Sandbox.create("python-3.13");
    assert.match((await thrown(() => sandbox.commands.run([]))).message, /^argv: must be a non-empty list/);
    assert.match((await thrown(() => sandbox.commands.run(["x"], { maxOutputBytes: 0 }))).message, /^max_output_bytes:/);
    assert.match((await thrown(() => sandbox.files.write("relative", "x"))).message, /^path: 'relative' must be an absolute/);
    assert.match((await thrown(() => sandbox.files.write("/x", "x", { mode: 0o17777 }))).message, /is not a file mode/);
    const stdin = await thrown(() => sandbox.commands.start(["cat"]).then((p) => p.sendStdin("x")));
    assert.ok(stdin instanceof InvalidState);
  });

  test("ports and network need a live sandbox: Python's NotAvailableInRecordMode, word for word", async () => {
    const sandbox = await Sandbox.create("python-3.13", {
      network: network({ mode: "allow", allow: ["pypi.org:443"] }), mode: "plan" });
    const calls: [() => Promise<unknown>, string][] = [
      [() => sandbox.ports.forward({ guestPort: 8000 }), "sandbox.ports.forward(guest_port=8000)"],
      [() => sandbox.ports.list(), "sandbox.ports.list()"],
      [() => sandbox.ports.close("fwd_x"), "sandbox.ports.close('fwd_x')"],
      [() => sandbox.network.update({ allow: ["pypi.org:443"] }), "sandbox.network.update(['pypi.org:443'])"],
    ];
    const expected = pythonRefusals(calls.map(([, py]) => py), { MVM_RECORDING: join(work, "python.jsonl") },
      'sandbox = mvm.Sandbox.create("python-3.13", mode="plan")');
    for (const [i, [call, py]] of calls.entries()) {
      const exc = await thrown(call);
      assert.ok(exc instanceof NotAvailableInRecordMode, String(exc));
      assert.match(exc.message, /is not available in plan mode: .* use them in live mode/);
      if (expected !== null) assert.equal(exc.message, expected[i], py);
    }
    const info = await sandbox.describe();
    assert.ok(info.network instanceof NetworkInfo);
    assert.deepEqual(info.network.toDict(), { mode: "allow", allow: ["pypi.org:443"], allow_wildcards: false });
    // the policy asked for is known without a live sandbox (Python's record transport answers the same)
    assert.deepEqual((await sandbox.network.policy()).toDict(), info.network.toDict());
    assert.deepEqual(events().map((e) => e.op), ["sandbox.create"]); // nothing of the refused calls was recorded
  });

  test("a create naming nothing records Python's defaults (asked of mvmctl, not copied)", { skip: !existsSync(PYTHON) && "no .venv" }, async () => {
    const done = spawnSync(PYTHON, ["-c", "import json; from mvm.spec import create_defaults; print(json.dumps(create_defaults()))"],
      { encoding: "utf8" });
    assert.equal(done.status, 0, done.stderr);
    const python = JSON.parse(done.stdout) as Record<string, unknown>;
    await (await Sandbox.create()).kill();
    const [create] = events();
    assert.deepEqual({ template: create.template, ttl_seconds: create.ttl_seconds, resources: create.resources,
      network: create.network }, python);
    assert.deepEqual(resources({ memoryMb: 1024 }).toDict(), { ...(python.resources as object), memory_mb: 1024 });
    assert.deepEqual(network().toDict(), python.network);
    // and they are whatever Python answers: another answer ($MVM_CREATE_DEFAULTS, as mvmctl run hands it) is followed
    const other = { template: "python-3.11", ttl_seconds: 60, resources: { ...(python.resources as object), memory_mb: 384 },
      network: python.network };
    const script = `import { Sandbox } from ${JSON.stringify(join(PACKAGE_DIR, "dist", "index.js"))};
await (await Sandbox.create()).kill();`;
    const child = spawnSync(process.execPath, ["--input-type=module", "-e", script],
      { encoding: "utf8", env: { ...process.env, MVM_CREATE_DEFAULTS: JSON.stringify(other) } });
    assert.equal(child.status, 0, child.stderr);
    const recorded = events().filter((e) => e.op === "sandbox.create").at(-1) ?? {};
    assert.deepEqual({ template: recorded.template, ttl_seconds: recorded.ttl_seconds, resources: recorded.resources,
      network: recorded.network }, other);
  });

  test("onBehalfOf is recorded for the IR, as Python's on_behalf_of", async () => {
    const sandbox = await Sandbox.create("python-3.13", { onBehalfOf: { client: "inspector", via: "mcp" } });
    await sandbox.kill();
    assert.deepEqual(events()[0].on_behalf_of, { client: "inspector", via: "mcp" });
    resetRecording();
    rmSync(recording, { force: true });
    await (await Sandbox.create("python-3.13")).kill();
    assert.equal(events()[0].on_behalf_of, null);
  });

  test("connect, list and gc find running sandboxes: a recording has none (Python's refusal)", async () => {
    const calls: [() => Promise<unknown>, string][] = [
      [() => Sandbox.connect("box"), "mvm.Sandbox.connect('box')"],
      [() => Sandbox.list(), "mvm.Sandbox.list()"],
    ];
    const expected = pythonRefusals(calls.map(([, py]) => py), { MVM_MODE: "plan" });
    process.env.MVM_MODE = "plan";
    for (const [i, [call, py]] of calls.entries()) {
      const exc = await thrown(call);
      assert.ok(exc instanceof NotAvailableInRecordMode, String(exc));
      if (expected !== null) assert.equal(exc.message, expected[i], py);
    }
    const reaping = await thrown(() => gc());
    assert.ok(reaping instanceof NotAvailableInRecordMode, String(reaping));
    assert.match(reaping.message, /^gc is not available in plan mode: .* clean up lost sandboxes with `mvmctl gc`$/);
    assert.deepEqual(events(), []);
  });

  test("autoPause is recorded for the IR, as Python's auto_pause", async () => {
    const sandbox = await Sandbox.create("python-3.13", { autoPause: "5m" });
    assert.equal((await sandbox.describe()).details.auto_pause_seconds, 300);
    assert.equal(events()[0].auto_pause_seconds, 300);
    assert.match((await thrown(() => Sandbox.create("python-3.13", { autoPause: "soon" }))).message, /^auto_pause: /);
  });

  test("'did you mean' follows Python's rule (closest_name), word for word", () => {
    const names = ["minimal", "node-20", "python-3.11", "python-3.13"];
    const words = ["python-3.1", "pyhton-3.13", "node20", "minimal", "ruby-3.3", "x", "", "pythn-3.13", "nod-20x"];
    const expected = words.map((w) => closestName(w, names));
    assert.deepEqual(expected.slice(0, 5), ["python-3.11", "python-3.13", "node-20", "minimal", null]);
    if (!existsSync(PYTHON)) return;
    const done = spawnSync(PYTHON, ["-c", "import json, sys; from mvm.templates.catalog import closest_name; "
      + "words, names = json.loads(sys.stdin.read()); print(json.dumps([closest_name(w, names) for w in words]))"],
    { input: JSON.stringify([words, names]), encoding: "utf8" });
    assert.equal(done.status, 0, done.stderr);
    assert.deepEqual(expected, JSON.parse(done.stdout));
  });

  test("included symlinks out of the tree and __pycache__ are skipped", async () => {
    await Sandbox.create("python-3.13", { include: ["src"] });
    const files = (events()[0].include as { files: { path: string }[] }).files.map((f) => f.path);
    assert.deepEqual(files, ["src/util.py"]);
  });
});
