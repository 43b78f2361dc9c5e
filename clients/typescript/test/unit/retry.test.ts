import assert from "node:assert/strict";
import { test } from "node:test";
import { Code, errorForCode, FairlaneError } from "../../src/errors.js";
import { DEFAULT_RETRY, retryDelay, STREAM_RECONNECT, sleep } from "../../src/retry.js";

function errorWith(code: Code, retryAfterMs: number | undefined): FairlaneError {
  return errorForCode(code, "refused", { retryAfterMs });
}

const half = (): number => 0.5;

test("the server's delay comes first, jitter on top, never earlier", () => {
  const error = errorWith(Code.ResourceExhausted, 300);
  assert.equal(retryDelay(DEFAULT_RETRY, 1, error, false, half), 300 + 50);
  assert.equal(retryDelay(DEFAULT_RETRY, 3, error, false, half), 300 + 200);
  assert.equal(
    retryDelay(DEFAULT_RETRY, 1, error, false, () => 0),
    300,
  );
});

test("without RetryInfo only idempotent calls are retried", () => {
  const bare = errorWith(Code.Unavailable, undefined);
  assert.equal(retryDelay(DEFAULT_RETRY, 1, bare, false, half), undefined);
  assert.equal(retryDelay(DEFAULT_RETRY, 1, bare, true, half), 50);
});

test("a CANCELLED from the peer is retried only when idempotent", () => {
  const reset = errorWith(Code.Canceled, undefined);
  assert.equal(retryDelay(DEFAULT_RETRY, 1, reset, true, half), 50);
  assert.equal(retryDelay(DEFAULT_RETRY, 1, reset, false, half), undefined);
  assert.equal(retryDelay(DEFAULT_RETRY, DEFAULT_RETRY.maxAttempts, reset, true, half), undefined);
});

test("other codes, exhausted attempts and huge server delays give up", () => {
  assert.equal(
    retryDelay(DEFAULT_RETRY, 1, new FairlaneError("x", Code.InvalidArgument), true),
    undefined,
  );
  const error = errorWith(Code.Unavailable, 10);
  assert.equal(retryDelay(DEFAULT_RETRY, DEFAULT_RETRY.maxAttempts, error, true), undefined);
  const far = errorWith(Code.Unavailable, DEFAULT_RETRY.maxServerDelayMs + 1);
  assert.equal(retryDelay(DEFAULT_RETRY, 1, far, true), undefined);
});

test("the backoff cap stops growing at maxBackoffMs", () => {
  const bare = errorWith(Code.Unavailable, undefined);
  assert.equal(
    retryDelay({ ...DEFAULT_RETRY, maxAttempts: 100 }, 60, bare, true, () => 1),
    5_000,
  );
});

test("the reconnect budget: 9 waits, 27.75 s at most, 13.875 s on average (as documented)", () => {
  const bare = errorWith(Code.Unavailable, undefined);
  const waits = (random: () => number): number[] => {
    const out: number[] = [];
    for (let failures = 1; ; failures++) {
      const wait = retryDelay(STREAM_RECONNECT, failures, bare, true, random);
      if (wait === undefined) {
        return out;
      }
      out.push(wait);
    }
  };
  const sum = (values: number[]): number => values.reduce((a, b) => a + b, 0);
  assert.equal(waits(() => 1).length, 9);
  assert.equal(sum(waits(() => 1)), 27_750);
  // Full jitter: each wait is uniform between 0 and its cap, so the mean is half the cap.
  assert.equal(sum(waits(() => 0.5)), 13_875);
});

test("sleep: a delay past Node's timer limit neither fires at once nor warns", async () => {
  const warnings: string[] = [];
  const listener = (warning: Error): void => {
    warnings.push(warning.name);
  };
  process.on("warning", listener);
  try {
    const controller = new AbortController();
    let settled = false;
    const waiting = sleep(2 ** 31 + 10, controller.signal).then(
      () => {
        settled = true;
      },
      (reason: unknown) => reason,
    );
    await new Promise((resolve) => setTimeout(resolve, 20));
    assert.equal(settled, false);
    controller.abort("stop");
    assert.equal(await waiting, "stop");
    await new Promise((resolve) => setImmediate(resolve));
  } finally {
    process.off("warning", listener);
  }
  assert.deepEqual(warnings, []);
});
