/** Lifecycle on real sandboxes (namespace backend): stop/start, pause/resume, snapshots, destroy, disposal. */

import { cleanup, HOME, PACKAGE_DIR, PYTHON, REPO, thrown } from "./helpers.js";

import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { chmodSync, existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { after, describe, test } from "node:test";

import {
  gc, InvalidArgument, InvalidState, NameTaken, resources, Sandbox, SANDBOX_STATES, SandboxError, SandboxLost,
  SandboxNotFound, SandboxPaused, Snapshot,
} from "@mvm/sdk";

after(cleanup);

interface AuditEntry {
  op: string;
  audit_id: string;
  actor: { pid?: number; on_behalf_of?: Record<string, string> };
}

/** The sandbox's audit chain as written ($MVM_HOME/audit/<id>.jsonl). */
function auditEntries(id: string): AuditEntry[] {
  return readFileSync(join(HOME, "audit", `${id}.jsonl`), "utf8").trim().split("\n").map((l) => JSON.parse(l) as AuditEntry);
}

async function gone(id: string): Promise<boolean> {
  return !(await Sandbox.list()).some((i) => i.id === id);
}

describe("lifecycle", () => {
  test("a live create naming nothing gets Python's defaults from mvmctl up's own options, with no other Python call",
    { skip: !existsSync(PYTHON) && "no .venv" }, () => {
      const python = JSON.parse(spawnSync(PYTHON, ["-c",
        "import json; from mvm.spec import create_defaults; print(json.dumps(create_defaults()))"], { encoding: "utf8" }).stdout);
      const dir = mkdtempSync("/tmp/mvmts-mvmctl-");
      try { // a real mvmctl behind a wrapper that notes each call
        const wrapper = join(dir, "mvmctl");
        writeFileSync(wrapper, `#!/bin/sh\necho "$*" >> ${join(dir, "calls")}\n`
          + `tee -a ${join(dir, "requests")} | ${join(REPO, ".venv", "bin", "mvmctl")} "$@"\n`);
        chmodSync(wrapper, 0o755);
        const script = `import { Sandbox } from ${JSON.stringify(join(PACKAGE_DIR, "dist", "index.js"))};
const sb = await Sandbox.create();
const info = await sb.describe();
console.log(JSON.stringify({ template: info.template, ttl: info.expiresAt === null ? null : Math.round(info.expiresAt - info.createdAt),
  resources: info.resources.toDict(), network: { mode: info.network.mode, allow: info.network.allow, allow_wildcards: info.network.allowWildcards } }));
await sb.kill();`;
        const env: NodeJS.ProcessEnv = { ...process.env, MVMCTL: wrapper };
        delete env.MVM_CREATE_DEFAULTS;
        const child = spawnSync(process.execPath, ["--input-type=module", "-e", script], { encoding: "utf8", env });
        assert.equal(child.status, 0, child.stderr);
        const made = JSON.parse(child.stdout.trim().split("\n").at(-1) ?? "{}");
        assert.deepEqual(made, { template: python.template, ttl: python.ttl_seconds, resources: python.resources,
          network: python.network });
        const calls = readFileSync(join(dir, "calls"), "utf8").trim().split("\n");
        assert.deepEqual(calls, ["create-server"]); // not `mvmctl defaults` as well
        const requests = readFileSync(join(dir, "requests"), "utf8").trim().split("\n").map((line) => JSON.parse(line));
        assert.equal(requests.length, 1);
        const args: string[] = requests[0].args; // mvmctl up's arguments: none names what Python's defaults give
        assert.ok(!args.includes("--template") && !args.includes("--ttl") && !args.includes("--network"), args.join(" "));
      } finally {
        rmSync(dir, { recursive: true, force: true });
      }
    });

  test("one mvmctl create-server makes all of a program's sandboxes, answers errors by request, and ends with the program",
    { skip: !existsSync(PYTHON) && "no .venv" }, () => {
      const script = `import { Sandbox, TemplateNotFound } from ${JSON.stringify(join(PACKAGE_DIR, "dist", "index.js"))};
import { createServerInfo } from ${JSON.stringify(join(PACKAGE_DIR, "dist", "create_server.js"))};
const first = await Sandbox.create("python-3.13", { ttl: "5m" });
const server = createServerInfo().pid;
const [a, b] = await Promise.all([Sandbox.create("python-3.13", { ttl: "5m" }), Sandbox.create("python-3.13", { ttl: "5m" })]);
let refused = null;
try { await Sandbox.create("python-3.12", { ttl: "5m" }); } catch (exc) { refused = exc; }
const last = await Sandbox.create("python-3.13", { ttl: "5m" });
const ran = (await last.commands.run(["echo", "ok"])).stdout;
const same = [createServerInfo().pid === server];
for (const sb of [first, a, b, last]) await sb.kill();
console.log(JSON.stringify({ server, same, ran, ids: new Set([first.id, a.id, b.id, last.id]).size,
  refused: refused instanceof TemplateNotFound ? refused.message : String(refused) }));`;
      const child = spawnSync(process.execPath, ["--input-type=module", "-e", script], { encoding: "utf8", timeout: 240_000 });
      assert.equal(child.status, 0, child.stderr); // it ended by itself: the idle server holds nothing open
      const made = JSON.parse(child.stdout.trim().split("\n").at(-1) ?? "{}");
      assert.deepEqual(made.same, [true]); // four creates, one concurrent pair, one refusal: one server
      assert.equal(made.ran, "ok\n");
      assert.equal(made.ids, 4);
      assert.match(made.refused, /python-3\.12.*python-3\.13/s); // Python's listing error, typed
      // the server saw the end of its stdin when the program exited, and ended too
      const deadline = Date.now() + 30_000;
      let alive = true;
      while (alive && Date.now() < deadline) {
        let stat = "";
        try { stat = readFileSync(`/proc/${made.server}/stat`, "utf8"); } catch { stat = ""; }
        alive = stat !== "" && stat.slice(stat.lastIndexOf(")") + 2)[0] !== "Z"; // (a zombie has ended)
        if (alive) spawnSync("sleep", ["0.1"]);
      }
      assert.equal(alive, false, `create-server ${made.server} outlived its program`);
    });

  test("stop keeps the disk, start runs it again; pause freezes, resume continues", async () => {
    await using sb = await Sandbox.create("python-3.13", { ttl: "5m" });
    await sb.files.write("/work/keep.txt", "kept");
    const stopped = await sb.stop();
    assert.equal(stopped.state, "stopped");
    const refused = await thrown(() => sb.commands.run(["true"]));
    assert.ok(refused instanceof InvalidState);
    assert.equal((refused as InvalidState).state, "stopped");
    assert.equal((await sb.start()).state, "running");
    assert.equal(await sb.files.readText("/work/keep.txt"), "kept");

    const ticker = await sb.commands.start(["sh", "-c", "while true; do date +%s%N >> /tmp/ticks; sleep 0.05; done"]);
    assert.equal((await sb.pause()).state, "paused");
    const paused = await thrown(() => sb.commands.run(["true"]));
    assert.ok(paused instanceof SandboxPaused && paused instanceof InvalidState);
    assert.equal((await sb.resume()).state, "running");
    const auto = await sb.commands.run(["true"], { autoResume: true });
    assert.equal(auto.exitCode, 0);
    await sb.pause();
    assert.equal((await sb.commands.run(["echo", "woke"], { autoResume: true })).stdout, "woke\n");
    assert.equal(await sb.state(), "running");
    await ticker.kill();
  });

  test("snapshot, change, resume(snapshot) restores the files; a sandbox made from it takes its shape", async () => {
    const shape = resources({ cpuCores: 2, memoryMb: 384 });
    await using sb = await Sandbox.create("python-3.13", { ttl: "5m", resources: shape });
    await sb.files.write("/work/state.txt", "before");
    const snap = await sb.snapshot("before-change", { expires: "1h" });
    assert.ok(snap instanceof Snapshot);
    assert.equal(snap.name, "before-change");
    assert.equal(snap.sandboxId, sb.id);
    assert.equal(snap.kind, "filesystem");
    assert.ok(snap.sizeBytes > 0);
    assert.ok(snap.expiresAt !== null && Math.abs(snap.expiresAt - snap.createdAt - 3600) < 5);
    assert.match(String(snap.auditId), /^aud_/);
    await sb.files.write("/work/state.txt", "after");
    assert.equal((await sb.resume(snap)).state, "running");
    assert.equal(await sb.files.readText("/work/state.txt"), "before");
    assert.ok((await thrown(() => sb.snapshot("x", { expires: "never" }))) instanceof InvalidArgument);
    // no resources given: the snapshot's own (mvmctl up gets no --cpus/--memory from the SDK)
    await using clone = await Sandbox.create("python-3.13", { ttl: "5m", fromSnapshot: snap.id });
    assert.deepEqual((await clone.describe()).resources.toDict(), shape.toDict());
    assert.equal(await clone.files.readText("/work/state.txt"), "before");
  });

  test("await using destroys the sandbox at the end of the block", async () => {
    let id = "";
    {
      await using sb = await Sandbox.create("python-3.13", { ttl: "5m" });
      id = sb.id;
      assert.equal((await sb.commands.run(["echo", "inside"])).stdout, "inside\n");
    }
    assert.ok(await gone(id));
    assert.ok((await thrown(() => Sandbox.connect(id))) instanceof SandboxNotFound);
  });

  test("using (synchronous disposal) destroys it too, through mvmctl down", async () => {
    let id = "";
    {
      using sb = await Sandbox.create("python-3.13", { ttl: "5m" });
      id = sb.id;
      await sb.files.write("/x", "y");
    }
    assert.ok(await gone(id));
  });

  test("kill is safe twice; a killed handle refuses calls; other handles see the sandbox gone", async () => {
    const sb = await Sandbox.create("python-3.13", { ttl: "5m" });
    const other = await Sandbox.connect(sb.id);
    await other.commands.run(["true"]);
    await sb.kill();
    await sb.kill();
    const refused = await thrown(() => sb.commands.run(["true"]));
    assert.ok(refused instanceof InvalidState);
    assert.equal((refused as InvalidState).state, "destroyed");
    const lost = await thrown(() => other.commands.run(["true"]));
    // gone, or (its supervisor still finishing the destroy when the request arrives) destroyed
    const destroyed = lost instanceof InvalidState && lost.state === "destroyed";
    assert.ok(lost instanceof SandboxError || lost instanceof SandboxNotFound || destroyed, String(lost));
    await other.destroy(); // already gone: not an error
    assert.ok(await gone(sb.id));
  });

  test("onBehalfOf reaches the audit chain: the creation and every request of the handle", async () => {
    const principal = { client: "agent-7", via: "mcp" };
    await using sb = await Sandbox.create("python-3.13", { ttl: "5m", onBehalfOf: principal });
    const result = await sb.commands.run(["echo", "acting"]);
    await sb.files.write("/work/who.txt", "me");
    const other = await Sandbox.connect(sb.id); // a handle made without it acts for nobody
    await other.commands.run(["true"]);
    other.close();
    const entries = auditEntries(sb.id);
    const created = entries.find((e) => e.op === "sandbox.create");
    assert.deepEqual(created?.actor.on_behalf_of, principal);
    assert.equal(created?.actor.pid === process.pid, false); // created by mvmctl up, on this program's behalf
    const ran = entries.find((e) => e.audit_id === result.auditId);
    assert.deepEqual(ran?.actor.on_behalf_of, principal);
    assert.equal(ran?.actor.pid, process.pid);
    assert.deepEqual(entries.find((e) => e.op === "fs.write")?.actor.on_behalf_of, principal);
    const runs = entries.filter((e) => e.op === "exec.run");
    assert.equal(runs.length, 2);
    assert.equal(runs[1].actor.on_behalf_of, undefined);
  });

  test("a taken name is a NameTaken; a dead supervisor's sandbox is lost until gc() removes it", async () => {
    const sb = await Sandbox.create("python-3.13", { ttl: "5m", name: "ts-doomed" });
    const taken = await thrown(() => Sandbox.create("python-3.13", { ttl: "5m", name: "ts-doomed" }));
    assert.ok(taken instanceof NameTaken && taken instanceof InvalidArgument, String(taken));
    assert.equal((taken as NameTaken).field, "name");
    assert.equal((taken as NameTaken).sandboxId, sb.id);
    const described = await sb.describe();
    const supervisor = Number(described.details.supervisor_pid);
    // the listing reads the isolation the launch path recorded (the backend registry's answer)
    const record = JSON.parse(readFileSync(join(HOME, "sandboxes", sb.id, "config.json"), "utf8")) as { isolation: string };
    assert.equal(record.isolation, described.isolation);
    assert.equal((await Sandbox.list()).find((i) => i.id === sb.id)?.isolation, described.isolation);
    // Handles open when it dies end with SandboxLost, not a plain SandboxError: a stream
    // being read, a process being waited for.
    const ticker = await sb.commands.start(["sh", "-c", "while :; do echo tick; sleep 0.05; done"]);
    const waited = thrown(() => ticker.wait());
    const streamed = (async () => {
      try {
        for await (const line of ticker.stdout()) {
          if (line === "tick\n") process.kill(supervisor, "SIGKILL");
        }
        return null;
      } catch (exc) {
        return exc;
      }
    })();
    const streamEnd = await streamed;
    assert.ok(streamEnd instanceof SandboxLost, String(streamEnd));
    const waitEnd = await waited;
    assert.ok(waitEnd instanceof SandboxLost, String(waitEnd));
    assert.equal((waitEnd as SandboxLost).details.sandbox_id, sb.id);
    sb.close();
    const state = async () => (await Sandbox.list()).find((i) => i.id === sb.id)?.state;
    for (let i = 0; i < 600 && (await state()) !== "lost"; i++) await new Promise((r) => setTimeout(r, 50));
    assert.equal(await state(), "lost");
    assert.ok(SANDBOX_STATES.includes("lost"));
    const lost = await thrown(() => Sandbox.connect("ts-doomed"));
    assert.ok(lost instanceof SandboxLost && lost instanceof SandboxError, String(lost));
    assert.match(lost.message, /mvmctl gc/);
    const reaped = await gc();
    assert.deepEqual(reaped.map((i) => [i.id, i.state, i.isolation]), [[sb.id, "lost", described.isolation]]);
    assert.ok(await gone(sb.id));
    assert.ok((await thrown(() => Sandbox.connect("ts-doomed"))) instanceof SandboxNotFound);
  });
});
