/**
 * Bounded retries with full jitter that honour the server's RetryInfo delay (the same
 * policy as the Python client's RetryPolicy).
 */
import { Code, type FairlaneError } from "./errors.js";

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

/** Reopening WatchResults: 10 attempts in a row, about 28 s of waits at most (a replica restart takes seconds). */
export const STREAM_RECONNECT: RetryPolicy = {
  maxAttempts: 10,
  baseBackoffMs: 250,
  maxBackoffMs: 5_000,
  maxServerDelayMs: 30_000,
};

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

/** Resolves after `ms`, or rejects with the signal's reason once it aborts. */
export function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) {
      reject(signal.reason);
      return;
    }
    const onAbort = (): void => {
      clearTimeout(timer);
      reject(signal?.reason);
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener("abort", onAbort);
      resolve();
    }, ms);
    signal?.addEventListener("abort", onAbort, { once: true });
  });
}
