import assert from "node:assert/strict";
import { test } from "node:test";
import { create, toBinary } from "@bufbuild/protobuf";
import { enqueueMessage, enqueueSize, fieldSize, utf8Size } from "../../src/enqueue.js";
import {
  EnqueueRequestSchema,
  SessionRequestSchema,
} from "../../src/gen/fairlane/queue/v1/queue_pb.js";

const TEXTS = ["", "echo", "é", "日本", "🎉x", "\ud800", "a\udc00b", "\ud83d", "x".repeat(300)];

test("utf8Size is what protobuf-es writes, lone surrogates included", () => {
  for (const text of TEXTS) {
    assert.equal(utf8Size(text), new TextEncoder().encode(text).byteLength, JSON.stringify(text));
  }
});

test("enqueueSize is the serialized size, exactly", () => {
  const deadlines = [
    undefined,
    new Date(0),
    new Date(1_700_000_000_123),
    new Date(-1),
    new Date("0001-01-01T00:00:00Z"),
    new Date("9999-12-31T23:59:59.999Z"),
  ];
  const payloads = [
    undefined,
    "",
    "p",
    new Uint8Array(127),
    new Uint8Array(128),
    new Uint8Array(20_000),
  ];
  const attempts = [undefined, 0, 1, 127, 128, 2 ** 32 - 1];
  let checked = 0;
  for (const [i, handler] of TEXTS.entries()) {
    for (const [j, deadline] of deadlines.entries()) {
      for (const [k, payload] of payloads.entries()) {
        const request = enqueueMessage(handler, payload, {
          idempotencyKey: TEXTS[(i + j) % TEXTS.length],
          clientRef: TEXTS[(i + k) % TEXTS.length],
          deadline,
          maxAttempts: attempts[(j + k) % attempts.length],
        });
        const bytes = toBinary(EnqueueRequestSchema, request).byteLength;
        assert.equal(enqueueSize(request), bytes);
        const session = create(SessionRequestSchema, { kind: { case: "enqueue", value: request } });
        assert.equal(fieldSize(bytes), toBinary(SessionRequestSchema, session).byteLength);
        checked += 1;
      }
    }
  }
  assert.equal(checked, TEXTS.length * deadlines.length * payloads.length);
});
