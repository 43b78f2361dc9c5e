import assert from "node:assert/strict";
import { test } from "node:test";
import { Code, errorForCode, FairlaneError } from "../../src/errors.js";
import { DEFAULT_RETRY, retryDelay } from "../../src/retry.js";

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
