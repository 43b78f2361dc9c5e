import assert from "node:assert/strict";
import { test } from "node:test";
import { Code, NotFoundError, type Result, type SessionEvent } from "../../src/index.js";
import { newClient, newUser } from "./support.js";

const text = (bytes: Uint8Array): string => new TextDecoder().decode(bytes);

async function all<T>(pages: AsyncIterable<T[]>): Promise<T[]> {
  const items: T[] = [];
  for await (const page of pages) {
    items.push(...page);
  }
  return items;
}

test("users are isolated: another user's requests, results and lane are invisible", async () => {
  const alice = newClient();
  const bob = newClient();
  try {
    await newUser(alice);
    await newUser(bob);
    const aliceSession = alice.session();
    const secret = aliceSession.submit("echo", "alice's secret");
    await aliceSession.close();
    const hers = await secret;

    await assert.rejects(bob.get(hers.requestId), NotFoundError);
    await assert.rejects(bob.cancel(hers.requestId), NotFoundError);
    await assert.rejects(bob.lane(), NotFoundError);
    assert.deepEqual(await all(bob.requests()), []);

    const events: SessionEvent[] = [];
    const bobSession = bob.session({ onEvent: (event) => events.push(event) });
    bobSession.cancel(hers.requestId);
    const mine = bobSession.submit("echo", "bob's own");
    await bobSession.close();
    const his = await mine;
    assert.equal(his.laneSeq, 1n);
    const refused = events.flatMap((e) =>
      e.case === "rejected" && e.value.subject.case === "cancelRequestId" ? [e.value] : [],
    );
    assert.equal(refused.length, 1);
    assert.equal(refused[0]?.subject.value, hers.requestId);
    assert.equal(refused[0]?.code as number, Code.NotFound);

    const watched: Result[] = [];
    for await (const result of bob.watch()) {
      watched.push(result);
      break;
    }
    assert.deepEqual(
      watched.map((r) => text(r.output)),
      ["bob's own"],
    );
    assert.deepEqual(
      (await all(alice.requests())).map((r) => r.requestId),
      [hers.requestId],
    );
    assert.equal((await alice.get(hers.requestId)).requestId, hers.requestId);
    assert.equal((await bob.lane()).lastLaneSeq, 1n);
    assert.notEqual((await bob.lane()).userId, (await alice.lane()).userId);
  } finally {
    alice.close();
    bob.close();
  }
});
