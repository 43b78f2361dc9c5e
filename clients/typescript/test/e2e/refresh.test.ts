import assert from "node:assert/strict";
import { test } from "node:test";
import { type Result, type Tokens, UnauthenticatedError } from "../../src/index.js";
import { newClient, newUser, PASSWORD, TOKEN_TTL_MS, waitUntil } from "./support.js";

const text = (bytes: Uint8Array): string => new TextDecoder().decode(bytes);

/** Tokens whose access token expired but that claim an hour of life, so the client only
 * learns of the expiry from the server's UNAUTHENTICATED. */
function stale(tokens: Tokens): Tokens {
  return { ...tokens, expiresAt: Date.now() + 3_600_000, lifetimeMs: 3_600_000 };
}

async function expired(tokens: Tokens): Promise<void> {
  await waitUntil(() => Date.now() > tokens.expiresAt + 500, TOKEN_TTL_MS + 10_000);
}

test("the access token is refreshed before it expires, and the refresh token rotates", async () => {
  const seen: (Tokens | undefined)[] = [];
  const client = newClient({ onTokens: (tokens) => seen.push(tokens) });
  try {
    const username = await newUser(client);
    const first = seen[0] as Tokens;
    assert.equal(first.lifetimeMs, TOKEN_TTL_MS);
    await expired(first);
    // Expired by now: refreshed before the call, not after a failure.
    assert.equal((await client.whoami()).username, username);
    assert.equal(seen.length, 2);
    const now = client.tokens as Tokens;
    assert.equal(seen[1], now);
    assert.notEqual(now.accessToken, first.accessToken);
    assert.notEqual(now.refreshToken, first.refreshToken);
    assert.equal(now.username, username);
    await client.logout();
    assert.equal(client.tokens, undefined);
    assert.equal(seen.at(-1), undefined);
  } finally {
    client.close();
  }
});

test("UNAUTHENTICATED from the server refreshes once: unary, Session and WatchResults", async () => {
  const owner = newClient();
  let logins: Tokens[];
  let username: string;
  try {
    username = await newUser(owner);
    // One login per case: refresh tokens rotate, so each case spends its own.
    logins = [
      await owner.login(username, PASSWORD),
      await owner.login(username, PASSWORD),
      await owner.login(username, PASSWORD),
    ];
  } finally {
    owner.close();
  }
  await expired(logins[2] as Tokens);

  // Unary: refused, refreshed, sent again.
  const old = logins[0] as Tokens;
  const unary = newClient({ tokens: stale(old) });
  let enqueued: string;
  try {
    enqueued = (await unary.enqueue("echo", "after refresh")).requestId;
    assert.notEqual(unary.tokens?.accessToken, old.accessToken);
  } finally {
    unary.close();
  }
  // The spent refresh token now revokes its whole login.
  const replay = newClient({ tokens: stale(old) });
  try {
    await assert.rejects(replay.whoami(), (error: unknown) => {
      assert.ok(error instanceof UnauthenticatedError);
      assert.match(error.message, /log in again/);
      return true;
    });
  } finally {
    replay.close();
  }

  // Session: refused at the start, reopened with the new token, everything sent again.
  const streamer = newClient({ tokens: stale(logins[1] as Tokens) });
  try {
    const session = streamer.session();
    const promises = [0, 1, 2].map((i) => session.submit("echo", `s${i}`));
    await session.close();
    assert.deepEqual(
      (await Promise.all(promises)).map((r) => text(r.output)),
      ["s0", "s1", "s2"],
    );
    assert.notEqual(streamer.tokens?.accessToken, logins[1]?.accessToken);
  } finally {
    streamer.close();
  }

  // WatchResults the same way.
  const watcher = newClient({ tokens: stale(logins[2] as Tokens) });
  try {
    const got: Result[] = [];
    for await (const result of watcher.watch()) {
      got.push(result);
      if (got.length === 4) {
        break;
      }
    }
    assert.deepEqual(
      got.map((r) => text(r.output)),
      ["after refresh", "s0", "s1", "s2"],
    );
    assert.equal(got[0]?.requestId, enqueued);
  } finally {
    watcher.close();
  }
});
