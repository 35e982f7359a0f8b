/** One smoke test on the microVM backend (a real QEMU guest; TCG here, KVM where it works). */

import { cleanup, collect, HOME, thrown } from "./helpers.js";

import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { after, test } from "node:test";

import { Sandbox, StreamIdle } from "@mvm/sdk";

after(cleanup);

function vmUsable(): string | false {
  const done = spawnSync("sh", ["-c", "command -v qemu-system-x86_64"], { encoding: "utf8" });
  return done.status === 0 ? false : "QEMU is not installed: the vm backend cannot run here";
}

test("vm backend: create, write, run, a silent stream, onBehalfOf in the audit chain, destroy",
  { skip: vmUsable(), timeout: 240_000 }, async () => {
  await using sb = await Sandbox.create("python-3.13", { backend: "vm", ttl: "5m", onBehalfOf: { client: "vm-test" } });
  const info = await sb.describe();
  assert.equal(info.backend, "vm");
  assert.equal(info.isolation, "vm");
  await sb.files.write("/app/main.py", "import platform; print('hello from', platform.system())");
  const result = await sb.commands.run(["python", "/app/main.py"], { timeoutSeconds: 120 });
  assert.equal(result.exitCode, 0);
  assert.equal(result.stdout, "hello from Linux\n");
  const proc = await sb.commands.start(["sh", "-c", "echo ready; exec sleep 300"]);
  const idle = await thrown(() => collect(proc.lines("stdout", { idleTimeout: 2 })));
  assert.ok(idle instanceof StreamIdle, String(idle));
  assert.equal(await proc.isRunning(), true);
  await proc.kill();
  const audit = readFileSync(join(HOME, "audit", `${sb.id}.jsonl`), "utf8").trim().split("\n")
    .map((line) => JSON.parse(line) as { op: string; audit_id: string; actor: { on_behalf_of?: unknown } });
  for (const id of [audit.find((e) => e.op === "sandbox.create")?.audit_id, result.auditId]) {
    assert.deepEqual(audit.find((e) => e.audit_id === id)?.actor.on_behalf_of, { client: "vm-test" });
  }
});
