/**
 * The live surface against a real sandbox (namespace backend): commands, processes,
 * files, logs, describe/list/connect, typed errors. One sandbox is shared by these
 * read-mostly tests; lifecycle tests (lifecycle.test.ts) make their own.
 */

import { cleanup, collect, thrown } from "./helpers.js";

import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { readFileSync } from "node:fs";
import { after, before, describe, test } from "node:test";

import {
  CommandError, CommandResult, CommandTimeout, DirectoryNotEmpty, FileEntry, FileNotFoundInSandbox, InvalidArgument,
  IsADirectory, LogEvent, PermissionDenied, Process, ProcessInfo, ProcessNotFound, resources, Sandbox, SandboxError,
  SandboxInfo, SandboxNotFound, secret, StreamIdle, TemplateNotFound, TooLarge, UserNotFound,
} from "@mvm/sdk";

let sb: Sandbox;

before(async () => {
  sb = await Sandbox.create("python-3.13", { ttl: "10m", name: "ts-shared", workloadId: "ts-sdk-tests",
    resources: resources({ cpuCores: 1, memoryMb: 512 }) });
});

after(async () => {
  await sb?.kill();
  await cleanup();
});

describe("a live sandbox", () => {
  test("describe: identity, state, limits, policy, isolation", async () => {
    const info = await sb.describe();
    assert.ok(info instanceof SandboxInfo);
    assert.equal(info.id, sb.id);
    assert.equal(info.name, "ts-shared");
    assert.equal(sb.name, "ts-shared");
    assert.match(sb.id, /^sb-[0-9a-f]{10}$/);
    assert.equal(info.state, "running");
    assert.equal(await sb.state(), "running");
    assert.equal(info.template, "python-3.13");
    assert.equal(info.backend, "namespace");
    assert.equal(info.isolation, "namespace");
    assert.equal(info.workloadId, "ts-sdk-tests");
    assert.deepEqual(info.resources.toDict(), { cpu_cores: 1, memory_mb: 512, rootfs_size_mb: 1024, max_processes: 256 });
    assert.equal(info.network.mode, "deny");
    assert.ok(info.expiresAt !== null && info.expiresAt - info.createdAt === 600);
    assert.equal(info.toDict().workload_id, "ts-sdk-tests");
  });

  test("commands.run returns a typed result with an audit id and a receipt", async () => {
    const result = await sb.commands.run(["python", "-c", "import sys; print(6*7); print('warn', file=sys.stderr)"],
      { timeoutSeconds: 30 });
    assert.ok(result instanceof CommandResult);
    assert.equal(result.exitCode, 0);
    assert.equal(result.ok, true);
    assert.equal(result.stdout, "42\n");
    assert.equal(result.stderr, "warn\n");
    assert.match(String(result.auditId), /^aud_/);
    assert.ok(result.durationSeconds > 0);
    assert.equal(result.stdoutBytes, 3);
    assert.equal(result.truncated, false);
    assert.equal(result.recorded, false);
    assert.equal(typeof result.pid, "number");
    assert.equal(typeof result.receiptPath, "string");
    assert.equal(result.toDict().exit_code, 0);
  });

  test("a non-zero exit is a result; check: true throws CommandError carrying it", async () => {
    const result = await sb.commands.run("echo oops >&2; exit 3");
    assert.equal(result.exitCode, 3);
    assert.equal(result.ok, false);
    const exc = await thrown(() => sb.commands.run(["sh", "-c", "echo bad >&2; exit 4"], { check: true }));
    assert.ok(exc instanceof CommandError);
    assert.match(exc.message, /exited with 4: bad/);
    assert.equal(((exc as CommandError).result as CommandResult).exitCode, 4);
  });

  test("env, cwd, stdin and streaming callbacks", async () => {
    const seen: string[] = [];
    const result = await sb.commands.run(["sh", "-c", "pwd; echo $MODE; cat; echo err >&2"], {
      env: { MODE: "dev" }, cwd: "/tmp", stdin: Buffer.from("from stdin\n"),
      onStdout: (text) => seen.push(`out:${text}`), onStderr: (text) => seen.push(`err:${text}`),
    });
    assert.equal(result.stdout, "/tmp\ndev\nfrom stdin\n");
    assert.equal(seen.filter((s) => s.startsWith("out:")).map((s) => s.slice(4)).join(""), result.stdout);
    assert.ok(seen.includes("err:err\n"));
  });

  test("user, relative cwd, binary stdin larger than a frame, exit 143", async () => {
    const who = await sb.commands.run(["sh", "-c", "id -un; pwd"], { user: "nobody", cwd: "tmp" });
    assert.equal(who.stdout, "nobody\n/tmp\n");
    const unknown = await thrown(() => sb.commands.run(["id"], { user: "no-such-account" }));
    assert.ok(unknown instanceof UserNotFound && unknown instanceof InvalidArgument);
    assert.equal((unknown as UserNotFound).field, "user");
    assert.match(unknown.message, /no-such-account/);
    const big = Buffer.alloc(3 * 1024 * 1024 + 7, 0);
    big.write("head\0bytes");
    const counted = await sb.commands.run(["wc", "-c"], { stdin: big, timeoutSeconds: 120 });
    assert.equal(counted.stdout.trim(), String(big.length));
    assert.deepEqual(await sb.files.list("/tmp/.mvm-stdin"), []);
    const term = await sb.commands.run(["sh", "-c", "kill -TERM $$"]);
    assert.equal(term.exitCode, 143);
  });

  test("files as a guest user: its permissions and ownership, the same user checks; root by default", async () => {
    await sb.files.write("/tmp/ts-root-only", "root's", { mode: 0o600 });
    const denied = await thrown(() => sb.files.read("/tmp/ts-root-only", { user: "nobody" }));
    assert.ok(denied instanceof PermissionDenied);
    assert.equal((denied as PermissionDenied).path, "/tmp/ts-root-only");
    assert.equal(await sb.files.readText("/tmp/ts-root-only"), "root's");
    await sb.files.write("/tmp/ts-nobody/made.txt", "mine", { user: "nobody" });
    assert.equal(await sb.files.readText("/tmp/ts-nobody/made.txt", { user: "nobody" }), "mine");
    const owner = await sb.commands.run(["stat", "-c", "%U", "/tmp/ts-nobody", "/tmp/ts-nobody/made.txt"]);
    assert.equal(owner.stdout, "nobody\nnobody\n");
    const unknown = await thrown(() => sb.files.stat("/tmp", { user: "no-such-account" }));
    assert.ok(unknown instanceof UserNotFound);
    assert.match(unknown.message, /no-such-account/);
    const empty = await thrown(() => sb.files.list("/tmp", { user: "" }));
    assert.ok(empty instanceof InvalidArgument);
    assert.equal(empty.message, "user: '' is not a user name (allowed: a guest user name or uid)");
    await sb.files.remove("/tmp/ts-nobody", { recursive: true, user: "nobody" });
    assert.equal(await sb.files.exists("/tmp/ts-nobody"), false);
  });

  test("output capture is capped per stream and says so", async () => {
    const result = await sb.commands.run(["python", "-c", "print('x' * 10000)"], { maxOutputBytes: 100 });
    assert.equal(result.truncated, true);
    assert.equal(result.stdout.length, 100);
    assert.equal(result.stdoutBytes, 10001);
  });

  test("a timeout kills the process group; CommandTimeout carries the partial output", async () => {
    const exc = await thrown(() => sb.commands.run("echo partial; sleep 30", { timeoutSeconds: 1 }));
    assert.ok(exc instanceof CommandTimeout);
    assert.equal((exc as CommandTimeout).stdout, "partial\n");
    assert.equal((exc as CommandTimeout).timeoutSeconds, 1);
    assert.match(String(exc.auditId), /^aud_/);
    // the timeout killed the group, not only waited: no `sleep 30` is left in the sandbox
    const listProcesses = "import os\nfor pid in filter(str.isdigit, os.listdir('/proc')):\n"
      + "    try: print(open(f'/proc/{pid}/cmdline').read().replace('\\0', ' '))\n    except OSError: pass\n";
    const left = await sb.commands.run(["python", "-c", listProcesses]);
    assert.ok(left.stdout.includes("python -c"), left.stdout); // the listing works
    assert.ok(!left.stdout.includes("sleep 30"), left.stdout);
  });

  test("secret references resolve on the host and are redacted from the output", async () => {
    process.env.MVM_SECRET_TS_TOKEN = "ts-canary-0123456789";
    try {
      const result = await sb.commands.run(["sh", "-c", "echo token=$TOKEN"], { env: { TOKEN: secret("ts-token") } });
      assert.equal(result.stdout, "token=[redacted:ts-token]\n");
      const raw = await sb.commands.run(["sh", "-c", "echo $TOKEN | rev"], { env: { TOKEN: secret("ts-token") }, redact: false });
      assert.equal(raw.stdout, "9876543210-yranac-st\n");
      const missing = await thrown(() => sb.commands.run(["true"], { env: { X: secret("not-set-anywhere") } }));
      assert.equal(missing.name, "SecretNotFound");
      assert.match(missing.message, /MVM_SECRET_NOT_SET_ANYWHERE/);
    } finally {
      delete process.env.MVM_SECRET_TS_TOKEN;
    }
  });

  test("commands.start: pid, wait, exitCode, info, list, connect", async () => {
    const proc = await sb.commands.start(["sh", "-c", "sleep 0.3; echo done; exit 5"]);
    assert.ok(proc instanceof Process);
    assert.equal(typeof proc.pid, "number");
    assert.match(String(proc.auditId), /^aud_/);
    assert.equal(await proc.isRunning(), true);
    const listed = await sb.commands.list();
    assert.ok(listed.every((p) => p instanceof ProcessInfo));
    assert.ok(listed.some((p) => p.pid === proc.pid && p.running));
    const again = await sb.commands.connect(proc.pid as number);
    assert.deepEqual(again.argv, ["sh", "-c", "sleep 0.3; echo done; exit 5"]);
    assert.equal(await again.wait(10), 5);
    assert.equal(await proc.exitCode(), 5);
    assert.equal((await proc.info()).running, false);
    assert.deepEqual(await collect(proc.stdout()), ["done\n"]);
  });

  test("process output as an async iterator, stdin, kill", async () => {
    const cat = await sb.commands.start(["cat"], { stdin: true });
    await cat.sendStdin("line 1\n");
    await cat.sendStdin(Buffer.from("line 2\n"));
    await cat.closeStdin();
    assert.equal(await cat.wait(10), 0);
    const chunks = await collect(cat);
    assert.equal(chunks.map((c) => c.text).join(""), "line 1\nline 2\n");
    assert.ok(chunks.every((c) => c.stream === "stdout"));

    const sleeper = await sb.commands.start("sleep 60");
    const waited = await thrown(() => sleeper.wait(0.5));
    assert.ok(waited instanceof CommandTimeout);
    await sleeper.kill();
    assert.equal(await sleeper.wait(10), 137);
    assert.ok((await thrown(() => sleeper.signal("SIGBOGUS"))) instanceof InvalidArgument);
    assert.ok((await thrown(() => sb.commands.connect(999999))) instanceof ProcessNotFound);
  });

  test("a stalled reader holds the process, not memory; the sandbox answers meanwhile; then every byte, in order", async () => {
    // Python: tests/supervisor/test_stream_backpressure.py (the same flood, the same bounds)
    const floodMib = 256;
    const rssBound = 64 * 1024 * 1024;
    const block = (i: number) => (`${String(i).padStart(15, "0")} `.repeat(64).slice(0, 1023) + "\n").repeat(1024);
    const flood = [
      "import os, sys",
      "out = sys.stdout.buffer",
      "open('/tmp/written', 'w').write('0')",
      "out.write(b'ready\\n'); out.flush()",
      "sys.stdin.readline()",
      `for i in range(${floodMib}):`,
      "    out.write(((f'{i:015d} ' * 64)[:1023] + '\\n').encode() * 1024); out.flush()",
      "    open('/tmp/written.new', 'w').write(str(i + 1)); os.replace('/tmp/written.new', '/tmp/written')",
    ].join("\n");
    const rss = (pid: number) => Number(/VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${pid}/status`, "utf8"))![1]) * 1024;
    const supervisor = Number((await sb.describe()).details.supervisor_pid);
    const proc = await sb.commands.start(["python3", "-c", flood], { stdin: true });
    const chunks = proc.output()[Symbol.asyncIterator]();
    assert.deepEqual((await chunks.next()).value, { stream: "stdout", text: "ready\n" }); // attached: let it go
    const before = [process.memoryUsage().rss, rss(supervisor)];
    await proc.sendStdin("go\n");
    // until the flooder stopped making progress for 1.5 s (blocked on its full pipe), reading nothing
    const written = async () => Number(await sb.files.readText("/tmp/written"));
    let last = -1;
    let since = Date.now();
    for (const deadline = Date.now() + 120_000; ; await new Promise((r) => setTimeout(r, 50))) {
      const now = await written();
      if (now !== last) [last, since] = [now, Date.now()];
      else if (now > 0 && Date.now() - since >= 1500) break;
      assert.ok(Date.now() < deadline, `the flooder never blocked (at ${now} MiB)`);
    }
    assert.ok(last < floodMib / 4, `the flooder wrote ${last} MiB with nobody reading`);
    const grown = [process.memoryUsage().rss - before[0], rss(supervisor) - before[1]];
    assert.ok(grown.every((g) => g < rssBound), `RSS grew by ${grown} bytes (client, supervisor)`);
    assert.equal((await sb.commands.run(["echo", "meanwhile"])).stdout, "meanwhile\n");
    assert.equal(await written(), last); // still held
    const digest = createHash("sha256");
    const expected = createHash("sha256");
    let received = 0;
    for (let item = await chunks.next(); !item.done; item = await chunks.next()) {
      assert.equal(item.value.stream, "stdout");
      digest.update(item.value.text);
      received += item.value.text.length;
    }
    for (let i = 0; i < floodMib; i++) expected.update(block(i));
    assert.equal(received, floodMib * 1024 * 1024);
    assert.equal(digest.digest("hex"), expected.digest("hex")); // every byte, in order
    assert.equal(await proc.wait(60), 0);
  });

  test("a silent stream throws StreamIdle past idleTimeout and leaves the process running", async () => {
    const proc = await sb.commands.start(["sh", "-c", "echo ready; exec sleep 300"]);
    const seen: string[] = [];
    const idle = await thrown(async () => {
      for await (const { stream, text } of proc.output({ idleTimeout: 1 })) {
        assert.equal(stream, "stdout");
        seen.push(text);
      }
    });
    assert.ok(idle instanceof StreamIdle && idle instanceof SandboxError, String(idle));
    assert.equal(idle.message, "proc.attach: nothing from the sandbox for 1 s");
    assert.equal((idle as StreamIdle).idleTimeout, 1);
    assert.deepEqual(seen, ["ready\n"]);
    assert.equal(await proc.isRunning(), true); // a reader's timeout leaves the process alone
    assert.ok((await thrown(() => collect(proc.lines("stdout", { idleTimeout: 0.5 })))) instanceof StreamIdle);
    assert.ok((await thrown(() => collect(sb.logs({ follow: true, since: 1e12, idleTimeout: 0.5 })))) instanceof StreamIdle);
    // the handle's connection is still good for the next call, and lines() without a timeout end at the exit
    await proc.kill();
    assert.equal(await proc.wait(10), 137);
    assert.deepEqual(await collect(proc.lines("stdout", { idleTimeout: 30 })), ["ready\n"]);
  });

  test("files: write, read, stat, list, exists, mkdir, move, remove", async () => {
    const entry = await sb.files.write("/work/in/data.json", "{\"a\": 1}");
    assert.ok(entry instanceof FileEntry);
    assert.deepEqual([entry.name, entry.path, entry.type, entry.size, entry.mode], ["data.json", "/work/in/data.json", "file", 8, 0o644]);
    assert.equal(await sb.files.readText("/work/in/data.json"), "{\"a\": 1}");
    const bytes = Buffer.from([0, 1, 2, 255, 254]);
    await sb.files.write("/work/in/bin", bytes, { mode: 0o600 });
    assert.ok((await sb.files.read("/work/in/bin")).equals(bytes));
    assert.equal((await sb.files.stat("/work/in/bin")).mode, 0o600);
    assert.deepEqual((await sb.files.list("/work/in")).map((e) => e.name), ["bin", "data.json"]);
    assert.equal(await sb.files.exists("/work/in/bin"), true);
    assert.equal(await sb.files.exists("/work/in/nope"), false);
    await sb.files.mkdir("/work/out/deep", { parents: true });
    assert.equal((await sb.files.stat("/work/out/deep")).type, "dir");
    await sb.files.move("/work/in/bin", "/work/out/bin");
    assert.equal(await sb.files.exists("/work/in/bin"), false);
    assert.ok((await thrown(() => sb.files.remove("/work/out"))) instanceof DirectoryNotEmpty);
    await sb.files.remove("/work/out", { recursive: true });
    assert.equal(await sb.files.exists("/work/out"), false);
    const seen = await sb.commands.run(["cat", "/work/in/data.json"]);
    assert.equal(seen.stdout, "{\"a\": 1}");
  });

  test("files: a write larger than one frame is chunked and read back whole", async () => {
    const big = Buffer.alloc(700 * 1024);
    for (let i = 0; i < big.length; i++) big[i] = (i * 31) % 251;
    const entry = await sb.files.write("/work/big.bin", big);
    assert.equal(entry.size, big.length);
    assert.ok((await sb.files.read("/work/big.bin")).equals(big));
    const tooLarge = await thrown(() => sb.files.read("/work/big.bin", { maxBytes: 1000 }));
    assert.ok(tooLarge instanceof TooLarge);
    await sb.files.remove("/work/big.bin");
  });

  test("files: typed errors name the path", async () => {
    const missing = await thrown(() => sb.files.read("/no/such/file"));
    assert.ok(missing instanceof FileNotFoundInSandbox);
    assert.equal((missing as FileNotFoundInSandbox).path, "/no/such/file");
    assert.ok((await thrown(() => sb.files.read("/etc"))) instanceof IsADirectory);
    const relative = await thrown(() => sb.files.read("etc/hostname"));
    assert.ok(relative instanceof InvalidArgument);
    assert.equal((relative as InvalidArgument).field, "path");
  });

  test("logs: past events, and follow until the loop is left", async () => {
    const past = await collect(sb.logs());
    assert.ok(past.length > 3);
    assert.ok(past.every((e) => e instanceof LogEvent));
    assert.ok(past.some((e) => e.source === "supervisor" && /sandbox created/.test(e.message)));
    assert.ok(past.some((e) => e.auditId !== null));
    const tail = await collect(sb.logs({ tail: 2 }));
    assert.equal(tail.length, 2);
    const marker = `marker-${Date.now()}`;
    let following: () => void = () => undefined;
    const streaming = new Promise<void>((resolve) => (following = resolve));
    const follower = (async () => {
      for await (const event of sb.logs({ follow: true })) {
        following(); // the stream is open (its first event came): what is logged now arrives live
        if (event.message.includes(marker)) return event;
      }
      return null;
    })();
    await streaming;
    await sb.commands.run(["echo", marker]);
    const found = await follower;
    assert.ok(found !== null && found.message.includes(marker));
    assert.equal((await sb.commands.run(["true"])).exitCode, 0); // the connection is still usable
  });

  test("Sandbox.list and Sandbox.connect find it by name and id; a second handle works", async () => {
    const listed = await Sandbox.list();
    const mine = listed.find((i) => i.id === sb.id);
    assert.ok(mine);
    assert.equal(mine.name, "ts-shared");
    assert.equal(mine.isolation, "namespace");
    const byName = await Sandbox.connect("ts-shared");
    assert.equal(byName.id, sb.id);
    assert.equal((await byName.commands.run(["cat", "/work/in/data.json"])).stdout, "{\"a\": 1}");
    byName.close();
    assert.equal((await Sandbox.connect(sb.id)).name, "ts-shared");
    const exc = await thrown(() => Sandbox.connect("no-such-sandbox"));
    assert.ok(exc instanceof SandboxNotFound);
    assert.match(exc.message, /no running sandbox named 'no-such-sandbox'; running: .*ts-shared/);
  });

  test("create: bad arguments fail before anything starts; unknown templates list the buildable ones", async () => {
    const name = await thrown(() => Sandbox.create("python-3.13", { name: "Bad Name" }));
    assert.ok(name instanceof InvalidArgument);
    assert.equal((name as InvalidArgument).field, "name");
    const ttl = await thrown(() => Sandbox.create("python-3.13", { ttl: "soon" }));
    assert.equal((ttl as InvalidArgument).field, "ttl");
    for (const autoPause of ["soon", 0, -5]) {
      const idle = await thrown(() => Sandbox.create("python-3.13", { autoPause }));
      assert.ok(idle instanceof InvalidArgument);
      assert.equal((idle as InvalidArgument).field, "auto_pause");
    }
    const policy = await thrown(() => Sandbox.create("python-3.13", { resources: { cpuCores: 1 } as never }));
    assert.match(policy.message, /^resources: use resources\(\.\.\.\)/);
    const template = await thrown(() => Sandbox.create("python-3.12"));
    assert.ok(template instanceof TemplateNotFound);
    assert.equal((template as TemplateNotFound).template, "python-3.12");
    assert.ok((template as TemplateNotFound).available.includes("python-3.13"));
    assert.deepEqual((await Sandbox.list()).map((i) => i.id), [sb.id]);
  });
});
