import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { test } from "node:test";
import { fileURLToPath } from "node:url";
import { Code as ConnectCode, ConnectError } from "@connectrpc/connect";
import {
  Client,
  ClientClosedError,
  Code,
  FairlaneError,
  InvalidArgumentError,
  MAX_TIMEOUT_MS,
  type RetryEvent,
  toFairlaneError,
} from "../../src/index.js";
import { DEFAULT_RETRY, retryDelay } from "../../src/retry.js";
import { clientOf, tokens, waitUntil, withQueue } from "./fake.js";

/** Node's process warnings (TimeoutOverflowWarning, ...) emitted while `body` runs. */
async function warningsDuring(body: () => Promise<void>): Promise<string[]> {
  const warnings: string[] = [];
  const listener = (warning: Error): void => {
    warnings.push(`${warning.name}: ${warning.message}`);
  };
  process.on("warning", listener);
  try {
    await body();
    await new Promise((resolve) => setImmediate(resolve)); // warnings are emitted on next tick
  } finally {
    process.off("warning", listener);
  }
  return warnings;
}

test("timeoutMs: Infinity is no deadline; NaN, 0 and negative are refused; huge ones are capped", async () => {
  await withQueue(async (queue, server) => {
    for (const bad of [Number.NaN, 0, -1, Number.NEGATIVE_INFINITY, "10" as unknown as number]) {
      assert.throws(
        () => clientOf(server, { timeoutMs: bad }),
        (error: unknown) =>
          error instanceof InvalidArgumentError && /timeoutMs must be a number/.test(error.message),
        String(bad),
      );
    }
    queue.whoAmIDelayMs = 50;
    const warnings = await warningsDuring(async () => {
      const forever = clientOf(server, { timeoutMs: Number.POSITIVE_INFINITY });
      const long = clientOf(server, { timeoutMs: 1e12 });
      try {
        assert.equal(forever.timeoutMs, Number.POSITIVE_INFINITY);
        assert.equal(long.timeoutMs, MAX_TIMEOUT_MS);
        assert.equal((await forever.whoami()).username, "alice");
        assert.equal((await long.whoami()).username, "alice");
      } finally {
        forever.close();
        long.close();
      }
    });
    assert.deepEqual(warnings, []);
    // No grpc-timeout for none; a capped one fits the header's 8 digits.
    assert.equal(queue.timeouts[0], null);
    assert.match(queue.timeouts[1] ?? "", /^\d{1,8}m$/);
  });
});

test("retry, reconnect and refreshMarginMs options that make no sense are refused", () => {
  const targets = { auth: "127.0.0.1:1", queue: "127.0.0.1:1" };
  for (const options of [
    { retry: { maxAttempts: 0 } },
    { retry: { maxAttempts: 1.5 } },
    { retry: { baseBackoffMs: Number.NaN } },
    { reconnect: { maxBackoffMs: Number.POSITIVE_INFINITY } },
    { reconnect: { baseBackoffMs: -1 } },
    { retry: { maxServerDelayMs: Number.NaN } },
    { refreshMarginMs: -5 },
  ]) {
    assert.throws(
      () => new Client({ ...targets, ...options }),
      InvalidArgumentError,
      JSON.stringify(options),
    );
  }
  const client = new Client({ ...targets, reconnect: { maxAttempts: Number.POSITIVE_INFINITY } });
  assert.equal(client.reconnect.maxAttempts, Number.POSITIVE_INFINITY);
  client.close();
});

test("unary enqueue: a value that cannot be sent rejects with InvalidArgumentError at once, never retried", async () => {
  await withQueue(async (queue, server) => {
    const retries: RetryEvent[] = [];
    const client = clientOf(server, { onRetry: (event) => retries.push(event) });
    try {
      const started = Date.now();
      await assert.rejects(
        client.enqueue("echo", new Uint8Array(9 * 1024 * 1024)),
        (error: unknown) => {
          assert.ok(error instanceof InvalidArgumentError, String(error));
          assert.equal(error.code, Code.InvalidArgument);
          assert.match(error.message, /over the 8388608-byte gRPC message limit/);
          return true;
        },
      );
      assert.ok(Date.now() - started < 1_000);
      for (const options of [
        { maxAttempts: -1 },
        { maxAttempts: Number.NaN },
        { maxAttempts: 1.5 },
        { maxAttempts: 2 ** 40 },
        { deadline: new Date(Number.NaN) },
        { deadline: new Date(8.64e15) },
      ]) {
        await assert.rejects(client.enqueue("echo", "x", options), InvalidArgumentError);
      }
      assert.deepEqual(retries, []);
      assert.equal(queue.enqueueCalls, 0);
      const ok = await client.enqueue("echo", "x", { maxAttempts: 3 });
      assert.equal(ok.requestId, "req-1");
    } finally {
      client.close();
    }
  });
});

test("the transport's own size refusal is InvalidArgumentError, not a retried RESOURCE_EXHAUSTED", () => {
  const error = toFairlaneError(
    new ConnectError(
      "message size 9437243 is larger than configured writeMaxBytes 8388608",
      ConnectCode.ResourceExhausted,
    ),
  );
  assert.ok(error instanceof InvalidArgumentError);
  assert.match(error.message, /9437243 bytes serialized, over the 8388608-byte/);
  assert.equal(retryDelay(DEFAULT_RETRY, 1, error, true), undefined);
  // The server's RESOURCE_EXHAUSTED is still retried.
  const server = toFairlaneError(new ConnectError("slow down", ConnectCode.ResourceExhausted));
  assert.notEqual(retryDelay(DEFAULT_RETRY, 1, server, true), undefined);
});

test("Client.close() ends calls in flight and open watches, refuses new calls, drops connections", async () => {
  await withQueue(async (queue, server) => {
    const client = clientOf(server);
    queue.whoAmIDelayMs = 60_000;
    const results: bigint[] = [];
    await client.enqueue("echo", "before"); // one stored result for the watch
    const watching = (async () => {
      for await (const result of client.watch(0n)) {
        results.push(result.laneSeq);
      }
    })();
    const inFlight = client.whoami();
    await waitUntil(() => results.length === 1 && queue.open.get("whoAmI") === 1);
    assert.equal(queue.open.get("watchResults"), 1);

    client.close();
    assert.equal(client.closed, true);
    await assert.rejects(watching, ClientClosedError);
    await assert.rejects(inFlight, ClientClosedError);
    for (const call of [
      () => client.whoami(),
      () => client.enqueue("echo", "after"),
      () => client.get("req-1"),
      () => client.accessToken(),
    ]) {
      await assert.rejects(call(), (error: unknown) => {
        assert.ok(error instanceof ClientClosedError);
        assert.ok(error instanceof FairlaneError);
        assert.equal(error.message, "the client is closed");
        return true;
      });
    }
    await assert.rejects(client.watch().next(), ClientClosedError);
    assert.throws(() => client.queueService, ClientClosedError);
    assert.throws(() => client.session(), ClientClosedError);
    await waitUntil(() => server.connections === 0);
    assert.equal(queue.open.get("watchResults"), 0);
    assert.equal(queue.enqueueCalls, 1);
    client.close(); // twice is fine
  });
});

test("stopping a watch early cancels its stream", async () => {
  await withQueue(async (queue, server) => {
    const client = clientOf(server);
    try {
      await client.enqueue("echo", "one");
      for await (const _ of client.watch(0n)) {
        break;
      }
      await waitUntil(() => queue.open.get("watchResults") === 0);
    } finally {
      client.close();
    }
  });
});

test("a program that closes its client with a watch and a Session open exits by itself", async () => {
  await withQueue(async (queue, server) => {
    queue.holdResults = true; // the submit stays accepted and unfinished
    const child = spawn(
      process.execPath,
      [fileURLToPath(new URL("../fixtures/close-child.js", import.meta.url))],
      {
        env: {
          ...process.env,
          FAIRLANE_AUTH_TARGET: server.target,
          FAIRLANE_QUEUE_TARGET: server.target,
          FAIRLANE_TEST_TOKENS: JSON.stringify(tokens()),
        },
        stdio: ["ignore", "pipe", "pipe"],
      },
    );
    let output = "";
    child.stdout.on("data", (chunk: Buffer) => {
      output += chunk.toString();
    });
    child.stderr.on("data", (chunk: Buffer) => {
      output += chunk.toString();
    });
    const exited = new Promise<number | null>((resolve) => child.on("exit", resolve));
    const timer = setTimeout(() => child.kill("SIGKILL"), 15_000);
    const code = await exited;
    clearTimeout(timer);
    assert.equal(code, 0, `the child did not exit by itself:\n${output}`);
    assert.deepEqual(JSON.parse(output.trim()), [
      "ClientClosedError",
      "OutcomeUnknownError",
      "ClientClosedError",
    ]);
    assert.equal(queue.received.length, 1);
  });
});
