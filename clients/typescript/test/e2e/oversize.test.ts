import assert from "node:assert/strict";
import { test } from "node:test";
import {
  Code,
  InvalidArgumentError,
  RejectedError,
  RequestStatus,
  type RetryEvent,
} from "../../src/index.js";
import { newClient, newUser, waitUntil } from "./support.js";

test("Session: an enqueue over the message limit fails alone; accepted ones still resolve", async () => {
  const client = newClient();
  try {
    await newUser(client);
    let accepted = 0;
    const session = client.session({
      onEvent: (event) => {
        if (event.case === "accepted") {
          accepted += 1;
        }
      },
    });
    const before = [0, 1, 2].map((i) => session.submit("sleep", "0.3", { clientRef: `b${i}` }));
    await waitUntil(() => accepted === 3); // accepted and running
    const big = session.submit("echo", new Uint8Array(9 * 1024 * 1024), { clientRef: "big" });
    const after = [0, 1].map((i) => session.submit("echo", `after ${i}`, { clientRef: `a${i}` }));
    await session.close();

    const results = await Promise.all([...before, ...after]);
    assert.deepEqual(
      results.map((r) => [r.clientRef, r.status, r.laneSeq]),
      [
        ["b0", RequestStatus.SUCCEEDED, 1n],
        ["b1", RequestStatus.SUCCEEDED, 2n],
        ["b2", RequestStatus.SUCCEEDED, 3n],
        ["a0", RequestStatus.SUCCEEDED, 4n],
        ["a1", RequestStatus.SUCCEEDED, 5n],
      ],
    );
    await assert.rejects(big, (error: unknown) => {
      assert.ok(error instanceof RejectedError, String(error));
      assert.equal(error.code, Code.InvalidArgument);
      assert.equal(error.clientRef, "big");
      assert.match(error.message, /bytes serialized \(payload 9437184 bytes\)/);
      assert.match(error.message, /over the 8388608-byte gRPC message limit/);
      return true;
    });
    assert.equal((await client.lane()).lastLaneSeq, 5n); // the big one was never stored
  } finally {
    client.close();
  }
});

test("unary enqueue over the message limit: InvalidArgumentError at once, not retried", async () => {
  const retries: RetryEvent[] = [];
  const client = newClient({ onRetry: (event) => retries.push(event) });
  try {
    await newUser(client);
    const started = Date.now();
    await assert.rejects(
      client.enqueue("echo", new Uint8Array(9 * 1024 * 1024)),
      (error: unknown) =>
        error instanceof InvalidArgumentError && /gRPC message limit/.test(error.message),
    );
    assert.ok(Date.now() - started < 2_000, "not refused at once");
    await assert.rejects(client.enqueue("echo", "x", { maxAttempts: -1 }), InvalidArgumentError);
    assert.deepEqual(retries, []);
    const { requestId } = await client.enqueue("echo", "small");
    assert.equal((await client.get(requestId)).requestId, requestId);
  } finally {
    client.close();
  }
});
