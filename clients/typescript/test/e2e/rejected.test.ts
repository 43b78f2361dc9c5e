import assert from "node:assert/strict";
import { test } from "node:test";
import {
  Code,
  RejectedError,
  RequestStatus,
  ResourceExhaustedError,
  type RetryEvent,
} from "../../src/index.js";
import { newClient, newUser, PASSWORD, USER_BURST } from "./support.js";

test("over the rate limit: Session rejections carry their retry delay, order holds", async () => {
  const client = newClient();
  try {
    await newUser(client);
    const session = client.session({ maxInFlight: 4 * USER_BURST });
    const count = 2 * USER_BURST;
    const promises = Array.from({ length: count }, (_, i) =>
      session.submit("echo", String(i), { clientRef: String(i) }),
    );
    await session.close();
    const settled = await Promise.allSettled(promises);
    const done = settled.flatMap((s) => (s.status === "fulfilled" ? [s.value] : []));
    const refused = settled.flatMap((s, i) => (s.status === "rejected" ? [[i, s.reason]] : []));
    assert.ok(done.length >= USER_BURST, `${done.length} accepted`);
    assert.ok(refused.length >= 1, "nothing was rate limited");
    for (const [i, error] of refused) {
      assert.ok(error instanceof RejectedError);
      assert.equal(error.code, Code.ResourceExhausted);
      assert.equal(error.clientRef, String(i));
      assert.ok((error.retryAfterMs ?? 0) > 0, `no retry delay: ${error.retryAfterMs}`);
    }
    // What was accepted ran in submit order, gap-free.
    assert.deepEqual(
      done.map((r) => r.laneSeq),
      done.map((_, i) => BigInt(i + 1)),
    );
    const refs = done.map((r) => Number(r.clientRef));
    assert.deepEqual(
      refs,
      [...refs].sort((a, b) => a - b),
    );
    assert.ok(done.every((r) => r.status === RequestStatus.SUCCEEDED));
  } finally {
    client.close();
  }
});

test("unary enqueue: RetryInfo on RESOURCE_EXHAUSTED, waited out with one idempotency key", async () => {
  const retries: RetryEvent[] = [];
  const patient = newClient({
    retry: { maxAttempts: 30 },
    onRetry: (event) => retries.push(event),
  });
  const impatient = newClient({ retry: { maxAttempts: 1 } });
  try {
    const username = await newUser(patient);
    await impatient.login(username, PASSWORD);
    // Empty the user's bucket; the call that finds it empty says how long to wait.
    let refusal: ResourceExhaustedError | undefined;
    for (let i = 0; i <= USER_BURST * 2 && refusal === undefined; i++) {
      try {
        await impatient.enqueue("echo", `drain ${i}`);
      } catch (error) {
        assert.ok(error instanceof ResourceExhaustedError, String(error));
        refusal = error;
      }
    }
    assert.ok(refusal !== undefined, "the bucket never emptied");
    assert.ok((refusal.retryAfterMs ?? 0) > 0);

    // Several at once: the bucket refills slowly, so most have to wait and retry.
    const enqueued = await Promise.all(
      [0, 1, 2, 3, 4].map((i) => patient.enqueue("echo", `patient ${i}`)),
    );
    assert.ok(retries.length >= 1, "no call was retried");
    for (const retry of retries) {
      assert.equal(retry.method, "Enqueue");
      assert.ok(retry.error instanceof ResourceExhaustedError);
      assert.ok((retry.error.retryAfterMs ?? 0) > 0);
      assert.ok(retry.delayMs >= (retry.error.retryAfterMs ?? 0));
    }
    // Each ran once: five distinct requests, each with its own generated key.
    assert.equal(new Set(enqueued.map((e) => e.requestId)).size, 5);
    assert.equal(new Set(enqueued.map((e) => e.idempotencyKey)).size, 5);
    assert.ok(enqueued.every((e) => !e.duplicate));
    const again = await patient.enqueue("echo", "ignored", {
      idempotencyKey: enqueued[0]?.idempotencyKey,
    });
    assert.equal(again.requestId, enqueued[0]?.requestId);
    assert.ok(again.duplicate);
  } finally {
    patient.close();
    impatient.close();
  }
});
