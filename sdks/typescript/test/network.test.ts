/**
 * `sandbox.ports` and `sandbox.network` against real sandboxes (namespace backend):
 * a guest HTTP server fetched from Node through a forward, wildcard refusal, a port
 * in use, close/list, `detach: false`; an allow-list created through `mvmctl up` and
 * changed with `network.update`, checked against HTTP servers this file starts on the
 * host's 127.0.0.1, which the guest calls host.mvm.internal (no traffic leaves this machine). Argument checks are compared
 * with the Python SDK's messages.
 */

import { cleanup, PYTHON, pythonErrors, thrown } from "./helpers.js";

import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { createServer, request as httpRequest, type Server } from "node:http";
import { createServer as createTcpServer, type AddressInfo } from "node:net";
import { after, before, describe, test } from "node:test";

import {
  HOST_ALIAS, InvalidArgument, InvalidNetworkPolicy, MvmError, network, NetworkInfo, PortForward, PortInUse, Process, resources,
  Sandbox,
} from "@mvm/sdk";

/** Run in the guest: GET http://host.mvm.internal:PORT/probe for each port (through $HTTP_PROXY when set). */
const PROBE = `
import json, sys, urllib.error, urllib.request
out = {}
for port in sys.argv[1:]:
    try:
        out[port] = [200, urllib.request.urlopen(f"http://host.mvm.internal:{port}/probe", timeout=20).read().decode()]
    except urllib.error.HTTPError as exc:
        out[port] = [exc.code, ""]
    except Exception as exc:
        out[port] = [0, repr(exc)]
print(json.dumps(out))
`;

/** An HTTP server on the host's 127.0.0.1, recording the paths it was asked for. */
class HostHttp {
  readonly requests: string[] = [];
  private readonly server: Server;
  port = 0;

  constructor() {
    this.server = createServer((req, res) => {
      this.requests.push(String(req.url));
      res.end(`hello from ${this.port} path=${req.url}`);
    });
  }

  async start(): Promise<this> {
    await new Promise<void>((resolve) => this.server.listen(0, "127.0.0.1", resolve));
    this.port = (this.server.address() as AddressInfo).port;
    return this;
  }

  close(): void {
    this.server.closeAllConnections();
    this.server.close();
  }
}

/** GET over a fresh connection (no keep-alive pool): status and body, or the error. */
function get(port: number, path = "/"): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const req = httpRequest({ host: "127.0.0.1", port, path, agent: false, timeout: 10_000 }, (res) => {
      const chunks: Buffer[] = [];
      res.on("data", (chunk: Buffer) => chunks.push(chunk));
      res.on("end", () => resolve({ status: res.statusCode ?? 0, body: Buffer.concat(chunks).toString("utf8") }));
      res.on("error", reject);
    });
    req.on("error", reject);
    req.on("timeout", () => req.destroy(new Error("timed out")));
    req.end();
  });
}

async function eventually<T>(what: string, fn: () => Promise<T>, timeoutMs = 20_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    try {
      return await fn();
    } catch (exc) {
      if (Date.now() > deadline) throw new Error(`${what}: still failing after ${timeoutMs} ms: ${String(exc)}`);
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
  }
}

let fw: Sandbox; // mode deny: forwards need no guest network
let eg: Sandbox; // mode allow, created through mvmctl up with a CIDR entry (allowWildcards) and tags
let allowed: HostHttp;
let refused: HostHttp;

before(async () => {
  allowed = await new HostHttp().start();
  refused = await new HostHttp().start();
  [fw, eg] = await Promise.all([
    Sandbox.create("python-3.13", { ttl: "10m", name: "ts-net-fwd", resources: resources({ cpuCores: 1, memoryMb: 256 }) }),
    Sandbox.create("python-3.13", {
      ttl: "10m", name: "ts-net-egress", resources: resources({ cpuCores: 1, memoryMb: 256 }),
      network: network({ mode: "allow", allow: [`${HOST_ALIAS}:${allowed.port}`, `10.0.0.0/8:${allowed.port}`],
        allowWildcards: true }),
      tags: { team: "ts-sdk", suite: "network" },
    }),
  ]);
  await Promise.all([
    fw.files.write("/srv/www/hello.txt", "hello from the guest\n").then(() =>
      fw.commands.start(["python3", "-m", "http.server", "8000", "--bind", "127.0.0.1", "--directory", "/srv/www"])),
    eg.files.write("/srv/probe.py", PROBE),
  ]);
});

after(async () => {
  await Promise.all([fw?.kill(), eg?.kill()]);
  allowed?.close();
  refused?.close();
  await cleanup();
});

async function probe(...ports: number[]): Promise<Record<string, [number, string]>> {
  const result = await eg.commands.run(["python3", "/srv/probe.py", ...ports.map(String)], { timeoutSeconds: 60 });
  assert.equal(result.exitCode, 0, result.stderr);
  return JSON.parse(result.stdout);
}

describe("port forwards", () => {
  test("fetch a guest HTTP server from Node through a forward (mode deny)", async () => {
    let id: string | null;
    let hostPort: number;
    {
      await using fwd = await fw.ports.forward({ host: "127.0.0.1", hostPort: 0, guestPort: 8000 });
      assert.ok(fwd instanceof PortForward);
      ({ id, hostPort } = fwd);
      assert.match(String(id), /^fwd_[0-9a-f]{12}$/);
      assert.equal(fwd.host, "127.0.0.1");
      assert.ok(hostPort > 0);
      assert.equal(fwd.guestPort, 8000);
      assert.equal(fwd.detached, true);
      assert.match(String(fwd.auditId), /^aud_/);
      assert.equal(fwd.address, `127.0.0.1:${hostPort}`);
      assert.deepEqual(Object.keys(fwd.toDict()), ["host", "host_port", "guest_port", "id", "detached", "connections",
        "total_connections", "failed_connections", "bytes_in", "bytes_out", "audit_id"]);
      // the guest server may still be starting: the forward resets connections until it listens
      const response = await eventually("fetch through the forward", async () => {
        const r = await fetch(`http://${fwd.address}/hello.txt`);
        return { status: r.status, body: await r.text() };
      });
      assert.deepEqual(response, { status: 200, body: "hello from the guest\n" });
      const listed = (await fw.ports.list()).find((f) => f.id === id);
      assert.ok(listed && listed.totalConnections >= 1 && listed.hostPort === hostPort);
      const info = await fw.describe();
      assert.ok(info.network instanceof NetworkInfo);
      assert.equal(info.network.mode, "deny");
      assert.ok(info.network.forwards.some((f) => f.id === id && f.guestPort === 8000));
      assert.ok((info.network.toDict().forwards as unknown[]).length >= 1);
    } // await using: closed here
    assert.ok(!(await fw.ports.list()).some((f) => f.id === id));
    const after = await thrown(() => get(hostPort));
    assert.equal((after as NodeJS.ErrnoException).code, "ECONNREFUSED");
  });

  test("a wildcard host is refused unless allowWildcard", async () => {
    for (const host of ["0.0.0.0", "::", "", "[::]"]) {
      const exc = await thrown(() => fw.ports.forward({ host, guestPort: 8000 }));
      assert.ok(exc instanceof InvalidArgument && !(exc instanceof PortInUse), `${host}: ${String(exc)}`);
      assert.equal((exc as InvalidArgument).field, "host");
      assert.match(exc.message, /would listen on every interface of the host; pass allow_wildcard: true/);
    }
    const name = await thrown(() => fw.ports.forward({ host: "example.com", guestPort: 8000 }));
    assert.equal((name as InvalidArgument).field, "host");
    assert.ok(!(await fw.ports.list()).some((f) => f.host !== "127.0.0.1"));
  });

  test("a host port already in use is PortInUse", async () => {
    const taken = createTcpServer();
    await new Promise<void>((resolve) => taken.listen(0, "127.0.0.1", resolve));
    try {
      const port = (taken.address() as AddressInfo).port;
      const exc = await thrown(() => fw.ports.forward({ hostPort: port, guestPort: 8000 }));
      assert.ok(exc instanceof PortInUse && exc instanceof InvalidArgument, String(exc));
      assert.equal(exc.wireType, "PortInUse");
      assert.equal((exc as PortInUse).field, "host_port");
      assert.equal(exc.message, `host_port: 127.0.0.1:${port} is already in use on the host `
        + "(allowed: a free port, or 0 to pick one)");
    } finally {
      taken.close();
    }
    await using fwd = await fw.ports.forward({ guestPort: 8000 });
    const twice = await thrown(() => fw.ports.forward({ hostPort: fwd.hostPort, guestPort: 8001 }));
    assert.ok(twice instanceof PortInUse);
  });

  test("list and close: by PortForward, id or host port; closing twice is a no-op", async () => {
    const before = (await fw.ports.list()).length;
    const a = await fw.ports.forward({ guestPort: 8000 });
    const b = await fw.ports.forward({ guestPort: 8001 });
    const c = await fw.ports.forward({ guestPort: 8002 });
    const listed = await fw.ports.list();
    assert.equal(listed.length, before + 3);
    assert.deepEqual(listed.slice(-3).map((f) => [f.id, f.guestPort]), [[a.id, 8000], [b.id, 8001], [c.id, 8002]]);
    assert.ok(listed.every((f) => f instanceof PortForward && f.connections === 0));
    await fw.ports.close(a);
    await fw.ports.close(String(b.id));
    await fw.ports.close(c.hostPort);
    assert.equal((await fw.ports.list()).length, before);
    await a.close(); // already closed: a no-op
    await listed.at(-1)?.close(); // a listed forward is bound to its sandbox too
    const unknown = await thrown(() => fw.ports.close("fwd_000000000000"));
    assert.ok(unknown instanceof InvalidArgument);
    assert.match(unknown.message, /^port: no forward matches 'fwd_000000000000'/);
    const gone = await thrown(() => get(a.hostPort));
    assert.equal((gone as NodeJS.ErrnoException).code, "ECONNREFUSED");
  });

  test("detach: false ends the forward with the handle's connection", async () => {
    const other = await Sandbox.connect(fw.id);
    const fwd = await other.ports.forward({ guestPort: 8000, detach: false });
    assert.equal(fwd.detached, false);
    assert.ok((await fw.ports.list()).some((f) => f.id === fwd.id));
    other.close();
    await eventually("the forward closing", async () => {
      assert.ok(!(await fw.ports.list()).some((f) => f.id === fwd.id));
    }, 10_000);
  });
});

describe("network policy", () => {
  test("mode allow through mvmctl up: wildcards (a CIDR entry) and tags", async () => {
    const info = await eg.describe();
    assert.equal(info.network.mode, "allow");
    assert.deepEqual(info.network.allow, [`${HOST_ALIAS}:${allowed.port}`, `10.0.0.0/8:${allowed.port}`]);
    assert.equal(info.network.allowWildcards, true);
    assert.equal(info.network.egress?.proxy, "http://127.0.0.1:3128");
    assert.ok(["supervisor-splice", "agent-channel"].includes(info.network.relay ?? ""), String(info.network.relay));
    assert.deepEqual((await eg.network.policy()).toDict().allow, [`${HOST_ALIAS}:${allowed.port}`,
      `10.0.0.0/8:${allowed.port}`]);
    const listed = (await Sandbox.list()).find((s) => s.id === eg.id);
    assert.deepEqual(listed?.details.tags, { team: "ts-sdk", suite: "network" });
    const env = await eg.commands.run(["printenv", "HTTPS_PROXY"]);
    assert.equal(env.stdout, "http://127.0.0.1:3128\n");
    const out = await probe(allowed.port, refused.port);
    assert.deepEqual(out[allowed.port], [200, `hello from ${allowed.port} path=/probe`]);
    assert.equal(out[refused.port][0], 403);
    assert.deepEqual(refused.requests, []); // the refused server never saw a request
  });

  test("network.update replaces the allow-list of the running sandbox", async () => {
    const info = await eg.network.update({ allow: [`${HOST_ALIAS}:${refused.port}`] });
    assert.ok(info instanceof NetworkInfo);
    assert.equal(info.mode, "allow");
    assert.deepEqual(info.allow, [`${HOST_ALIAS}:${refused.port}`]);
    assert.equal(info.allowWildcards, true); // unchanged unless given
    assert.ok(info.egress !== null);
    const before = allowed.requests.length;
    const out = await probe(allowed.port, refused.port);
    assert.equal(out[allowed.port][0], 403);
    assert.deepEqual(out[refused.port], [200, `hello from ${refused.port} path=/probe`]);
    assert.equal(allowed.requests.length, before);
    assert.deepEqual((await eg.describe()).network.allow, [`${HOST_ALIAS}:${refused.port}`]);

    // an empty list: mode deny, the proxy and its environment go away
    const denied = await eg.network.update({ allow: [] });
    assert.equal(denied.mode, "deny");
    assert.deepEqual(denied.allow, []);
    assert.equal(denied.egress, null);
    assert.equal((await eg.commands.run(["printenv", "HTTPS_PROXY"])).exitCode, 1);
    const cut = await probe(refused.port);
    assert.equal(cut[refused.port][0], 0); // no proxy, no route: nothing reaches the host

    // and back, with the shorthand; a CIDR entry is accepted because the sandbox keeps allowWildcards
    const again = await eg.network.update([`${HOST_ALIAS}:${allowed.port}`, `10.0.0.0/8:${allowed.port}`]);
    assert.equal(again.mode, "allow");
    assert.equal(again.allowWildcards, true);
    assert.deepEqual((await probe(allowed.port))[allowed.port][0], 200);
  });

  test("network.update refuses bad entries (like network()) and modes a running sandbox cannot take", async () => {
    // allowWildcards omitted: the sandbox's own setting (false here) decides, on the supervisor
    const wildcard = await thrown(() => fw.network.update({ allow: ["*.example.com:443"] }));
    assert.ok(wildcard instanceof InvalidNetworkPolicy);
    assert.equal((wildcard as InvalidNetworkPolicy).field, "network.allow['*.example.com:443']");
    assert.match(wildcard.message, /wildcards are refused unless allow_wildcards is true$/);
    const bad = await thrown(() => fw.network.update({ allow: ["no-port.example.com"] }));
    assert.ok(bad instanceof InvalidNetworkPolicy);
    assert.equal((bad as InvalidNetworkPolicy).field, "network.allow['no-port.example.com']");
    const open = await thrown(() => fw.network.update({ allow: [], mode: "open" }));
    assert.ok(open instanceof InvalidNetworkPolicy, String(open));
    assert.equal((open as InvalidNetworkPolicy).field, "network.mode");
    assert.equal((await fw.describe()).network.mode, "deny");
  });
});

/** Each case: the TypeScript call on a handle with no supervisor, and the same call in Python. */
const CASES: [(sb: Sandbox) => unknown, string][] = [
  [(sb) => sb.ports.forward({ guestPort: 0 }), "sb.ports.forward(guest_port=0)"],
  [(sb) => sb.ports.forward({ guestPort: 70000 }), "sb.ports.forward(guest_port=70000)"],
  [(sb) => sb.ports.forward({ guestPort: 8000, hostPort: -1 }), "sb.ports.forward(guest_port=8000, host_port=-1)"],
  [(sb) => sb.ports.forward({ guestPort: 8000, hostPort: 1.5 }), "sb.ports.forward(guest_port=8000, host_port=1.5)"],
  [(sb) => sb.ports.forward({ guestPort: true as unknown as number }), "sb.ports.forward(guest_port=True)"],
  [(sb) => sb.ports.forward({ guestPort: "80" as unknown as number }), "sb.ports.forward(guest_port='80')"],
  [(sb) => sb.ports.forward({ guestPort: 80, host: 5 as unknown as string }), "sb.ports.forward(guest_port=80, host=5)"],
  [(sb) => sb.ports.close(1.5), "sb.ports.close(1.5)"],
  [(sb) => sb.ports.close(true as unknown as number), "sb.ports.close(True)"],
  [(sb) => sb.ports.close(null as unknown as number), "sb.ports.close(None)"],
  [(sb) => sb.network.update({ allow: "x.org:1" as unknown as string[] }), "sb.network.update('x.org:1')"],
  [(sb) => sb.network.update({ allow: ["*.x.org:443"], allowWildcards: false }),
    "sb.network.update(['*.x.org:443'], allow_wildcards=False)"],
  [(sb) => sb.network.update({ allow: ["x.org:1"], mode: "deny" }), "sb.network.update(['x.org:1'], mode='deny')"],
  [(sb) => sb.network.update({ allow: [], mode: "allow" }), "sb.network.update([], mode='allow')"],
  [(sb) => sb.network.update(["bad_host!:80"]), "sb.network.update(['bad_host!:80'])"],
  [(sb) => sb.network.update({ allow: ["x.org:0"] }), "sb.network.update(['x.org:0'])"],
  [(sb) => sb.files.read("/x", { maxBytes: 0 }), "sb.files.read('/x', max_bytes=0)"],
  [(sb) => sb.files.read("/x", { maxBytes: 1.5 }), "sb.files.read('/x', max_bytes=1.5)"],
  [(sb) => sb.files.readText("/x", { maxBytes: "9" as unknown as number }), "sb.files.read_text('/x', max_bytes='9')"],
  [(sb) => sb.files.write("/x", 5 as unknown as string), "sb.files.write('/x', 5)"],
  [(sb) => sb.files.write("x", "data"), "sb.files.write('x', 'data')"],
  [(sb) => sb.commands.run(["true"], { stdin: { a: 1 } as unknown as string }), "sb.commands.run(['true'], stdin={'a': 1})"],
  [(sb) => new Process(sb, 1).lines("both" as "stdout"), "mvm.Process(sb, 1).lines('both')"],
  [(sb) => new Process(sb, 1).signal("SIGBOGUS"), "mvm.Process(sb, 1).signal('SIGBOGUS')"],
  [(sb) => sb.snapshot("s", { expires: "never" }), "sb.snapshot('s', expires='never')"],
  [() => Sandbox.create("python-3.13", { onBehalfOf: { client: 7 } as unknown as Record<string, string> }),
    "mvm.Sandbox.create('python-3.13', on_behalf_of={'client': 7})"],
  [() => Sandbox.create("python-3.13", { onBehalfOf: {} }), "mvm.Sandbox.create('python-3.13', on_behalf_of={})"],
  [() => Sandbox.create("python-3.13", { onBehalfOf: "me" as unknown as Record<string, string> }),
    "mvm.Sandbox.create('python-3.13', on_behalf_of='me')"],
  [() => Sandbox.create("python-3.13", { mode: "plan", onBehalfOf: { client: 7 } as unknown as Record<string, string> }),
    "mvm.Sandbox.create('python-3.13', mode='plan', on_behalf_of={'client': 7})"],
  [() => Sandbox.create("python-3.13", { autoPause: "soon" }), "mvm.Sandbox.create('python-3.13', auto_pause='soon')"],
];

describe("argument checks (no supervisor needed)", () => {
  test("a tag mvmctl up --tag KEY=VALUE cannot carry is refused before anything starts", async () => {
    for (const key of ["", "a=b"]) {
      const exc = await thrown(() => Sandbox.create("python-3.13", { tags: { [key]: "x" } }));
      assert.ok(exc instanceof InvalidArgument, String(exc));
      assert.equal((exc as InvalidArgument).field, "tags");
    }
  });

  test("the Python SDK's errors, word for word", { skip: !existsSync(PYTHON) && "no .venv" }, async () => {
    const expected = pythonErrors(CASES.map(([, py]) => py),
      { prelude: 'from pathlib import Path\nsb = mvm.Sandbox("sb-nothing0001", "nothing", Path("/nonexistent"))' });
    const sb = new Sandbox("sb-nothing0001", "nothing", "/nonexistent");
    for (let i = 0; i < CASES.length; i++) {
      const exc = await thrown(() => CASES[i][0](sb));
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
