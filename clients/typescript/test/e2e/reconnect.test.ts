import assert from "node:assert/strict";
import { test } from "node:test";
import { type Client, type Request, RequestStatus } from "../../src/index.js";
import { newClient, newUser, PASSWORD, TcpProxy, targets, waitUntil } from "./support.js";

async function mine(client: Client, clientRef: string): Promise<Request[]> {
  const found: Request[] = [];
  for await (const page of client.requests({ pageSize: 100 })) {
    found.push(...page.filter((r) => r.clientRef === clientRef));
  }
  return found;
}

test("Session: a stream broken before any answer is sent again, and the request runs once", async () => {
  const proxy = await TcpProxy.start(targets.queue);
  const direct = newClient();
  const client = newClient({ queue: proxy.target, reconnect: { baseBackoffMs: 50 } });
  try {
    const username = await newUser(direct);
    await client.login(username, PASSWORD);
    const warm = client.session();
    await warm.submit("echo", "warm", { clientRef: "warm" }); // the connection is up
    await warm.close();

    // The request reaches the server and is stored; its answers are lost, then the
    // connection is cut. Whether it was stored the client cannot know: it sends it
    // again on a new stream with the same idempotency key and gets the stored one back.
    proxy.holdReplies();
    const session = client.session();
    const lost = session.submit("echo", "again", { clientRef: "lost" });
    await waitUntil(async () => (await mine(direct, "lost")).length === 1);
    assert.ok(proxy.cut() >= 1);
    const result = await lost;
    await session.close();

    assert.equal(result.status, RequestStatus.SUCCEEDED);
    assert.equal(new TextDecoder().decode(result.output), "again");
    const stored = await mine(direct, "lost");
    assert.equal(stored.length, 1);
    assert.equal(stored[0]?.requestId, result.requestId);
    assert.equal((await direct.lane()).lastLaneSeq, 2n); // "warm" and "lost", once each
  } finally {
    client.close();
    direct.close();
    await proxy.close();
  }
});
