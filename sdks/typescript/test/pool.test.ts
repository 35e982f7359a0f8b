/**
 * Warm pools from TypeScript: a pool made with `mvmctl pool up` serves a `Sandbox.create`
 * that asks for exactly its config (the create claims a pre-started member: `describe().pool`
 * names the pool), `pools()` shows it, and a create asking for something else starts its own.
 */

import { cleanup, REPO } from "./helpers.js";

import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { join } from "node:path";
import { after, describe, test } from "node:test";

import { PoolInfo, pools, resources, Sandbox } from "@mvm/sdk";

const MVMCTL = process.env.MVMCTL || join(REPO, ".venv", "bin", "mvmctl");

function mvmctl(...args: string[]): Record<string, unknown> {
  const done = spawnSync(MVMCTL, args, { encoding: "utf8", env: process.env });
  assert.equal(done.status, 0, `mvmctl ${args.join(" ")}: ${done.stderr}`);
  return JSON.parse(done.stdout) as Record<string, unknown>;
}

after(async () => {
  for (const info of await pools()) mvmctl("pool", "down", info.id, "--json");
  await cleanup();
});

describe("warm pools", () => {
  test("a create asking for what a pool serves claims its member; describe() and pools() say so", async () => {
    // 320 MiB: no other create of this file asks for it
    const made = mvmctl("pool", "up", "--size", "1", "--ttl", "5m", "--memory", "320", "--json");
    const listed = await pools();
    assert.equal(listed.length, 1);
    assert.ok(listed[0] instanceof PoolInfo);
    assert.equal(listed[0].id, made.id);
    assert.deepEqual(listed[0].ready, made.ready);
    assert.equal(listed[0].resources.memoryMb, 320);
    assert.equal(listed[0].refilling, false);

    const other = await Sandbox.create("python-3.13", { ttl: "5m", name: "ts-not-pooled" });
    assert.equal((await other.describe()).pool, null); // 512 MiB: not what the pool serves
    await other.kill();

    await using sb = await Sandbox.create("python-3.13", { ttl: "5m", name: "ts-pooled", env: { MODE: "warm" },
      resources: resources({ memoryMb: 320 }) });
    assert.ok((made.ready as string[]).includes(sb.id));
    const info = await sb.describe();
    assert.equal(info.name, "ts-pooled");
    assert.equal(info.state, "running");
    assert.equal(info.pool?.id, made.id);
    assert.equal(typeof info.pool?.claimedAt, "number");
    assert.match(info.pool?.prestartAuditId ?? "", /^aud_/);
    assert.equal((await sb.commands.run(["sh", "-c", "echo $MODE"])).stdout, "warm\n");
    // handed out once; nothing refills a CLI pool, so with its last member claimed it is gone
    assert.deepEqual(await pools(), []);
    assert.deepEqual((await Sandbox.list()).map((s) => s.id), [sb.id]); // claimed: an ordinary sandbox now
  });
});
