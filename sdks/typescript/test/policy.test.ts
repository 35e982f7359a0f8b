/**
 * resources(), network(), secret(), durations and errors: the same validation and the
 * same messages as the Python SDK (checked against it when the repo's .venv exists).
 */

import "./helpers.js";

import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { existsSync } from "node:fs";
import { describe, test } from "node:test";

import {
  CommandTimeout, ConnectionRefused, FileNotFoundInSandbox, fromWire, InvalidArgument, InvalidNetworkPolicy,
  InvalidState, MvmError, network, NetworkInfo, NetworkPolicy, parseDuration, PortForward, PortInUse, resources,
  Resources, SandboxInfo, SandboxPaused, secret, SecretRef, TemplateNotFound, WIRE_TYPES,
  DEFAULT_MAX_OUTPUT_BYTES, DEFAULT_MAX_READ_BYTES, DURATION_HELP, HOST_ALIAS, LIMITS, NETWORK_MODES, Sandbox,
} from "@mvm/sdk";

import { PYTHON, pythonErrors, thrown } from "./helpers.js";

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
  [() => network("allow", ["*.example.com:443"]), "mvm.network('allow', ['*.example.com:443'])"],
  [() => network("allow", ["[::]:443"]), "mvm.network('allow', ['[::]:443'])"],
  [() => network({ mode: "allow", allow: ["10.0.0.0/8:80"] }), "mvm.network(mode='allow', allow=['10.0.0.0/8:80'])"],
  [() => network("allow", ["10.0.0.0/255.0.255.0:80"], { allowWildcards: true }), "mvm.network('allow', ['10.0.0.0/255.0.255.0:80'], allow_wildcards=True)"],
  [() => network("allow", ["host:+80"]), "mvm.network('allow', ['host:+80'])"],
  [() => network("allow", [5 as unknown as string]), "mvm.network('allow', [5])"],
  [() => network("allow", ["127.0.0.1:11434"]), "mvm.network('allow', ['127.0.0.1:11434'])"],
  [() => network("allow", ["localhost.:5432"]), "mvm.network('allow', ['localhost.:5432'])"],
  [() => network("allow", ["[::ffff:127.0.0.1]:80"]), "mvm.network('allow', ['[::ffff:127.0.0.1]:80'])"],
  [() => network("allow", ["127.0.0.0/8:80"], { allowWildcards: true }), "mvm.network('allow', ['127.0.0.0/8:80'], allow_wildcards=True)"],
  [() => secret("bad name"), "mvm.secret('bad name')"],
  [() => parseDuration("abc", "ttl"), "parse_duration('abc', field='ttl')"],
  [() => parseDuration(0, "ttl"), "parse_duration(0, field='ttl')"],
  [() => parseDuration(-5), "parse_duration(-5)"],
  [() => parseDuration(10 ** 12, "expires"), "parse_duration(10**12, field='expires')"],
];

describe("policy builders", () => {
  test("defaults and values", () => {
    const r = resources();
    assert.ok(r instanceof Resources);
    assert.deepEqual(r.toDict(), { cpu_cores: 1, memory_mb: 512, rootfs_size_mb: 1024, max_processes: 256 });
    assert.deepEqual(resources({ cpuCores: 0.5, memoryMb: 256 }).toDict().cpu_cores, 0.5);
    assert.deepEqual(network().toDict(), { mode: "deny", allow: [], allow_wildcards: false });
    const allow = network({ mode: "allow",
      allow: ["pypi.org:443", "1.2.3.4:80", "[fd00::1]:8080", "host.mvm.internal:8080"] });
    assert.ok(allow instanceof NetworkPolicy);
    assert.deepEqual(allow.allow, ["pypi.org:443", "1.2.3.4:80", "[fd00::1]:8080", "host.mvm.internal:8080"]);
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
    assert.equal(exc.message, "network.allow['*.example.com:443']: wildcards are refused unless allow_wildcards is true");
  });

  test("networks are read like Python's ipaddress (a netmask or a hostmask after the slash)", () => {
    for (const entry of ["10.0.0.0/8:80", "10.0.0.1/8:80", "10.0.0.0/255.0.0.0:80", "10.0.0.0/0.255.255.255:80",
      "0.0.0.0/0:443", "::/0:443", "fd00::/8:443", "10.0.0.0/0.0.0.0:80", "10.0.0.0/255.255.255.255:80"]) {
      assert.deepEqual(network("allow", [entry], { allowWildcards: true }).allow, [entry]);
    }
    for (const entry of ["10.0.0.0/255.0.255.0:80", "10.0.0.0/33:80", "::1/129:80", "a/b:80", "1.2.3.4/8/8:80"]) {
      assert.throws(() => network("allow", [entry], { allowWildcards: true }), InvalidNetworkPolicy, entry);
    }
  });

  test("durations read like Python's", () => {
    assert.equal(parseDuration("30m"), 1800);
    assert.equal(parseDuration("1h30m"), 5400);
    assert.equal(parseDuration(" 2 W "), 1209600);
    assert.equal(parseDuration("300"), 300);
    assert.equal(parseDuration(1.2), 2);
  });

  test("bad values fail with the Python SDK's error type, field and message", { skip: !existsSync(PYTHON) && "no .venv" }, async () => {
    const expected = pythonErrors(CASES.map(([, py]) => py), { prelude: "from mvm.durations import parse_duration" });
    for (let i = 0; i < CASES.length; i++) {
      const exc = await thrown(CASES[i][0]);
      assert.ok(exc instanceof MvmError, `${CASES[i][1]}: ${String(exc)}`);
      const want = expected[i];
      assert.ok(want, `${CASES[i][1]} did not fail in Python`);
      assert.equal(exc.wireType, want.type, CASES[i][1]);
      assert.equal(exc.message, want.message, CASES[i][1]);
      assert.equal((exc as InvalidArgument).field, want.field, CASES[i][1]);
      assert.deepEqual((exc as InvalidArgument).allowed, want.allowed, CASES[i][1]);
    }
  });
});

describe("constants shared with the Python SDK", () => {
  test("are Python's own values (limits, defaults, modes, the host alias, output caps, backend names)", { skip: !existsSync(PYTHON) && "no .venv" }, async () => {
    const script = `
import json, mvm
from mvm.backends import backend_names
from mvm.durations import DURATION_HELP
from mvm.protocol.requests import DEFAULT_MAX_OUTPUT_BYTES, DEFAULT_MAX_READ_BYTES
from mvm.spec import HOST_ALIAS, LIMITS, NETWORK_MODES
print(json.dumps({"limits": LIMITS, "modes": NETWORK_MODES, "host": HOST_ALIAS, "output": DEFAULT_MAX_OUTPUT_BYTES,
                  "read": DEFAULT_MAX_READ_BYTES, "resources": mvm.resources().to_json(), "durations": DURATION_HELP,
                  "backends": backend_names()}))
`;
    const done = spawnSync(PYTHON, ["-c", script], { encoding: "utf8" });
    assert.equal(done.status, 0, done.stderr);
    const python = JSON.parse(done.stdout);
    assert.deepEqual(LIMITS, python.limits);
    assert.deepEqual(NETWORK_MODES, python.modes);
    assert.equal(HOST_ALIAS, python.host);
    assert.equal(DEFAULT_MAX_OUTPUT_BYTES, python.output);
    assert.equal(DEFAULT_MAX_READ_BYTES, python.read);
    assert.deepEqual(resources().toDict(), python.resources);
    assert.equal(DURATION_HELP, python.durations);
    // the TypeScript SDK checks a recorded create's backend against its own list: the registry's
    const backend = await thrown(() => Sandbox.create("python-3.13", { backend: "docker", mode: "record" }));
    const allowed = (python.backends as string[]).map((name) => `'${name}'`).join(", ");
    assert.equal(backend.message, `backend: unknown backend 'docker' (allowed: [${allowed}])`);
  });
});

describe("typed errors", () => {
  test("every wire type of docs/protocol.md maps to a class", () => {
    for (const type of ["InvalidArgument", "FileNotFound", "NotADirectory", "IsADirectory", "FileExists",
      "DirectoryNotEmpty", "PermissionDenied", "TooLarge", "ProcessNotFound", "CommandTimeout", "SandboxPaused",
      "InvalidState", "Cancelled", "UnknownOp", "Internal", "TemplateNotFound", "SandboxNotFound", "SecretNotFound",
      "ConnectionRefused", "PortInUse", "InvalidNetworkPolicy", "ImageNotFound", "RegistryUnavailable",
      "RegistryAuthError", "ImagePlatformMismatch", "DockerfileStepFailed", "ImageError", "NameTaken", "SandboxLost"]) {
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
    const inUse = fromWire({ type: "PortInUse", message: "host_port: 127.0.0.1:8080 is already in use on the host",
      field: "host_port", allowed: "a free port, or 0 to pick one" });
    assert.ok(inUse instanceof PortInUse && inUse instanceof InvalidArgument);
    assert.equal(inUse.name, "PortInUse");
    assert.equal((inUse as PortInUse).field, "host_port");
    assert.equal((inUse as PortInUse).allowed, "a free port, or 0 to pick one");
    const refused = fromWire({ type: "ConnectionRefused", message: "nothing accepts connections on 127.0.0.1:8000",
      port: 8000, errno: 111 });
    assert.ok(refused instanceof ConnectionRefused && !(refused instanceof InvalidArgument));
    assert.equal((refused as ConnectionRefused).port, 8000);
    assert.equal((refused as ConnectionRefused).errno, 111);
    assert.deepEqual(refused.toWire(), { type: "ConnectionRefused", message: refused.message, port: 8000, errno: 111 });
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

describe("network models", () => {
  const FORWARD = { id: "fwd_0123456789ab", host: "::1", host_port: 8080, guest_port: 8000, detached: false,
    connections: 1, total_connections: 3, failed_connections: 1, bytes_in: 10, bytes_out: 20, created_at: 1.5,
    audit_id: "aud_x" };

  test("PortForward: Python's fields in camelCase, toDict in Python's spelling", async () => {
    const fwd = PortForward.fromWire(FORWARD);
    assert.deepEqual([fwd.id, fwd.host, fwd.hostPort, fwd.guestPort, fwd.detached, fwd.connections,
      fwd.totalConnections, fwd.failedConnections, fwd.bytesIn, fwd.bytesOut, fwd.auditId],
    ["fwd_0123456789ab", "::1", 8080, 8000, false, 1, 3, 1, 10, 20, "aud_x"]);
    assert.equal(fwd.address, "[::1]:8080");
    assert.ok(Object.isFrozen(fwd));
    const { created_at: _, ...expected } = FORWARD; // Python's PortForward has no created_at either
    assert.deepEqual(fwd.toDict(), expected);
    const defaults = new PortForward({ host: "127.0.0.1", hostPort: 1, guestPort: 2 });
    assert.deepEqual([defaults.id, defaults.detached, defaults.connections, defaults.auditId], [null, true, 0, null]);
    assert.equal(defaults.address, "127.0.0.1:1");
    const unbound = await thrown(() => fwd.close());
    assert.ok(unbound instanceof InvalidState);
    assert.match(unbound.message, /not bound to a sandbox/);
  });

  test("PortForward.close asks its sandbox; already closed or sandbox gone is a no-op", async () => {
    const closed: unknown[] = [];
    let failure: Error | null = null;
    const owner = { ports: { close: async (f: unknown) => { closed.push(f); if (failure) throw failure; } } };
    const fwd = PortForward.fromWire(FORWARD, owner);
    await fwd.close();
    assert.deepEqual(closed, [fwd]);
    for (const exc of [InvalidArgument.create("port", "no forward matches"), new InvalidState("destroyed"),
      fromWire({ type: "SandboxError", message: "gone" }), fromWire({ type: "SandboxNotFound", message: "gone" })]) {
      failure = exc;
      await fwd.close();
    }
    failure = fromWire({ type: "Internal", message: "bug" });
    assert.equal((await thrown(() => fwd.close())).message, "bug");
    failure = null;
    {
      await using _scoped = fwd;
    }
    assert.equal(closed.length, 7);
  });

  test("NetworkInfo: a NetworkPolicy plus forwards and egress; toDict is what the supervisor sent", () => {
    const raw = { mode: "allow", allow: ["pypi.org:443"], allow_wildcards: false, forwards: [FORWARD],
      relay: "supervisor-splice", egress: { proxy: "http://127.0.0.1:3128", ready: true, allowed: 2, refused: 1 } };
    const info = NetworkInfo.fromWire(raw);
    assert.ok(info instanceof NetworkPolicy && Object.isFrozen(info));
    assert.equal(info.mode, "allow");
    assert.deepEqual(info.allow, ["pypi.org:443"]);
    assert.equal(info.forwards[0].hostPort, 8080);
    assert.deepEqual(info.egress, { proxy: "http://127.0.0.1:3128", ready: true, allowed: 2, refused: 1 });
    assert.deepEqual(info.toDict(), raw);
    const bare = NetworkInfo.fromWire({ mode: "deny", allow: [], allow_wildcards: false });
    assert.equal(info.relay, "supervisor-splice");
    assert.deepEqual([bare.forwards, bare.egress, bare.relay], [[], null, null]);
    assert.deepEqual(bare.toDict(), { mode: "deny", allow: [], allow_wildcards: false });
    const sandbox = SandboxInfo.fromWire({ id: "sb-1", name: "n", template: "t", network: raw });
    assert.ok(sandbox.network instanceof NetworkInfo);
    assert.deepEqual(sandbox.toDict().network, raw);
    assert.ok(Object.isFrozen(network()) && network() instanceof NetworkPolicy);
  });
});
