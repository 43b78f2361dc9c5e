import assert from "node:assert/strict";
import { test } from "node:test";
import {
  Code,
  RejectedError,
  RequestStatus,
  type Result,
  type SessionEvent,
} from "../../src/index.js";
import { newClient, newUser } from "./support.js";

const text = (bytes: Uint8Array): string => new TextDecoder().decode(bytes);

test("Session: one promise per request, answered and resolved in lane order", async () => {
  const client = newClient();
  try {
    await newUser(client);
    const events: SessionEvent[] = [];
    const session = client.session({ onEvent: (event) => events.push(event) });
    const resolved: bigint[] = [];
    const track = (promise: Promise<Result>): Promise<Result> => {
      promise.then(
        (result) => resolved.push(result.laneSeq),
        () => undefined,
      );
      return promise;
    };
    const echoes: Promise<Result>[] = [];
    let bad: Promise<Result> | undefined;
    let slow: Promise<Result> | undefined;
    for (let i = 0; i < 30; i++) {
      if (i === 10) {
        bad = session.submit("no-such-handler", "x", { clientRef: "bad" });
      }
      if (i === 20) {
        slow = track(session.submit("sleep", "0.2", { clientRef: "slow" }));
      }
      echoes.push(track(session.submit("echo", `p${i}`, { clientRef: `r${i}` })));
    }
    await session.close();

    const results = await Promise.all(echoes);
    assert.deepEqual(
      results.map((r) => text(r.output)),
      echoes.map((_, i) => `p${i}`),
    );
    assert.ok(results.every((r) => r.status === RequestStatus.SUCCEEDED));
    assert.deepEqual(
      results.map((r) => r.clientRef),
      echoes.map((_, i) => `r${i}`),
    );
    const slowResult = await (slow as Promise<Result>);
    assert.equal(text(slowResult.output), "0.2");
    // FIFO: lane_seq 1..31 in submit order, the slow request between r19 and r20.
    const seqs = [...results.slice(0, 20), slowResult, ...results.slice(20)].map((r) => r.laneSeq);
    assert.deepEqual(
      seqs,
      Array.from({ length: 31 }, (_, i) => BigInt(i + 1)),
    );
    // The promises resolved in lane order.
    assert.deepEqual(resolved, seqs);
    assert.equal(session.lastLaneSeq, 31n);

    await assert.rejects(bad as Promise<Result>, (error: unknown) => {
      assert.ok(error instanceof RejectedError);
      assert.equal(error.code, Code.InvalidArgument);
      assert.equal(error.clientRef, "bad");
      assert.equal(error.retryAfterMs, undefined);
      assert.match(error.message, /unknown handler/);
      return true;
    });

    // Answers in submit order; each result after its accepted; progress in between.
    const answers = events.flatMap((e) =>
      e.case === "accepted"
        ? [e.value.clientRef]
        : e.case === "rejected" && e.value.subject.case === "clientRef"
          ? [e.value.subject.value]
          : [],
    );
    const expected = echoes.map((_, i) => `r${i}`);
    expected.splice(20, 0, "slow");
    expected.splice(10, 0, "bad");
    assert.deepEqual(answers, expected);
    const at = (kind: string, requestId: string): number =>
      events.findIndex(
        (e) =>
          (e.case === "accepted" && kind === "accepted" && e.value.requestId === requestId) ||
          (e.case === "result" && kind === "result" && e.value.requestId === requestId),
      );
    for (const r of [...results, slowResult]) {
      assert.ok(at("accepted", r.requestId) < at("result", r.requestId));
    }
    const progress = events.flatMap((e) => (e.case === "progress" ? [e.value] : []));
    assert.deepEqual(
      progress.map((p) => [p.done, p.total]),
      [
        [1n, 4n],
        [2n, 4n],
        [3n, 4n],
        [4n, 4n],
      ],
    );
    assert.ok(progress.every((p) => p.requestId === slowResult.requestId));
  } finally {
    client.close();
  }
});

test("Session: a repeated idempotency key is one request; a small window still runs all", async () => {
  const client = newClient();
  try {
    await newUser(client);
    const once = client.session();
    const first = once.submit("echo", "once", { idempotencyKey: "k1" });
    const again = once.submit("echo", "twice", { idempotencyKey: "k1" });
    await once.close();
    const [a, b] = await Promise.all([first, again]);
    assert.equal(a.requestId, b.requestId);
    assert.equal(text(b.output), "once");

    const narrow = client.session({ maxInFlight: 2 });
    const small = Array.from({ length: 6 }, (_, i) => narrow.submit("echo", String(i)));
    assert.equal(narrow.inFlight, 6);
    await narrow.close();
    const outputs = (await Promise.all(small)).map((r) => text(r.output));
    assert.deepEqual(outputs, ["0", "1", "2", "3", "4", "5"]);
  } finally {
    client.close();
  }
});
