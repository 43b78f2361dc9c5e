import assert from "node:assert/strict";
import { test } from "node:test";
import { create, toBinary } from "@bufbuild/protobuf";
import {
  type SessionRequest,
  SessionRequestSchema,
} from "../../src/gen/fairlane/queue/v1/queue_pb.js";
import { Outbox } from "../../src/outbox.js";

function enqueue(ref: string, payloadBytes = 0): SessionRequest {
  return create(SessionRequestSchema, {
    kind: {
      case: "enqueue",
      value: { handler: "echo", clientRef: ref, payload: new Uint8Array(payloadBytes) },
    },
  });
}

function cancel(id: string): SessionRequest {
  return create(SessionRequestSchema, { kind: { case: "cancel", value: { requestId: id } } });
}

/** Each message read, as "ref", "[ref ref ...]" for a batch, or "cancel id". */
async function drain(outbox: Outbox): Promise<string[]> {
  outbox.close();
  const out: string[] = [];
  for await (const message of outbox) {
    const kind = message.kind;
    if (kind.case === "enqueue") {
      out.push(kind.value.clientRef);
    } else if (kind.case === "enqueueBatch") {
      out.push(`[${kind.value.requests.map((r) => r.clientRef).join(" ")}]`);
    } else if (kind.case === "cancel") {
      out.push(`cancel ${kind.value.requestId}`);
    }
  }
  return out;
}

test("enqueues queued together leave as one batch; a cancel goes alone, in its place", async () => {
  const outbox = new Outbox();
  for (const message of [
    enqueue("1"),
    enqueue("2"),
    enqueue("3"),
    cancel("r1"),
    enqueue("4"),
    enqueue("5"),
    cancel("r2"),
    enqueue("6"),
  ]) {
    outbox.push(message);
  }
  assert.deepEqual(await drain(outbox), ["[1 2 3]", "cancel r1", "[4 5]", "cancel r2", "6"]);
});

test("a submit made while the transport waits leaves at once, alone", async () => {
  const outbox = new Outbox();
  const reader = outbox[Symbol.asyncIterator]();
  const next = reader.next();
  outbox.push(enqueue("a"));
  outbox.push(enqueue("b"));
  outbox.push(enqueue("c"));
  const first = await next;
  assert.equal(first.done, false);
  assert.equal(first.value.kind.case, "enqueue");
  outbox.close();
  const second = await reader.next();
  assert.equal(second.value?.kind.case, "enqueueBatch");
  assert.equal((await reader.next()).done, true);
});

test("batches stop at the request and size limits; an oversized enqueue still goes alone", async () => {
  const byCount = new Outbox(2, 1 << 20);
  for (const ref of ["1", "2", "3", "4", "5"]) {
    byCount.push(enqueue(ref));
  }
  assert.deepEqual(await drain(byCount), ["[1 2]", "[3 4]", "5"]);

  const bySize = new Outbox(100, 1000);
  bySize.push(enqueue("big", 5000));
  bySize.push(enqueue("s1", 400));
  bySize.push(enqueue("s2", 400));
  bySize.push(enqueue("s3", 400));
  assert.deepEqual(await drain(bySize), ["big", "[s1 s2]", "s3"]);
});

test("nothing is read after the transport stops reading", async () => {
  const outbox = new Outbox();
  outbox.push(enqueue("1"));
  const reader = outbox[Symbol.asyncIterator]();
  await reader.return?.();
  outbox.push(enqueue("2"));
  assert.equal((await reader.next()).done, true);
});

test("limits below one are refused", () => {
  assert.throws(() => new Outbox(0), RangeError);
  assert.throws(() => new Outbox(1, 0), RangeError);
});

test("a batch never exceeds the byte limit, framing and multi-byte characters counted", async () => {
  for (const limit of [1_000, 4_096, 70_000]) {
    const outbox = new Outbox(1_000, limit);
    // Client refs of 3-byte characters: a count of UTF-16 units sees a third of them.
    for (let i = 0; i < 400; i++) {
      const message = enqueue("€".repeat(40 + (i % 40)), (i * 37) % 300);
      outbox.push(message);
    }
    outbox.close();
    let messages = 0;
    let batched = 0;
    for await (const message of outbox) {
      messages += 1;
      const size = toBinary(SessionRequestSchema, message).byteLength;
      if (message.kind.case === "enqueueBatch") {
        batched += message.kind.value.requests.length;
        assert.ok(size <= limit, `a batch of ${size} bytes under a limit of ${limit}`);
      }
    }
    assert.ok(messages < 400 && batched > 0, `limit ${limit}: ${messages} messages`);
  }
});

test("a batch fills up to the limit exactly", async () => {
  const one = toBinary(SessionRequestSchema, enqueue("r", 100)).byteLength; // 1 + 1 + body
  // Two enqueues in a batch: the EnqueueBatch holds two such fields, and the
  // SessionRequest frames it once more (a tag, the length as a varint).
  const body = 2 * one;
  const two = 1 + (body < 128 ? 1 : 2) + body;
  const exact = new Outbox(100, two);
  const under = new Outbox(100, two - 1);
  for (const outbox of [exact, under]) {
    outbox.push(enqueue("r", 100));
    outbox.push(enqueue("r", 100));
  }
  assert.deepEqual(await drain(exact), ["[r r]"]);
  assert.deepEqual(await drain(under), ["r", "r"]);
});
