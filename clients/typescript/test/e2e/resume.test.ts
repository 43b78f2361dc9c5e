import assert from "node:assert/strict";
import { test } from "node:test";
import { RequestStatus, type Result, SessionClosedError } from "../../src/index.js";
import { newClient, newUser, restartQueue, waitUntil } from "./support.js";

test("Session: accepted requests resolve after the queue replica is killed", async () => {
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
    const settled: boolean[] = [];
    const promises: Promise<Result>[] = [];
    for (let i = 0; i < 10; i++) {
      const promise = session.submit("sleep", "0.2", { clientRef: `s${i}` });
      promise.then(
        () => {
          settled[i] = true;
        },
        () => {
          settled[i] = true;
        },
      );
      promises.push(promise);
    }
    await promises[0];
    await waitUntil(() => accepted === 10);
    // The replica owning the stream dies mid-session; another one comes up.
    assert.notEqual(settled[9], true);
    await restartQueue();
    await session.close();

    // Every accepted request still resolved, from WatchResults on the new replica.
    const results = await Promise.all(promises);
    assert.deepEqual(
      results.map((r) => r.clientRef),
      promises.map((_, i) => `s${i}`),
    );
    assert.deepEqual(
      results.map((r) => r.laneSeq),
      promises.map((_, i) => BigInt(i + 1)),
    );
    assert.ok(results.every((r) => r.status === RequestStatus.SUCCEEDED));
    await assert.rejects(session.submit("echo"), SessionClosedError);
  } finally {
    client.close();
  }
});
