/** The codec: same wire format, limits and validation as src/mvm/protocol/codec.py. */

import "./helpers.js";

import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { existsSync } from "node:fs";
import { join } from "node:path";
import { describe, test } from "node:test";

import { protocol, ProtocolError } from "@mvm/sdk";

import { REPO } from "./helpers.js";

const { encode, FrameDecoder, MAX_HEADER, MAX_PAYLOAD } = protocol;

function prefix(headerLen: number, payloadLen: number): Buffer {
  const out = Buffer.alloc(8);
  out.writeUInt32BE(headerLen, 0);
  out.writeUInt32BE(payloadLen, 4);
  return out;
}

function rawFrame(body: string | Buffer, payload = Buffer.alloc(0)): Buffer {
  const header = typeof body === "string" ? Buffer.from(body) : body;
  return Buffer.concat([prefix(header.length, payload.length), header, payload]);
}

/** A deterministic pseudo-random generator (the tests must not flake). */
function rng(seed: number): () => number {
  let state = seed >>> 0;
  return () => {
    state = (state * 1664525 + 1013904223) >>> 0;
    return state / 2 ** 32;
  };
}

describe("protocol codec", () => {
  test("every constructor produces a frame that decodes back", () => {
    const frames = [
      protocol.hello("client"), protocol.request(1, "fs.read", { path: "/x" }), protocol.responseOk(1, { size: 3 }, Buffer.from("abc")),
      protocol.responseError(2, "FileNotFound", "nope", { path: "/x" }), protocol.data(3, "stdout", Buffer.from("hi")),
      protocol.event("proc.exit", undefined, { pid: 4, exit_code: 0 }), protocol.cancel(5),
    ];
    const decoded = new FrameDecoder().feed(Buffer.concat(frames));
    assert.deepEqual(decoded.map((f) => f.kind), ["hello", "request", "response", "response", "data", "event", "cancel"]);
    assert.equal(decoded[2].payload.toString(), "abc");
    assert.deepEqual(decoded[3].header.error, { type: "FileNotFound", message: "nope", path: "/x" });
    assert.equal(decoded[4].id, 3);
    assert.equal(decoded[5].id, null);
  });

  test("payload bytes travel unencoded", () => {
    const payload = Buffer.from(Array.from({ length: 256 }, (_, i) => i));
    const encoded = protocol.data(1, "stdout", payload);
    assert.ok(encoded.subarray(encoded.length - 256).equals(payload));
  });

  test("encode refuses frames over the limits", () => {
    assert.throws(() => encode({ kind: "event", event: "x", pad: "a".repeat(MAX_HEADER) }), /MAX_HEADER/);
    assert.throws(() => encode({ kind: "data", id: 1, stream: "s" }, Buffer.alloc(MAX_PAYLOAD + 1)), /MAX_PAYLOAD/);
    assert.throws(() => encode({ kind: "event", event: "x", n: BigInt(1) as unknown as number }), /not JSON-serialisable/);
  });

  const invalid: [string, Record<string, unknown>, RegExp][] = [
    ["unknown kind", { kind: "nope" }, /unknown frame kind 'nope'; expected one of \['cancel', 'data', 'event', 'hello', 'request', 'response'\]/],
    ["null kind", { kind: null }, /unknown frame kind null; expected one of \['cancel'/],
    ["boolean kind", { kind: true }, /unknown frame kind true; expected one of \['cancel'/],
    ["hello without protocol", { kind: "hello", version: 1, role: "x" }, /hello needs protocol='mvm'/],
    ["hello without role", { kind: "hello", protocol: "mvm", version: 1 }, /hello needs a string 'role'/],
    ["event without name", { kind: "event" }, /event frame needs a string 'event'/],
    ["request without id", { kind: "request", op: "x" }, /request frame needs a non-negative integer 'id'/],
    ["negative id", { kind: "cancel", id: -1 }, /non-negative integer 'id'/],
    ["fractional id", { kind: "cancel", id: 1.5 }, /non-negative integer 'id'/],
    ["request without op", { kind: "request", id: 1 }, /needs a string 'op'/],
    ["args not an object", { kind: "request", id: 1, op: "x", args: [] }, /'args' must be an object/],
    ["response without ok", { kind: "response", id: 1 }, /boolean 'ok'/],
    ["result not an object", { kind: "response", id: 1, ok: true, result: "x" }, /'result' must be an object/],
    ["result an empty list", { kind: "response", id: 1, ok: true, result: [] }, /'result' must be an object/],
    ["result false", { kind: "response", id: 1, ok: true, result: false }, /'result' must be an object/],
    ["error without type", { kind: "response", id: 1, ok: false, error: {} }, /'error' object with a string 'type'/],
    ["data without stream", { kind: "data", id: 1 }, /string 'stream'/],
    ["a window of 0", { kind: "request", id: 1, op: "x", window: 0 }, /request 'window' must be an integer in 1\.\.2\*\*32/],
    ["a grant without bytes", { kind: "event", event: "data.window", id: 1 }, /data.window needs an integer 'bytes' in 1\.\.2\*\*32/],
    ["a grant for id 0", { kind: "event", event: "data.window", id: 0, bytes: 5 }, /data.window needs an integer 'id' >= 1/],
    ["a grant past 2**32", { kind: "event", event: "proc.window", pid: 7, bytes: 2 ** 32 + 1 }, /proc.window needs an integer 'bytes'/],
  ];
  for (const [name, header, message] of invalid) {
    test(`a header with ${name} is a ProtocolError, encoding and decoding`, () => {
      assert.throws(() => encode(header), (exc: unknown) => exc instanceof ProtocolError && message.test(exc.message));
      assert.throws(() => new FrameDecoder().feed(rawFrame(JSON.stringify(header))), message);
    });
  }

  test("a result that is missing or null is accepted; any other non-object is refused, as in Python", () => {
    for (const header of [{ kind: "response", id: 1, ok: true }, { kind: "response", id: 1, ok: true, result: null }]) {
      assert.equal(new FrameDecoder().feed(rawFrame(JSON.stringify(header)))[0].kind, "response");
    }
    for (const result of [[], 0, "", false]) {
      assert.throws(() => new FrameDecoder().feed(rawFrame(JSON.stringify({ kind: "response", id: 1, ok: true, result }))),
        /'result' must be an object/);
    }
  });

  test("header bodies that are not JSON objects are protocol errors", () => {
    for (const body of ["[]", "1", "\"x\"", "null", "{", Buffer.from([0xff, 0xfe]), "\ufeff{\"kind\":\"cancel\",\"id\":1}"]) {
      assert.throws(() => new FrameDecoder().feed(rawFrame(body)), ProtocolError);
    }
  });

  test("an oversized length prefix is refused before any of it is buffered", () => {
    assert.throws(() => new FrameDecoder().feed(prefix(MAX_HEADER + 1, 0)), new RegExp(`header length ${MAX_HEADER + 1} outside 1..${MAX_HEADER}$`));
    assert.throws(() => new FrameDecoder().feed(prefix(0, 0)), /header length 0/);
    assert.throws(() => new FrameDecoder().feed(prefix(10, MAX_PAYLOAD + 1)), /exceeds MAX_PAYLOAD/);
  });

  test("a decoder stays poisoned after an error", () => {
    const decoder = new FrameDecoder();
    assert.throws(() => decoder.feed(prefix(0, 0)), ProtocolError);
    assert.throws(() => decoder.feed(protocol.cancel(1)), /header length 0/);
    assert.equal(decoder.buffered, 0);
  });

  test("checkHello wants a hello of the same major version", () => {
    const [cancel] = new FrameDecoder().feed(protocol.cancel(1));
    assert.throws(() => protocol.checkHello(cancel), /expected hello, got cancel/);
    const [future] = new FrameDecoder().feed(encode({ kind: "hello", protocol: "mvm", version: 99, role: "x" }));
    assert.throws(() => protocol.checkHello(future), /v99/);
  });

  test("splitting the stream anywhere yields the same frames", () => {
    const random = rng(7);
    const frames = Array.from({ length: 40 }, (_, i) => protocol.data(i, "stdout",
      Buffer.alloc(Math.floor(random() * 3000), i)));
    const stream = Buffer.concat(frames);
    for (let round = 0; round < 50; round++) {
      const decoder = new FrameDecoder();
      const got: protocol.Frame[] = [];
      let at = 0;
      while (at < stream.length) {
        const size = 1 + Math.floor(random() * 700);
        got.push(...decoder.feed(stream.subarray(at, at + size)));
        at += size;
      }
      assert.equal(got.length, frames.length);
      got.forEach((frame, i) => assert.ok(Buffer.concat([frame.payload]).equals(new FrameDecoder().feed(frames[i])[0].payload)));
      assert.equal(decoder.buffered, 0);
    }
  });

  test("every truncation of a frame just needs more bytes", () => {
    const frame = protocol.responseOk(9, { size: 5, eof: true }, Buffer.from("hello"));
    for (let cut = 0; cut < frame.length; cut++) {
      const decoder = new FrameDecoder();
      assert.deepEqual(decoder.feed(frame.subarray(0, cut)), []);
      assert.equal(decoder.feed(frame.subarray(cut)).length, 1);
    }
  });

  test("random and corrupted bytes give frames or a ProtocolError, nothing else", () => {
    const random = rng(11);
    const good = Buffer.concat([protocol.request(1, "fs.stat", { path: "/a" }), protocol.data(2, "s", Buffer.from("xyz"))]);
    for (let round = 0; round < 2000; round++) {
      const bytes = Buffer.from(good);
      for (let flips = 0; flips < 3; flips++) bytes[Math.floor(random() * bytes.length)] = Math.floor(random() * 256);
      try {
        for (const frame of new FrameDecoder().feed(bytes)) assert.ok(protocol.KINDS.includes(frame.kind));
      } catch (exc) {
        assert.ok(exc instanceof ProtocolError, `unexpected ${String(exc)}`);
      }
    }
  });

  test("frames encoded by the Python reference codec decode here to the same headers", { skip: !existsSync(join(REPO, ".venv", "bin", "python")) && "no .venv" }, () => {
    const script = `
import json
from mvm.protocol import codec
frames = [codec.hello("supervisor", sandbox_id="sb-1"), codec.response_ok(3, {"size": 2, "eof": True, "name": "h\u00e9llo \\u2028"}, b"\\x00\\xff"),
          codec.response_error(4, "CommandTimeout", "timed out", pid=7, timeout_seconds=1.5), codec.data(5, "stdout", b"x" * 300000),
          codec.event("proc.exit", pid=9, exit_code=0, signal=None, ended_at=1700000000.25), codec.cancel(6)]
print(json.dumps([f.hex() for f in frames]))
`;
    const done = spawnSync(join(REPO, ".venv", "bin", "python"), ["-c", script], { encoding: "utf8", maxBuffer: 64 << 20 });
    assert.equal(done.status, 0, done.stderr);
    const hexes = JSON.parse(done.stdout) as string[];
    const frames = new FrameDecoder().feed(Buffer.concat(hexes.map((h) => Buffer.from(h, "hex"))));
    assert.deepEqual(frames.map((f) => f.kind), ["hello", "response", "response", "data", "event", "cancel"]);
    assert.deepEqual(frames[1].header.result, { size: 2, eof: true, name: "h\u00e9llo \u2028" });
    assert.deepEqual([...frames[1].payload], [0, 255]);
    assert.deepEqual(frames[2].header.error, { type: "CommandTimeout", message: "timed out", pid: 7, timeout_seconds: 1.5 });
    assert.equal(frames[3].payload.length, 300000);
    // and the TypeScript encoder writes those very bytes back
    hexes.forEach((hex, i) => {
      if (i === 3) return; // 300 kB: compared by length above
      assert.equal(encode(frames[i].header, frames[i].payload).toString("hex"), hex);
    });
  });
});
