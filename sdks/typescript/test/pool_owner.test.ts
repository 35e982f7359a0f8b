/**
 * `pool()` / `Pool` (Python's `mvm.pool`): a TypeScript program owns a warm pool of real
 * namespace sandboxes, kept filled by its `mvmctl pool hold` process; a create claims a
 * member; `close()` — or the program's exit without it — leaves no pooled sandbox, holder
 * or pool directory behind; bad values fail with the Python SDK's errors, word for word,
 * leaving nothing. Times are never asserted (bench/typescript_pool_bench.mjs measures them).
 */

import { cleanup, HOME, PACKAGE_DIR, PYTHON, pythonErrors, thrown } from "./helpers.js";

import assert from "node:assert/strict";
import { spawn, spawnSync } from "node:child_process";
import { existsSync, readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { after, describe, test } from "node:test";

import { InvalidArgument, InvalidState, MvmError, Pool, pool, PoolInfo, pools, resources, Sandbox } from "@mvm/sdk";

after(cleanup);

/** Whether process `pid` runs (a zombie does not: Python's `pid_alive`). */
function alive(pid: number): boolean {
  try {
    return readFileSync(`/proc/${pid}/stat`, "utf8").split(")").pop()?.trim()[0] !== "Z";
  } catch {
    return false;
  }
}

function supervisorPid(sandboxId: string): number {
  const state = JSON.parse(readFileSync(join(HOME, "sandboxes", sandboxId, "state.json"), "utf8")) as { supervisor_pid: number };
  return state.supervisor_pid;
}

/** Poll `check` until it holds (a condition, not a sleep); fail with `what` after `seconds`. */
async function waitFor(check: () => boolean, what: string, seconds = 60): Promise<void> {
  const deadline = Date.now() + seconds * 1000;
  while (!check()) {
    if (Date.now() > deadline) assert.fail(`still not the case after ${seconds} s: ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

/** This process's child processes (a pool's holder is one while the pool is open). */
function children(): string[] {
  const done = spawnSync("pgrep", ["-P", String(process.pid)], { encoding: "utf8" });
  return done.stdout.split("\n").filter(Boolean);
}

const listed = (dir: string) => (existsSync(join(HOME, dir)) ? readdirSync(join(HOME, dir)).sort() : []);

describe("pool()", () => {
  test("a pool a create claims from: describe(), waitReady(), refill after a claim, close() leaves nothing", async () => {
    const shape = resources({ memoryMb: 416 }); // no other create of this file asks for it
    const warm = await pool("python-3.13", { size: 2, ttl: "5m", resources: shape });
    assert.ok(warm instanceof Pool);
    assert.deepEqual([warm.template, warm.backend, warm.size, warm.ttlSeconds, warm.recorded, warm.closed],
      ["python-3.13", "namespace", 2, 300, false, false]);
    const full = await warm.waitReady();
    assert.ok(full instanceof PoolInfo);
    assert.equal(full.ready.length, 2);
    assert.equal(full.refilling, true);
    assert.match(String(full.details.template_digest), /^[0-9a-f]{64}$/);
    const holder = full.ownerPid as number;
    assert.ok(alive(holder));
    assert.deepEqual((await pools()).map((p) => p.id), [warm.id]);

    await using sb = await warm.create({ name: "ts-owned", env: { MODE: "owned" } });
    assert.ok(full.ready.includes(sb.id));
    const info = await sb.describe();
    assert.deepEqual([info.name, info.state, info.pool?.id], ["ts-owned", "running", warm.id]);
    assert.equal((await sb.commands.run(["sh", "-c", "echo $MODE"])).stdout, "owned\n");
    // a plain Sandbox.create asking for what the pool serves claims from it too
    await using plain = await Sandbox.create("python-3.13", { ttl: "5m", resources: shape });
    assert.equal((await plain.describe()).pool?.id, warm.id);

    // the holder's refill starts new members for the claimed ones
    const refilled = await warm.waitReady();
    assert.equal(refilled.ready.length, 2);
    assert.ok(!refilled.ready.includes(sb.id) && !refilled.ready.includes(plain.id));
    const waiting = refilled.ready.map((id) => ({ id, pid: supervisorPid(id) }));

    for (const [options, field] of [[{ fromSnapshot: "snap" }, "from_snapshot"], [{ backend: "vm" }, "backend"]] as const) {
      const refused = await thrown(() => warm.create(options as object));
      assert.ok(refused instanceof InvalidArgument, String(refused));
      assert.equal((refused as InvalidArgument).field, field);
    }

    await warm.close();
    await warm.close(); // safe twice
    assert.equal(warm.closed, true);
    assert.deepEqual(await pools(), []);
    assert.ok(!existsSync(join(HOME, "pools", warm.id)));
    for (const member of waiting) {
      assert.ok(!existsSync(join(HOME, "sandboxes", member.id)), `${member.id} left behind`);
      assert.ok(!alive(member.pid), `${member.id}'s supervisor ${member.pid} still runs`);
    }
    assert.ok(!alive(holder), "the holder still runs");
    assert.deepEqual(children(), []);
    assert.ok(await thrown(() => warm.describe()) instanceof InvalidState);
    // what it handed out are ordinary sandboxes now, and go on
    assert.equal((await sb.commands.run(["true"])).exitCode, 0);
    assert.deepEqual((await Sandbox.list()).map((s) => s.id).sort(), [sb.id, plain.id].sort());
  });

  test("a program that exits without close() leaves no pooled sandbox behind", async () => {
    const script = `
      import { pool } from ${JSON.stringify(join(PACKAGE_DIR, "dist", "index.js"))};
      const warm = await pool("python-3.13", { size: 1, ttl: "5m", resources: (await import(${JSON.stringify(join(PACKAGE_DIR, "dist", "index.js"))})).resources({ memoryMb: 448 }) });
      const info = await warm.waitReady();
      console.log(JSON.stringify({ id: warm.id, ready: info.ready, holder: info.ownerPid }));
    `;
    const child = spawn(process.execPath, ["--input-type=module", "-e", script], { stdio: ["ignore", "pipe", "inherit"] });
    let out = "";
    child.stdout.on("data", (chunk: Buffer) => (out += chunk.toString()));
    const code = await new Promise((resolve) => child.on("close", resolve));
    assert.equal(code, 0);
    const made = JSON.parse(out) as { id: string; ready: string[]; holder: number };
    assert.equal(made.ready.length, 1);
    const member = made.ready[0];
    await waitFor(() => !existsSync(join(HOME, "pools", made.id)) && !existsSync(join(HOME, "sandboxes", member))
      && !alive(made.holder), "the pool, its member and its holder are gone");
    assert.deepEqual(await pools(), []);
  });

  test("a holder killed meanwhile: requests fail typed, close() still destroys the waiting members", async () => {
    const warm = await pool("python-3.13", { size: 1, ttl: "5m", resources: resources({ memoryMb: 480 }) });
    const info = await warm.waitReady();
    const member = { id: info.ready[0], pid: supervisorPid(info.ready[0]) };
    process.kill(info.ownerPid as number, "SIGKILL");
    await waitFor(() => !alive(info.ownerPid as number), "the holder is gone");
    const exc = await thrown(() => warm.describe());
    assert.ok(exc instanceof MvmError && exc.wireType === "SandboxError", String(exc));
    await warm.close();
    assert.ok(!existsSync(join(HOME, "pools", warm.id)));
    assert.ok(!existsSync(join(HOME, "sandboxes", member.id)));
    await waitFor(() => !alive(member.pid), "the member's supervisor exits");
    assert.deepEqual(children(), []);
  });

  test("bad values: the Python SDK's errors word for word, and nothing is left", { skip: !existsSync(PYTHON) && "no .venv" }, async () => {
    const cases: [() => Promise<unknown>, string][] = [
      [() => pool("python-3.13", { size: 0 }), "mvm.pool('python-3.13', size=0)"],
      [() => pool("python-3.13", { size: "2" as unknown as number }), "mvm.pool('python-3.13', size='2')"],
      [() => pool("python-3.13", { size: true as unknown as number }), "mvm.pool('python-3.13', size=True)"],
      [() => pool("python-3.13", { ttl: null as unknown as string }), "mvm.pool('python-3.13', ttl=None)"],
      [() => pool("python-3.13", { ttl: "25h" }), "mvm.pool('python-3.13', ttl='25h')"],
      [() => pool("python-3.13", { backend: "bogus" }), "mvm.pool('python-3.13', backend='bogus')"],
      [() => pool("no-such-template"), "mvm.pool('no-such-template')"],
    ];
    const before = [listed("pools"), listed("sandboxes")];
    const expected = pythonErrors(cases.map(([, py]) => py));
    for (let i = 0; i < cases.length; i++) {
      const exc = await thrown(cases[i][0]);
      const want = expected[i];
      assert.ok(want, `${cases[i][1]} did not fail in Python`);
      assert.ok(exc instanceof MvmError, `${cases[i][1]}: ${String(exc)}`);
      assert.deepEqual([exc.wireType, exc.message, exc.details.field ?? null, exc.details.allowed ?? null],
        [want.type, want.message, want.field, want.allowed], cases[i][1]);
      assert.ok(exc.message.includes(String(want.field ?? "")), cases[i][1]);
      assert.deepEqual([listed("pools"), listed("sandboxes")], before, `${cases[i][1]} left something`);
      assert.deepEqual(children(), [], `${cases[i][1]} left its holder running`);
    }

    // Pool.create refuses what the pool itself fixes, as Python's does (a recorded pool: nothing starts)
    process.env.MVM_MODE = "record";
    try {
      const recorded = await pool("python-3.13", { size: 3 });
      assert.equal(recorded.recorded, true);
      assert.deepEqual([listed("pools"), listed("sandboxes")], before);
      const creates: [() => Promise<unknown>, string][] = [
        [() => recorded.create({ fromSnapshot: "snap" } as object), "p.create(from_snapshot='snap')"],
        [() => recorded.create({ backend: "vm" } as object), "p.create(backend='vm')"],
        [() => recorded.create({ resources: resources() } as object), "p.create(resources=mvm.resources())"],
      ];
      const refusals = pythonErrors(creates.map(([, py]) => py), { prelude: "p = mvm.pool('python-3.13', size=3)",
        env: { MVM_MODE: "record" } });
      for (let i = 0; i < creates.length; i++) {
        const exc = await thrown(creates[i][0]);
        const want = refusals[i];
        assert.ok(want && exc instanceof MvmError, creates[i][1]);
        assert.deepEqual([exc.wireType, exc.message, exc.details.field ?? null, exc.details.allowed ?? null],
          [want.type, want.message, want.field, want.allowed], creates[i][1]);
      }
      await recorded.close();
      assert.deepEqual(children(), []);
    } finally {
      delete process.env.MVM_MODE;
    }
  });
});
