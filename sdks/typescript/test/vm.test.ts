/** One smoke test on the microVM backend (a real QEMU guest; TCG here, KVM where it works). */

import { cleanup } from "./helpers.js";

import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { after, test } from "node:test";

import { Sandbox } from "@mvm/sdk";

after(cleanup);

function vmUsable(): string | false {
  const done = spawnSync("sh", ["-c", "command -v qemu-system-x86_64"], { encoding: "utf8" });
  return done.status === 0 ? false : "QEMU is not installed: the vm backend cannot run here";
}

test("vm backend: create, write, run, destroy", { skip: vmUsable(), timeout: 240_000 }, async () => {
  await using sb = await Sandbox.create("python-3.13", { backend: "vm", ttl: "5m" });
  const info = await sb.describe();
  assert.equal(info.backend, "vm");
  assert.equal(info.isolation, "vm");
  await sb.files.write("/app/main.py", "import platform; print('hello from', platform.system())");
  const result = await sb.commands.run(["python", "/app/main.py"], { timeoutSeconds: 120 });
  assert.equal(result.exitCode, 0);
  assert.equal(result.stdout, "hello from Linux\n");
});
