import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";
import { Code as ConnectCode, ConnectError } from "@connectrpc/connect";
import {
  ClientClosedError,
  Code,
  InvalidArgumentError,
  MAX_MESSAGE_BYTES,
  OutcomeUnknownError,
  RejectedError,
  type Result,
  type SessionEvent,
  UnavailableError,
} from "../../src/index.js";
import { clientOf, outcome, waitUntil, withQueue } from "./fake.js";

/** What each answer event names: the accepted or rejected enqueue's clientRef. */
function answers(events: SessionEvent[]): string[] {
  return events.flatMap((e) =>
    e.case === "accepted"
      ? [`accepted ${e.value.clientRef}`]
      : e.case === "rejected" && e.value.subject.case === "clientRef"
        ? [`rejected ${e.value.subject.value}`]
        : [],
  );
}

test("an enqueue over the message limit is refused alone, in its turn; the session goes on", async () => {
  await withQueue(async (queue, server) => {
    const client = clientOf(server);
    try {
      queue.holdResults = true;
      const events: SessionEvent[] = [];
      const session = client.session({ onEvent: (event) => events.push(event) });
      const before = [0, 1, 2].map((i) => session.submit("sleep", "0.5", { clientRef: `b${i}` }));
      await waitUntil(() => queue.received.length === 3); // accepted, running
      const big = session.submit("echo", new Uint8Array(9 * 1024 * 1024), { clientRef: "big" });
      const after = [0, 1].map((i) => session.submit("echo", `after ${i}`, { clientRef: `a${i}` }));
      await waitUntil(() => queue.received.length === 5);
      queue.finishAll();
      await session.close();

      const results = await Promise.all([...before, ...after]);
      assert.deepEqual(
        results.map((r) => r.clientRef),
        ["b0", "b1", "b2", "a0", "a1"],
      );
      await assert.rejects(big, (error: unknown) => {
        assert.ok(error instanceof RejectedError);
        assert.equal(error.code, Code.InvalidArgument);
        assert.equal(error.clientRef, "big");
        assert.match(error.message, /the request is 943\d{4} bytes serialized/);
        assert.match(error.message, /payload 9437184 bytes/);
        assert.match(error.message, /over the 8388608-byte gRPC message limit \(8 MiB\)/);
        return true;
      });
      // Never sent; answered after the submits before it and before those after it.
      assert.ok(queue.received.every((r) => r.clientRef !== "big"));
      assert.deepEqual(answers(events), [
        "accepted b0",
        "accepted b1",
        "accepted b2",
        "rejected big",
        "accepted a0",
        "accepted a1",
      ]);
    } finally {
      client.close();
    }
  });
});

test("an enqueue exactly at the message limit goes; one byte over does not", async () => {
  await withQueue(async (queue, server) => {
    const client = clientOf(server);
    try {
      const session = client.session();
      // SessionRequest{enqueue}: 1 tag + 4 length bytes + EnqueueRequest; that is the
      // handler (6 bytes), the key (38), and the payload: 1 tag + 4 length bytes + n.
      const fixed = 1 + 4 + 6 + 38 + 1 + 4;
      const key = "k".repeat(36);
      const fits = session.submit("echo", new Uint8Array(MAX_MESSAGE_BYTES - fixed), {
        idempotencyKey: key,
      });
      const over = session.submit("echo", new Uint8Array(MAX_MESSAGE_BYTES - fixed + 1), {
        idempotencyKey: `${key}x`.slice(1),
      });
      await session.close();
      assert.equal((await fits).laneSeq, 1n);
      await assert.rejects(over, RejectedError);
      assert.equal(queue.received.length, 1);
    } finally {
      client.close();
    }
  });
});

test("a value that cannot be encoded throws InvalidArgumentError from submit(); the session goes on", async () => {
  await withQueue(async (queue, server) => {
    const client = clientOf(server);
    try {
      const session = client.session();
      const first = session.submit("echo", "x", { clientRef: "first" });
      const bad: [string, object][] = [
        ["maxAttempts -1", { maxAttempts: -1 }],
        ["maxAttempts NaN", { maxAttempts: Number.NaN }],
        ["maxAttempts 1.5", { maxAttempts: 1.5 }],
        ["maxAttempts 2**40", { maxAttempts: 2 ** 40 }],
        ["invalid Date", { deadline: new Date(Number.NaN) }],
        ["year 275760", { deadline: new Date(8.64e15) }],
        ["year 0", { deadline: new Date("0000-06-01T00:00:00Z") }],
        ["deadline a number", { deadline: 5 }],
        ["clientRef a number", { clientRef: 7 }],
      ];
      for (const [what, options] of bad) {
        assert.throws(
          () => session.submit("echo", "x", options),
          (error: unknown) => {
            assert.ok(error instanceof InvalidArgumentError, `${what}: ${String(error)}`);
            assert.equal(error.code, Code.InvalidArgument);
            return true;
          },
          what,
        );
      }
      assert.throws(
        () => session.submit("echo", "x", { maxAttempts: -1 }),
        /maxAttempts must be from 0 to 4294967295, not -1/,
      );
      assert.throws(
        () => session.submit("echo", "x", { maxAttempts: 1.5 }),
        /maxAttempts must be a whole number, not 1.5/,
      );
      assert.throws(
        () => session.submit("echo", "x", { deadline: new Date(8.64e15) }),
        /out of range \(it must fall in the years 1 to 9999\)/,
      );
      assert.throws(() => session.submit(42 as unknown as string), /handler must be a string/);
      const last = session.submit("echo", "y", {
        clientRef: "last",
        maxAttempts: 2 ** 32 - 1,
        deadline: new Date("9999-12-31T23:59:59.999Z"),
      });
      await session.close();
      assert.deepEqual(
        (await Promise.all([first, last])).map((r: Result) => r.clientRef),
        ["first", "last"],
      );
      assert.equal(queue.received.length, 2);
      assert.equal(queue.received[1]?.maxAttempts, 2 ** 32 - 1);
    } finally {
      client.close();
    }
  });
});

test("maxInFlight that is not a whole number of at least 1 is refused", async () => {
  await withQueue(async (_queue, server) => {
    const client = clientOf(server);
    try {
      for (const bad of [0, -1, Number.NaN, 0.5, 1.5, "2"]) {
        assert.throws(
          () => client.session({ maxInFlight: bad as number }),
          (error: unknown) =>
            error instanceof InvalidArgumentError &&
            /maxInFlight must be a whole number of at least 1/.test(error.message),
          String(bad),
        );
      }
      for (const good of [1, Number.POSITIVE_INFINITY]) {
        const session = client.session({ maxInFlight: good });
        const done = [session.submit("echo", "a"), session.submit("echo", "b")];
        await session.close();
        assert.equal((await Promise.all(done)).length, 2);
      }
    } finally {
      client.close();
    }
  });
});

test("a stream that breaks with any code collects accepted results through WatchResults", async () => {
  await withQueue(async (queue, server) => {
    const client = clientOf(server);
    try {
      queue.holdResults = true;
      // Not UNAVAILABLE: the old client resumed only for a few codes and failed the rest.
      queue.breakSession = {
        afterAccepted: 2,
        error: new ConnectError("too big", ConnectCode.ResourceExhausted),
      };
      const session = client.session();
      const accepted = [session.submit("echo", "a"), session.submit("echo", "b")];
      await waitUntil(() => queue.received.length === 2);
      await waitUntil(() => (queue.open.get("watchResults") ?? 0) === 1);
      queue.finishAll();
      const results = await Promise.all(accepted);
      assert.deepEqual(
        results.map((r) => r.laneSeq),
        [1n, 2n],
      );
      await session.close();
    } finally {
      client.close();
    }
  });
});

test("a stream reset by the peer (CANCELLED) ends unanswered submits with UnavailableError", async () => {
  await withQueue(async (queue, server) => {
    const client = clientOf(server);
    try {
      queue.breakSession = {
        afterAccepted: 1,
        error: new ConnectError(
          "http/2 stream closed with error code CANCEL",
          ConnectCode.Canceled,
        ),
      };
      let answered = 0;
      const session = client.session({ onEvent: () => answered++ });
      const first = session.submit("echo", "a");
      await waitUntil(() => answered >= 1);
      const second = session.submit("echo", "b");
      assert.equal((await first).laneSeq, 1n);
      await assert.rejects(second, UnavailableError);
      await assert.rejects(session.close(), UnavailableError);
    } finally {
      client.close();
    }
  });
});

test("submit() tells the idempotency key it sent; a resend under it is the same request", async () => {
  await withQueue(async (queue, server) => {
    const client = clientOf(server);
    try {
      const session = client.session();
      const generated = session.submit("echo", "a");
      const given = session.submit("echo", "b", { idempotencyKey: "mine-1" });
      assert.match(generated.idempotencyKey, /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-/);
      assert.equal(given.idempotencyKey, "mine-1");
      const first = await generated;
      await given;
      await session.close();
      assert.deepEqual(
        queue.received.map((r) => r.idempotencyKey),
        [generated.idempotencyKey, "mine-1"],
      );
      // What a caller does with a submit whose outcome it never learned.
      const resent = await client.enqueue("echo", "a", {
        idempotencyKey: generated.idempotencyKey,
      });
      assert.deepEqual([resent.requestId, resent.duplicate], [first.requestId, true]);
      // A submit refused before it is sent carries its key too.
      await assert.rejects(session.submit("echo", "c", { idempotencyKey: "late" }));
      assert.equal(session.submit("echo", "d", { idempotencyKey: "late" }).idempotencyKey, "late");
    } finally {
      client.close();
    }
  });
});

test("accepted requests whose results cannot be collected fail with OutcomeUnknownError", async () => {
  await withQueue(async (queue, server) => {
    const client = clientOf(server, { reconnect: { maxAttempts: 2, baseBackoffMs: 1 } });
    try {
      queue.holdResults = true;
      queue.breakSession = {
        afterAccepted: 2,
        error: new ConnectError("connect ECONNREFUSED", ConnectCode.Unavailable),
      };
      queue.watchError = new ConnectError("connect ECONNREFUSED", ConnectCode.Unavailable);
      const session = client.session();
      const accepted = [session.submit("echo", "a"), session.submit("echo", "b")];
      await assert.rejects(session.close(), UnavailableError);
      for (const [i, promise] of accepted.entries()) {
        await assert.rejects(promise, (error: unknown) => {
          assert.ok(error instanceof OutcomeUnknownError, String(error));
          assert.equal(error.accepted, true);
          assert.equal(error.requestId, `req-${i + 1}`);
          assert.equal(error.code, Code.Unavailable);
          assert.ok(error.reason instanceof UnavailableError);
          assert.match(error.message, new RegExp(`request req-${i + 1} was accepted`));
          assert.match(error.message, /outcome is unknown/);
          return true;
        });
      }
    } finally {
      client.close();
    }
  });
});

test("abort() and resume: false never report an accepted request failed", async () => {
  await withQueue(async (queue, server) => {
    const client = clientOf(server);
    try {
      queue.holdResults = true;
      let answered = 0;
      const aborted = client.session({ onEvent: () => answered++ });
      const running = aborted.submit("echo", "a");
      await waitUntil(() => answered === 1); // accepted, not finished
      aborted.abort();
      await aborted.close();
      const error = await running.then(
        () => undefined,
        (e: unknown) => e,
      );
      assert.ok(error instanceof OutcomeUnknownError, String(error));
      assert.equal(error.requestId, "req-1");

      queue.breakSession = {
        afterAccepted: 2,
        error: new ConnectError("gone", ConnectCode.Unavailable),
      };
      const noResume = client.session({ resume: false });
      const both = [noResume.submit("echo", "b"), noResume.submit("echo", "c")];
      await assert.rejects(noResume.close(), UnavailableError);
      assert.deepEqual(await Promise.all(both.map(outcome)), [
        "OutcomeUnknownError",
        "OutcomeUnknownError",
      ]);
    } finally {
      client.close();
    }
  });
});

test("Client.close() ends an open Session: unanswered ClientClosedError, accepted OutcomeUnknownError", async () => {
  await withQueue(async (queue, server) => {
    const client = clientOf(server);
    queue.holdResults = true;
    let answered = 0;
    const session = client.session({ maxInFlight: 1, onEvent: () => answered++ });
    const accepted = session.submit("echo", "a");
    const waiting = session.submit("echo", "b"); // the window is full: never sent
    await waitUntil(() => answered === 1);
    client.close();
    await assert.rejects(session.close(), ClientClosedError);
    await assert.rejects(accepted, (error: unknown) => {
      assert.ok(error instanceof OutcomeUnknownError, String(error));
      assert.ok(error.reason instanceof ClientClosedError);
      return true;
    });
    await assert.rejects(waiting, ClientClosedError);
    await assert.rejects(session.submit("echo", "c"), ClientClosedError);
    assert.throws(() => client.session(), ClientClosedError);
    await waitUntil(() => (queue.open.get("session") ?? 0) === 0);
    assert.equal(queue.received.length, 1);
  });
});

test("session.ts does not import client.ts (no import cycle)", () => {
  const source = readFileSync(new URL("../../../src/session.ts", import.meta.url), "utf8");
  assert.doesNotMatch(source, /from "\.\/client\.js"/);
});
