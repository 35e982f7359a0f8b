/**
 * The TypeScript half of the golden protocol fixtures (tests/fixtures/protocol/*.json,
 * the Python half is tests/protocol/test_golden_frames.py): each fixture's
 * `typescript` call, run against a fake supervisor on a real Unix socket, must send
 * exactly the fixture's frames — the hello, then every request and cancel, byte for
 * byte. The TypeScript codec must also encode each golden header to the same bytes.
 */

import "./helpers.js";

import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { mkdtempSync, readdirSync, readFileSync, rmSync } from "node:fs";
import { createServer, type Server, type Socket } from "node:net";
import { join } from "node:path";
import { after, describe, test } from "node:test";

import * as sdk from "@mvm/sdk";
import { protocol, Sandbox } from "@mvm/sdk";

import { collect, REPO } from "./helpers.js";

const FIXTURES = join(REPO, "tests", "fixtures", "protocol");
const SMALL_FRAME = 2048;
const BIG = Buffer.from(Array.from({ length: protocol.CHUNK_SIZE + 10 }, (_, i) => (i * 7) % 256));
const SANDBOX_ID = "sb-golden0001";

interface Reply {
  data?: { stream: string; payload_hex: string }[];
  result?: Record<string, unknown>;
  payload_hex?: string;
  error?: Record<string, unknown> & { type: string; message: string };
  until_cancel?: boolean;
}

interface GoldenFrame {
  header: Record<string, unknown>;
  payload_size: number;
  payload_sha256: string;
  frame_size: number;
  frame_sha256: string;
  frame_hex?: string;
}

interface Fixture {
  operation: string;
  typescript: string;
  replies: Record<string, Reply>;
  frames: GoldenFrame[];
}

const sha256 = (data: Uint8Array) => createHash("sha256").update(data).digest("hex");

function describeFrame(raw: Buffer): GoldenFrame {
  const [frame] = new protocol.FrameDecoder().feed(raw);
  const out: GoldenFrame = {
    header: frame.header, payload_size: frame.payload.length, payload_sha256: sha256(frame.payload),
    frame_size: raw.length, frame_sha256: sha256(raw),
  };
  if (raw.length <= SMALL_FRAME) out.frame_hex = raw.toString("hex");
  return out;
}

/** A supervisor for one connection: records each frame's exact bytes, answers from `replies`. */
class FakeSupervisor {
  readonly received: Buffer[] = [];
  readonly closed: Promise<void>;
  private readonly server: Server;

  constructor(readonly path: string, replies: Record<string, Reply>) {
    let done: () => void;
    this.closed = new Promise((resolve) => (done = resolve));
    this.server = createServer((conn: Socket) => {
      let buffer = Buffer.alloc(0);
      let greeted = false;
      const waiting = new Set<number>();
      conn.on("data", (chunk: Buffer) => {
        buffer = Buffer.concat([buffer, chunk]);
        for (;;) {
          if (buffer.length < 8) return;
          const size = 8 + buffer.readUInt32BE(0) + buffer.readUInt32BE(4);
          if (buffer.length < size) return;
          const raw = buffer.subarray(0, size);
          buffer = buffer.subarray(size);
          this.received.push(Buffer.from(raw));
          const [frame] = new protocol.FrameDecoder().feed(raw);
          if (!greeted) {
            protocol.checkHello(frame);
            greeted = true;
            conn.write(protocol.hello("supervisor", { sandbox_id: SANDBOX_ID }));
            continue;
          }
          const id = frame.id as number;
          if (frame.kind === "cancel") {
            if (waiting.delete(id)) conn.write(protocol.responseError(id, "Cancelled", "cancelled by the client"));
            continue;
          }
          const reply = replies[String(frame.header.op)] ?? {};
          for (const item of reply.data ?? []) conn.write(protocol.data(id, item.stream, Buffer.from(item.payload_hex, "hex")));
          if (reply.until_cancel) waiting.add(id);
          else if (reply.error) {
            const { type, message, ...details } = reply.error;
            conn.write(protocol.responseError(id, type, message, details));
          } else {
            conn.write(protocol.responseOk(id, reply.result ?? {}, Buffer.from(reply.payload_hex ?? "", "hex")));
          }
        }
      });
      conn.on("close", () => done());
      conn.on("error", () => undefined);
    });
  }

  listen(): Promise<void> {
    return new Promise((resolve) => this.server.listen(this.path, resolve));
  }

  close(): void {
    this.server.close();
  }
}

async function first<T>(iterable: AsyncIterable<T>): Promise<T | undefined> {
  for await (const item of iterable) return item; // leaving the loop returns the iterator: a cancel
  return undefined;
}

const AsyncFunction = Object.getPrototypeOf(async () => undefined).constructor as new (...args: string[]) => (
  ...values: unknown[]) => Promise<unknown>;

const fixtures: [string, Fixture][] = readdirSync(FIXTURES).filter((n) => n.endsWith(".json")).sort()
  .map((n) => [n.slice(0, -5), JSON.parse(readFileSync(join(FIXTURES, n), "utf8")) as Fixture]);

const home = mkdtempSync("/tmp/mvm-golden-");
after(() => rmSync(home, { recursive: true, force: true }));

describe("golden protocol frames (shared with the Python SDK)", () => {
  test("there is a fixture per operation", () => {
    const names = new Set(fixtures.map(([name]) => name));
    for (const op of ["exec.run", "proc.start", "proc.attach", "proc.wait", "proc.signal", "proc.stdin", "proc.list",
      "proc.info", "fs.write", "fs.write-chunked", "fs.read", "fs.list", "fs.stat", "fs.mkdir", "fs.remove", "fs.move",
      "sandbox.describe", "sandbox.logs", "sandbox.stop", "sandbox.start", "sandbox.pause", "sandbox.resume",
      "sandbox.snapshot", "sandbox.destroy", "port.forward", "port.forward-defaults", "port.forward-close", "port.list",
      "port.close", "port.close-port", "network.update", "network.update-options", "network.update-deny"]) {
      assert.ok(names.has(op), `no golden fixture for ${op}`);
    }
  });

  for (const [name, fixture] of fixtures) {
    test(`${name}: ${fixture.typescript}`, async () => {
      const saved = { home: process.env.MVM_HOME, secret: process.env.MVM_SECRET_GOLDEN_TOKEN };
      process.env.MVM_HOME = home; // no keystore there: the secret comes from the environment
      process.env.MVM_SECRET_GOLDEN_TOKEN = "golden-secret-value";
      const dir = mkdtempSync("/tmp/mvm-golden-");
      const server = new FakeSupervisor(join(dir, "control.sock"), fixture.replies);
      await server.listen();
      try {
        const sandbox = new Sandbox(SANDBOX_ID, "golden", dir);
        const call = new AsyncFunction("sandbox", "sdk", "BIG", "first", "collect", `return await (${fixture.typescript});`);
        await call(sandbox, sdk, BIG, first, collect);
        sandbox.close();
        await server.closed;
        const frames = server.received.map(describeFrame);
        assert.deepEqual(frames[0].header, { kind: "hello", protocol: "mvm", version: 1, role: "client" });
        assert.deepEqual(frames, fixture.frames,
          `the TypeScript SDK's frames for ${fixture.typescript} differ from the golden ones (the Python SDK's)`);
      } finally {
        server.close();
        rmSync(dir, { recursive: true, force: true });
        process.env.MVM_HOME = saved.home;
        if (saved.secret === undefined) delete process.env.MVM_SECRET_GOLDEN_TOKEN;
        else process.env.MVM_SECRET_GOLDEN_TOKEN = saved.secret;
      }
    });

    test(`${name}: the TypeScript codec encodes the golden headers byte for byte`, () => {
      for (const frame of fixture.frames) {
        let payload: Buffer;
        if (frame.frame_hex !== undefined) {
          const raw = Buffer.from(frame.frame_hex, "hex");
          payload = raw.subarray(8 + raw.readUInt32BE(0));
        } else {
          const found = [BIG.subarray(0, protocol.CHUNK_SIZE), BIG.subarray(protocol.CHUNK_SIZE), BIG]
            .find((candidate) => sha256(candidate) === frame.payload_sha256);
          assert.ok(found, `unknown large payload ${frame.payload_sha256}`);
          payload = found;
        }
        const encoded = protocol.encode(frame.header, payload);
        assert.equal(encoded.length, frame.frame_size);
        assert.equal(sha256(encoded), frame.frame_sha256);
        if (frame.frame_hex !== undefined) assert.equal(encoded.toString("hex"), frame.frame_hex);
      }
    });
  }
});
