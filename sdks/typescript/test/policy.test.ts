/**
 * resources(), network(), secret(), durations and errors: the same validation and the
 * same messages as the Python SDK (checked against it when the repo's .venv exists).
 */

import "./helpers.js";

import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { existsSync } from "node:fs";
import { join } from "node:path";
import { describe, test } from "node:test";

import {
  CommandTimeout, FileNotFoundInSandbox, fromWire, InvalidArgument, InvalidNetworkPolicy, InvalidState, MvmError,
  network, NetworkPolicy, parseDuration, resources, Resources, SandboxPaused, secret, SecretRef, TemplateNotFound,
  WIRE_TYPES,
} from "@mvm/sdk";

import { REPO, thrown } from "./helpers.js";

const PYTHON = join(REPO, ".venv", "bin", "python");

/** Each case: the TypeScript call, and the same call in Python. */
const CASES: [() => unknown, string][] = [
  [() => resources({ memoryMb: 10 }), "mvm.resources(memory_mb=10)"],
  [() => resources({ cpuCores: "x" as unknown as number }), "mvm.resources(cpu_cores='x')"],
  [() => resources({ cpuCores: 100 }), "mvm.resources(cpu_cores=100)"],
  [() => resources({ memoryMb: 512.5 }), "mvm.resources(memory_mb=512.5)"],
  [() => resources({ maxProcesses: true as unknown as number }), "mvm.resources(max_processes=True)"],
  [() => resources({ rootfs_size_mb: 10 }), "mvm.resources(rootfs_size_mb=10)"],
  [() => network({ mode: "bogus" as "deny" }), "mvm.network(mode='bogus')"],
  [() => network({ mode: "allow" }), "mvm.network(mode='allow')"],
  [() => network({ mode: "deny", allow: ["pypi.org:443"] }), "mvm.network(mode='deny', allow=['pypi.org:443'])"],
  [() => network({ mode: "allow", allow: "pypi.org:443" as unknown as string[] }), "mvm.network(mode='allow', allow='pypi.org:443')"],
  [() => network("allow", ["pypi.org"]), "mvm.network('allow', ['pypi.org'])"],
  [() => network("allow", ["pypi.org:99999"]), "mvm.network('allow', ['pypi.org:99999'])"],
  [() => network("allow", ["bad_host!:80"]), "mvm.network('allow', ['bad_host!:80'])"],
  [() => network("allow", ["10.0.0.0/33:80"], { allowWildcards: true }), "mvm.network('allow', ['10.0.0.0/33:80'], allow_wildcards=True)"],
  [() => secret("bad name"), "mvm.secret('bad name')"],
  [() => parseDuration("abc", "ttl"), "parse_duration('abc', field='ttl')"],
  [() => parseDuration(0, "ttl"), "parse_duration(0, field='ttl')"],
  [() => parseDuration(-5), "parse_duration(-5)"],
  [() => parseDuration(10 ** 12, "expires"), "parse_duration(10**12, field='expires')"],
];

function pythonMessages(): { type: string; message: string; field: unknown; allowed: unknown }[] {
  const script = `
import json, mvm
from mvm.durations import parse_duration
out = []
for source in json.loads(input()):
    try:
        eval(source)
        out.append({"type": None, "message": None, "field": None, "allowed": None})
    except mvm.MvmError as exc:
        out.append({"type": exc.wire_type, "message": exc.message, "field": getattr(exc, "field", None),
                    "allowed": getattr(exc, "allowed", None)})
print(json.dumps(out))
`;
  const done = spawnSync(PYTHON, ["-c", script], { input: JSON.stringify(CASES.map(([, py]) => py)) + "\n", encoding: "utf8" });
  assert.equal(done.status, 0, done.stderr);
  return JSON.parse(done.stdout);
}

describe("policy builders", () => {
  test("defaults and values", () => {
    const r = resources();
    assert.ok(r instanceof Resources);
    assert.deepEqual(r.toDict(), { cpu_cores: 1, memory_mb: 512, rootfs_size_mb: 1024, max_processes: 256 });
    assert.deepEqual(resources({ cpuCores: 0.5, memoryMb: 256 }).toDict().cpu_cores, 0.5);
    assert.deepEqual(network().toDict(), { mode: "deny", allow: [], allow_wildcards: false });
    const allow = network({ mode: "allow", allow: ["pypi.org:443", "1.2.3.4:80", "[::1]:8080"] });
    assert.ok(allow instanceof NetworkPolicy);
    assert.deepEqual(allow.allow, ["pypi.org:443", "1.2.3.4:80", "[::1]:8080"]);
    assert.equal(network("allow", ["*.example.com:443"], { allowWildcards: true }).allowWildcards, true);
    assert.equal(network({ mode: "open" }).mode, "open");
    const ref = secret("api-key");
    assert.ok(ref instanceof SecretRef);
    assert.equal(ref.name, "api-key");
    assert.equal(String(ref), "<secret api-key>");
    assert.deepEqual(JSON.parse(JSON.stringify({ k: ref })), { k: { secret: "api-key" } });
  });

  test("wildcards are refused unless asked for", async () => {
    const exc = await thrown(() => network("allow", ["*.example.com:443"]));
    assert.ok(exc instanceof InvalidNetworkPolicy && exc instanceof InvalidArgument);
    assert.equal((exc as InvalidArgument).field, "network.allow['*.example.com:443']");
    assert.match(exc.message, /wildcards are refused unless allowWildcards is true/);
  });

  test("durations read like Python's", () => {
    assert.equal(parseDuration("30m"), 1800);
    assert.equal(parseDuration("1h30m"), 5400);
    assert.equal(parseDuration(" 2 W "), 1209600);
    assert.equal(parseDuration("300"), 300);
    assert.equal(parseDuration(1.2), 2);
  });

  test("bad values fail with the Python SDK's error type, field and message", { skip: !existsSync(PYTHON) && "no .venv" }, async () => {
    const expected = pythonMessages();
    for (let i = 0; i < CASES.length; i++) {
      const exc = await thrown(CASES[i][0]);
      assert.ok(exc instanceof MvmError, `${CASES[i][1]}: ${String(exc)}`);
      const want = expected[i];
      assert.equal(exc.wireType, want.type, CASES[i][1]);
      assert.equal(exc.message, want.message, CASES[i][1]);
      assert.equal((exc as InvalidArgument).field, want.field, CASES[i][1]);
      assert.deepEqual((exc as InvalidArgument).allowed, want.allowed, CASES[i][1]);
    }
  });
});

describe("typed errors", () => {
  test("every wire type of docs/protocol.md maps to a class", () => {
    for (const type of ["InvalidArgument", "FileNotFound", "NotADirectory", "IsADirectory", "FileExists",
      "DirectoryNotEmpty", "PermissionDenied", "TooLarge", "ProcessNotFound", "CommandTimeout", "SandboxPaused",
      "InvalidState", "Cancelled", "UnknownOp", "Internal", "TemplateNotFound", "SandboxNotFound", "SecretNotFound"]) {
      assert.ok(type in WIRE_TYPES, type);
      assert.equal(fromWire({ type, message: "m" }).wireType, type);
    }
  });

  test("fromWire rebuilds classes with their details", () => {
    const missing = fromWire({ type: "FileNotFound", message: "/x: no such file", path: "/x", errno: 2 });
    assert.ok(missing instanceof FileNotFoundInSandbox);
    assert.equal(missing.name, "FileNotFoundInSandbox");
    assert.equal((missing as FileNotFoundInSandbox).path, "/x");
    assert.equal(missing.detail("errno"), 2);
    const paused = fromWire({ type: "SandboxPaused", message: "paused", state: "paused" });
    assert.ok(paused instanceof SandboxPaused && paused instanceof InvalidState);
    assert.equal((paused as InvalidState).state, "paused");
    const template = fromWire({ type: "TemplateNotFound", message: "no", name: "python-3.12", available: ["python-3.13"] });
    assert.ok(template instanceof TemplateNotFound);
    assert.equal((template as TemplateNotFound).template, "python-3.12");
    assert.deepEqual((template as TemplateNotFound).available, ["python-3.13"]);
    const timeout = fromWire({ type: "CommandTimeout", message: "late", pid: 3, audit_id: "aud_1", timeout_seconds: 2 });
    assert.ok(timeout instanceof CommandTimeout);
    assert.equal((timeout as CommandTimeout).pid, 3);
    assert.equal(timeout.auditId, "aud_1");
    assert.equal((timeout as CommandTimeout).stdout, "");
    const unknown = fromWire({ type: "SomethingNew", message: "?" });
    assert.equal(unknown.constructor, MvmError);
    assert.equal(unknown.wireType, "SomethingNew");
    assert.deepEqual(unknown.toWire(), { type: "SomethingNew", message: "?" });
  });

  test("InvalidArgument.create composes the Python message", () => {
    const exc = InvalidArgument.create("network.mode", "unknown mode 'x'", ["deny", "allow", "open"]);
    assert.equal(exc.message, "network.mode: unknown mode 'x' (allowed: ['deny', 'allow', 'open'])");
    assert.deepEqual(exc.toWire(), { type: "InvalidArgument", message: exc.message, field: "network.mode",
      allowed: ["deny", "allow", "open"] });
  });
});
