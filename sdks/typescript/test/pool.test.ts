/**
 * Warm pools from TypeScript: a pool made with `mvmctl pool up` serves a `Sandbox.create`
 * that asks for exactly its config (the create claims a pre-started member: `describe().pool`
 * names the pool), `pools()` shows it, and a create asking for something else starts its own.
 */

import { cleanup, HOME, REPO, thrown } from "./helpers.js";

import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, describe, test } from "node:test";

import { NameTaken, PoolInfo, pools, resources, Sandbox, secret } from "@mvm/sdk";

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
  test("a create finds the pool itself: the member is claimed over its socket (no mvmctl), with everything asked", async () => {
    const made = mvmctl("pool", "up", "--size", "2", "--ttl", "5m", "--memory", "288", "--json");
    const include = mkdtempSync(join(tmpdir(), "mvmts-include-"));
    writeFileSync(join(include, "data.txt"), "included\n");
    process.env.MVM_SECRET_POOL_TOKEN = "s3cr3t-pool-token";
    const saved = { mvmctl: process.env.MVMCTL, base: process.env.MVM_INCLUDE_BASE };
    process.env.MVMCTL = "/nonexistent/mvmctl"; // a create that spawned `mvmctl up` would fail
    process.env.MVM_INCLUDE_BASE = include;
    const principal = { client: "agent-7" };
    const shape = resources({ memoryMb: 288 });
    try {
      await using sb = await Sandbox.create("python-3.13", { ttl: "7m", name: "ts-native", workloadId: "job-1",
        env: { MODE: "pooled", TOKEN: secret("pool-token") }, tags: { team: "a" }, onBehalfOf: principal,
        include: ["data.txt"], resources: shape });
      assert.ok((made.ready as string[]).includes(sb.id));
      const info = await sb.describe();
      assert.deepEqual([info.name, info.state, info.workloadId, info.pool?.id], ["ts-native", "running", "job-1", made.id]);
      assert.ok(info.expiresAt !== null && Math.abs(info.expiresAt - (info.pool?.claimedAt as number) - 420) < 5);
      assert.deepEqual([info.details.env_keys, info.details.secret_env_keys], [["MODE"], ["TOKEN"]]);
      assert.deepEqual((await Sandbox.list()).find((s) => s.id === sb.id)?.details.tags, { team: "a" });
      assert.equal((await sb.commands.run(["sh", "-c", "echo $MODE $TOKEN"])).stdout, "pooled [redacted:pool-token]\n");
      assert.equal(await sb.files.readText("/app/data.txt"), "included\n");
      assert.equal((await Sandbox.connect("ts-native")).id, sb.id); // the name went to the member ...
      assert.equal(readFileSync(join(HOME, "names", "ts-native"), "utf8"), sb.id);
      assert.ok(!existsSync(join(HOME, "names", sb.id))); // ... and its waiting name (its id) was freed
      const entries = readFileSync(join(HOME, "audit", `${sb.id}.jsonl`), "utf8").trim().split("\n")
        .map((line) => JSON.parse(line) as { op: string; actor: Record<string, unknown>; details: Record<string, unknown> });
      assert.deepEqual(entries.slice(0, 2).map((e) => e.op), ["sandbox.prestart", "sandbox.create"]);
      assert.equal(entries[1].details.pool, made.id);
      assert.equal(entries[1].actor.pid, process.pid); // claimed by this process ...
      assert.deepEqual(entries[1].actor.on_behalf_of, principal); // ... acting for its client

      // a name already taken: NameTaken (from mvmctl up, in Python's words), and no member consumed
      process.env.MVMCTL = saved.mvmctl ?? join(REPO, ".venv", "bin", "mvmctl");
      const [waiting] = (await pools()).map((p) => p.ready);
      assert.equal(waiting.length, 1);
      const taken = await thrown(() => Sandbox.create("python-3.13", { ttl: "5m", name: "ts-native", resources: shape }));
      assert.ok(taken instanceof NameTaken, String(taken));
      assert.equal((taken as NameTaken).sandboxId, sb.id);
      assert.deepEqual((await pools()).map((p) => p.ready), [waiting]);

      // no name: the member's name is derived from the workload id and its own id
      process.env.MVMCTL = "/nonexistent/mvmctl";
      await using derived = await Sandbox.create("python-3.13", { ttl: "5m", workloadId: "Job Two", resources: shape });
      assert.equal(derived.id, waiting[0]);
      assert.equal(derived.name, `job-two-${derived.id.slice(3, 9)}`);
      assert.equal((await Sandbox.connect(derived.name)).id, derived.id);
      assert.deepEqual(await pools(), []); // its last member claimed, a pool nobody refills is gone
    } finally {
      for (const [key, value] of [["MVMCTL", saved.mvmctl], ["MVM_INCLUDE_BASE", saved.base]] as const) {
        if (value === undefined) delete process.env[key];
        else process.env[key] = value;
      }
      delete process.env.MVM_SECRET_POOL_TOKEN;
      rmSync(include, { recursive: true, force: true });
    }
  });
  test("a pool made from another build of the template serves nobody: its member is left waiting", async () => {
    // 352 MiB: no other create of this file asks for it
    const made = mvmctl("pool", "up", "--size", "1", "--ttl", "5m", "--memory", "352", "--json");
    const file = join(HOME, "pools", made.id as string, "pool.json");
    const record = JSON.parse(readFileSync(file, "utf8")) as { serves: { template_digest: string } };
    assert.match(record.serves.template_digest, /^[0-9a-f]{64}$/); // the build it was made with, as mvmctl up has it
    record.serves.template_digest = "0".repeat(64); // as if the template was rebuilt since (an mvm upgrade)
    writeFileSync(file, JSON.stringify(record));
    await using sb = await Sandbox.create("python-3.13", { ttl: "5m", resources: resources({ memoryMb: 352 }) });
    assert.equal((await sb.describe()).pool, null); // started through mvmctl up, as Python's create would
    assert.deepEqual((await pools()).map((p) => p.ready), [made.ready]); // the stale member was not taken
    mvmctl("pool", "down", made.id as string, "--json");
  });
});
