/**
 * Bounded retries with full jitter that honour the server's RetryInfo delay (the same
 * policy as the Python client's RetryPolicy).
 */
import { Code, type FairlaneError, InvalidArgumentError } from "./errors.js";

export interface RetryPolicy {
  /** Attempts in all, the first included; 1 disables retries. */
  maxAttempts: number;
  /** Full-jitter backoff after attempt n: uniform(0, min(maxBackoffMs, baseBackoffMs * 2^(n-1))). */
  baseBackoffMs: number;
  maxBackoffMs: number;
  /** A server delay above this is not waited for: the error is raised. */
  maxServerDelayMs: number;
}

/** Unary calls: 5 attempts. */
export const DEFAULT_RETRY: RetryPolicy = {
  maxAttempts: 5,
  baseBackoffMs: 100,
  maxBackoffMs: 5_000,
  maxServerDelayMs: 30_000,
};

/**
 * Reopening WatchResults (and a Session stream broken before its first answer): 10
 * attempts in a row, so 9 waits, each uniform between 0 and its cap (0.25, 0.5, 1, 2, 4,
 * then 5 s four times): 27.75 s at most, about 13.9 s on average, plus the time the
 * attempts themselves take (a replica restart takes seconds).
 */
export const STREAM_RECONNECT: RetryPolicy = {
  maxAttempts: 10,
  baseBackoffMs: 250,
  maxBackoffMs: 5_000,
  maxServerDelayMs: 30_000,
};

/**
 * `policy` if every field makes sense (maxAttempts a whole number of at least 1, or
 * Infinity; backoffs finite and not negative; maxServerDelayMs not negative), else
 * InvalidArgumentError naming the option.
 */
export function checkPolicy(name: string, policy: RetryPolicy): RetryPolicy {
  const bad = (field: string, rule: string, value: unknown): InvalidArgumentError =>
    new InvalidArgumentError(
      `${name}.${field} must be ${rule}, not ${String(value)}`,
      Code.InvalidArgument,
    );
  const { maxAttempts, baseBackoffMs, maxBackoffMs, maxServerDelayMs } = policy;
  if (
    typeof maxAttempts !== "number" ||
    !(
      maxAttempts === Number.POSITIVE_INFINITY ||
      (Number.isInteger(maxAttempts) && maxAttempts >= 1)
    )
  ) {
    throw bad("maxAttempts", "a whole number of at least 1 (or Infinity)", maxAttempts);
  }
  for (const [field, value] of [
    ["baseBackoffMs", baseBackoffMs],
    ["maxBackoffMs", maxBackoffMs],
  ] as const) {
    if (typeof value !== "number" || !Number.isFinite(value) || value < 0) {
      throw bad(field, "a finite number of milliseconds, 0 or more", value);
    }
  }
  if (
    typeof maxServerDelayMs !== "number" ||
    Number.isNaN(maxServerDelayMs) ||
    maxServerDelayMs < 0
  ) {
    throw bad("maxServerDelayMs", "a number of milliseconds, 0 or more", maxServerDelayMs);
  }
  return policy;
}

const RETRYABLE = new Set<Code>([Code.ResourceExhausted, Code.Unavailable]);
/**
 * A unary call here takes no AbortSignal, so CANCELLED came from the other side: a stream
 * reset on the way, or a server refusing the call under a burst before it ran. It may also
 * have cut a call that had acted, so only idempotent calls try again.
 */
const RETRYABLE_IF_IDEMPOTENT = new Set<Code>([Code.Canceled]);

/**
 * Milliseconds to wait before attempt `attempt + 1`, or undefined to give up.
 *
 * Only RESOURCE_EXHAUSTED and UNAVAILABLE are retried (and CANCELLED from the peer, for
 * idempotent calls, after the backoff alone). The wait is the server's delay
 * (if it sent one) plus the jittered backoff, so a client never comes back earlier than
 * asked and clients told the same delay do not all come back at once. A call that is not
 * idempotent is retried only when the server sent RetryInfo, which it does only when it
 * refused the call before doing anything: a bare UNAVAILABLE may come from a connection
 * cut after the server acted.
 */
export function retryDelay(
  policy: RetryPolicy,
  attempt: number,
  error: FairlaneError,
  idempotent: boolean,
  random: () => number = Math.random,
): number | undefined {
  if (attempt >= policy.maxAttempts) {
    return undefined;
  }
  const cap = Math.min(policy.maxBackoffMs, policy.baseBackoffMs * 2 ** (attempt - 1));
  if (RETRYABLE_IF_IDEMPOTENT.has(error.code)) {
    return idempotent ? random() * cap : undefined;
  }
  if (!RETRYABLE.has(error.code)) {
    return undefined;
  }
  const backoff = random() * cap;
  if (error.retryAfterMs === undefined) {
    return idempotent ? backoff : undefined;
  }
  if (error.retryAfterMs > policy.maxServerDelayMs) {
    return undefined;
  }
  return error.retryAfterMs + backoff;
}

/** The longest delay one Node timer takes (a longer one fires at once, with a warning). */
export const MAX_TIMER_MS = 2 ** 31 - 1;

/**
 * Resolves after `ms` (chained timers beyond MAX_TIMER_MS), or rejects with the signal's
 * reason once it aborts.
 */
export function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) {
      reject(signal.reason);
      return;
    }
    let left = Number.isFinite(ms) ? Math.max(0, ms) : MAX_TIMER_MS;
    let timer: ReturnType<typeof setTimeout>;
    const onAbort = (): void => {
      clearTimeout(timer);
      reject(signal?.reason);
    };
    const wait = (): void => {
      const step = Math.min(left, MAX_TIMER_MS);
      left -= step;
      timer = setTimeout(() => {
        if (left > 0) {
          wait();
          return;
        }
        signal?.removeEventListener("abort", onAbort);
        resolve();
      }, step);
    };
    wait();
    signal?.addEventListener("abort", onAbort, { once: true });
  });
}
