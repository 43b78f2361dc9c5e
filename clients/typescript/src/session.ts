/**
 * A Session stream: one promise per submitted request, resolved with its Result. Results
 * arrive in lane order, so the promises resolve in lane order.
 */
import { randomUUID } from "node:crypto";
import { create } from "@bufbuild/protobuf";
import {
  type EnqueueOptions,
  enqueueMessage,
  enqueueSize,
  fieldSize,
  type Payload,
  tooLarge,
} from "./enqueue.js";
import {
  Code,
  type FairlaneError,
  InvalidArgumentError,
  OutcomeUnknownError,
  RejectedError,
  SessionClosedError,
  toFairlaneError,
  UnavailableError,
} from "./errors.js";
import type { Result } from "./gen/fairlane/common/v1/common_pb.js";
import {
  RejectedSchema,
  type SessionRequest,
  SessionRequestSchema,
  type SessionResponse,
} from "./gen/fairlane/queue/v1/queue_pb.js";
import { Code as RpcCode } from "./gen/google/rpc/code_pb.js";
import { MAX_BATCH_BYTES, MAX_BATCH_REQUESTS, Outbox } from "./outbox.js";
import { type RetryPolicy, retryDelay, sleep } from "./retry.js";

/** One server message of a Session, batches unwrapped: accepted, rejected, progress or result. */
export type SessionEvent = Exclude<
  SessionResponse["kind"],
  { case: "batch" } | { case: undefined }
>;

export interface SessionOptions {
  /**
   * Requests submitted and not finished that may be on the wire at once: a whole number,
   * at least 1, or Infinity (default 512). Further submits wait in the client until
   * earlier ones finish.
   */
  maxInFlight?: number;
  /** Collect accepted requests' results from WatchResults if the stream breaks (default true). */
  resume?: boolean;
  /** Every answer, progress report and result, in the order received. */
  onEvent?: (event: SessionEvent) => void;
}

export type SubmitOptions = EnqueueOptions;

/**
 * What `submit()` returns: the request's promise, with the idempotency key it was sent
 * under (yours, or the one generated). When the promise rejects with the stream's error,
 * whether the request was accepted is unknown: submit it again with this key, and one that
 * was stored comes back instead of running twice.
 */
export interface Submission extends Promise<Result> {
  readonly idempotencyKey: string;
}

/**
 * What a Session needs from the client that made it (Client provides it): tokens, the
 * Session and WatchResults calls, the reconnect policy, the message limit, and a signal
 * that aborts, with a ClientClosedError as its reason, when the client closes.
 */
export interface SessionHost {
  readonly reconnect: RetryPolicy;
  /** The largest message a call may send, in bytes. */
  readonly maxMessageBytes: number;
  /** Aborted when the client closes; its reason is the ClientClosedError to end with. */
  readonly closed: AbortSignal;
  accessToken(): Promise<string>;
  refreshAfter(staleAccessToken: string): Promise<void>;
  /** Opens a QueueService.Session call that sends `requests`. */
  openSession(
    requests: AsyncIterable<SessionRequest>,
    options: { token: string; signal: AbortSignal },
  ): AsyncIterable<SessionResponse>;
  /** The caller's results after `afterLaneSeq`, reconnecting (Client.watch). */
  watch(afterLaneSeq: bigint, options: { signal: AbortSignal }): AsyncIterable<Result>;
}

interface Pending {
  message: SessionRequest;
  /** Refused by the client itself (too large to send): never sent, answered in its turn. */
  refused: RejectedError | undefined;
  resolve: (result: Result) => void;
  reject: (error: FairlaneError) => void;
}

/** Before any answer, a stream that ended so is sent again on a new one. */
const REOPENABLE = new Set<Code>([Code.Unavailable, Code.Canceled]);

function checkMaxInFlight(value: unknown): number {
  if (
    typeof value !== "number" ||
    !(value === Number.POSITIVE_INFINITY || (Number.isInteger(value) && value >= 1))
  ) {
    throw new InvalidArgumentError(
      `maxInFlight must be a whole number of at least 1 (or Infinity), not ${String(value)}`,
      Code.InvalidArgument,
    );
  }
  return value;
}

export class Session {
  readonly #host: SessionHost;
  readonly #maxInFlight: number;
  readonly #maxMessageBytes: number;
  readonly #resume: boolean;
  readonly #onEvent: ((event: SessionEvent) => void) | undefined;
  /** Ends the stream: abort() (a SessionClosedError) or the client closing (ClientClosedError). */
  readonly #abort = new AbortController();
  readonly #unlinkClose: () => void;
  #outbox: Outbox;
  /** Submitted, not yet written: the window was full. */
  #waiting: Pending[] = [];
  /** Written (or refused by the client), not yet answered; answers come in this order. */
  #unanswered: Pending[] = [];
  /** Accepted, not yet finished (a repeated idempotency key maps several to one id). */
  #byRequest = new Map<string, Pending[]>();
  /** Cancels written before the first answer: resent if the stream is reopened. */
  #earlyCancels: SessionRequest[] = [];
  #inFlight = 0;
  #answeredAny = false;
  #closing = false;
  #finished = false;
  #error: FairlaneError | undefined;
  #lastLaneSeq = 0n;
  readonly #done: Promise<void>;

  /** Made by Client.session(). maxInFlight that is not a whole number >= 1 throws InvalidArgumentError. */
  constructor(host: SessionHost, options: SessionOptions = {}) {
    this.#maxInFlight = checkMaxInFlight(options.maxInFlight ?? 512);
    this.#host = host;
    this.#maxMessageBytes = host.maxMessageBytes;
    this.#outbox = this.#newOutbox();
    this.#resume = options.resume ?? true;
    this.#onEvent = options.onEvent;
    const onClose = (): void => this.#abort.abort(host.closed.reason);
    if (host.closed.aborted) {
      onClose();
    } else {
      host.closed.addEventListener("abort", onClose, { once: true });
    }
    this.#unlinkClose = () => host.closed.removeEventListener("abort", onClose);
    this.#done = this.#run();
    // close() reports the outcome; an unobserved failure must not crash the process.
    this.#done.catch(() => undefined);
  }

  /** The newest lane_seq this session has seen: resume WatchResults after it. */
  get lastLaneSeq(): bigint {
    return this.#lastLaneSeq;
  }

  /** Requests submitted and not finished. */
  get inFlight(): number {
    return this.#inFlight + this.#waiting.length;
  }

  /**
   * Submits one request. The promise resolves with its Result (whatever its status: check
   * `result.status`), or rejects with RejectedError if it was not accepted (by the server,
   * or by the client for an enqueue over the gRPC message limit, which is never sent), or
   * with the stream's error if the session broke before it was accepted. An accepted
   * request whose result cannot be collected rejects with OutcomeUnknownError. Rejections
   * are not resent automatically: that would reorder the lane.
   *
   * A value that cannot be sent (maxAttempts, deadline, ...) throws InvalidArgumentError
   * at once, and nothing is submitted.
   */
  submit(handler: string, payload?: Payload, options: SubmitOptions = {}): Submission {
    // Every enqueue carries a key (generated when the caller gave none): a stream reopened
    // before its answers sends it again, and the server must see the same one.
    const request = enqueueMessage(handler, payload, {
      ...options,
      idempotencyKey: options?.idempotencyKey ?? randomUUID(),
    });
    const key = request.idempotencyKey;
    if (this.#error !== undefined) {
      return submission(Promise.reject(this.#error), key);
    }
    if (this.#closing || this.#finished) {
      return submission(Promise.reject(new SessionClosedError("the session is closed")), key);
    }
    // gRPC would fail the whole stream for a message over its limit: refuse it here.
    const why = tooLarge(request, fieldSize(enqueueSize(request)), this.#maxMessageBytes);
    const refused =
      why === undefined
        ? undefined
        : new RejectedError(Code.InvalidArgument, why, undefined, request.clientRef);
    const message = create(SessionRequestSchema, { kind: { case: "enqueue", value: request } });
    const promise = new Promise<Result>((resolve, reject) => {
      this.#waiting.push({ message, refused, resolve, reject });
    });
    this.#pump();
    return submission(promise, key);
  }

  /**
   * Asks the server to cancel a queued or running request. If it was submitted on this
   * session, its promise resolves with a CANCELLED result. A refusal arrives only as a
   * `rejected` event whose subject is `cancelRequestId`; Client.cancel gives an answer.
   */
  cancel(requestId: string): void {
    if (typeof requestId !== "string") {
      throw new InvalidArgumentError(
        `requestId must be a string, not ${String(requestId)}`,
        Code.InvalidArgument,
      );
    }
    if (fieldSize(fieldSize(requestId.length * 3)) > this.#maxMessageBytes) {
      throw new InvalidArgumentError(
        `requestId is ${requestId.length} characters long, too long to send`,
        Code.InvalidArgument,
      );
    }
    if (this.#closing || this.#finished) {
      throw new SessionClosedError("the session is closed");
    }
    const message = create(SessionRequestSchema, {
      kind: { case: "cancel", value: { requestId } },
    });
    if (!this.#answeredAny) {
      this.#earlyCancels.push(message);
    }
    this.#outbox.push(message);
  }

  /**
   * Half-closes the stream once every submit is written, and resolves when every result
   * is in. Rejects with the stream's error if it broke and not every request could be
   * accounted for (their own promises say which).
   */
  close(): Promise<void> {
    this.#closing = true;
    this.#maybeHalfClose();
    return this.#done;
  }

  /**
   * Ends the stream at once. Unanswered promises reject with SessionClosedError; accepted
   * ones with OutcomeUnknownError (they still run: find them with watch() or get()).
   */
  abort(): void {
    this.#abort.abort(new SessionClosedError("the session was aborted"));
  }

  // -- sending -----------------------------------------------------------------------------

  #newOutbox(): Outbox {
    return new Outbox(MAX_BATCH_REQUESTS, Math.min(MAX_BATCH_BYTES, this.#maxMessageBytes));
  }

  /**
   * Moves waiting submits to the wire while the window has room, and answers the ones the
   * client refused itself once they are first in line (never before earlier submits).
   */
  #pump(): void {
    for (;;) {
      this.#answerRefused();
      if (this.#finished || this.#inFlight >= this.#maxInFlight) {
        break;
      }
      const next = this.#waiting.shift();
      if (next === undefined) {
        break;
      }
      this.#inFlight += 1;
      this.#unanswered.push(next);
      if (next.refused === undefined) {
        this.#outbox.push(next.message);
      }
    }
    this.#maybeHalfClose();
  }

  #answerRefused(): void {
    for (;;) {
      const head = this.#unanswered[0];
      const refused = head?.refused;
      if (head === undefined || refused === undefined) {
        return;
      }
      this.#unanswered.shift();
      this.#inFlight -= 1;
      head.reject(refused);
      this.#onEvent?.({
        case: "rejected",
        value: create(RejectedSchema, {
          subject: { case: "clientRef", value: refused.clientRef },
          code: RpcCode.INVALID_ARGUMENT,
          message: refused.message,
        }),
      });
    }
  }

  #maybeHalfClose(): void {
    if (this.#closing && this.#waiting.length === 0) {
      this.#outbox.close();
    }
  }

  // -- receiving ---------------------------------------------------------------------------

  async #run(): Promise<void> {
    let reauthenticated = false;
    let reconnects = 0;
    let token: string;
    try {
      token = await this.#host.accessToken();
    } catch (thrown) {
      if (this.#abort.signal.aborted) {
        this.#stopped();
      } else {
        this.#finish(toFairlaneError(thrown));
      }
      if (this.#error !== undefined) {
        throw this.#error;
      }
      return;
    }
    for (;;) {
      let error: FairlaneError;
      try {
        const responses = this.#host.openSession(this.#outbox, {
          token,
          signal: this.#abort.signal,
        });
        for await (const response of responses) {
          this.#handle(response);
        }
        if (this.#byRequest.size === 0 && !this.#unanswered.some((p) => !p.refused)) {
          this.#finish(undefined);
          break;
        }
        // A server ends the stream only once it has answered everything: this one broke off.
        error = new UnavailableError(
          "the server ended the session stream before answering every request",
          Code.Unavailable,
        );
      } catch (thrown) {
        error = toFairlaneError(thrown);
      }
      if (this.#abort.signal.aborted) {
        this.#stopped();
        break;
      }
      if (error.code === Code.Canceled) {
        // Not our signal (checked above): the peer reset the stream, e.g. a queue replica
        // killed mid-session, or a busy server refusing the call before it ran.
        error = new UnavailableError(error.message, Code.Unavailable, { cause: error });
      }
      if (error.code === Code.Unauthenticated && !this.#answeredAny && !reauthenticated) {
        // Refused before answering anything: refresh and send it all again.
        reauthenticated = true;
        try {
          await this.#host.refreshAfter(token);
          token = await this.#host.accessToken();
        } catch (refreshError) {
          if (this.#abort.signal.aborted) {
            this.#stopped();
          } else {
            this.#finish(toFairlaneError(refreshError));
          }
          break;
        }
        this.#reopen();
        continue;
      }
      if (REOPENABLE.has(error.code) && !this.#answeredAny) {
        // Broken before the server answered anything: most often the stream went out on
        // a connection that had just dropped, and the next one can meet it too; or a
        // busy server cancelled the call before it ran it (our own abort is handled
        // above). Send it all again on a new stream after the reconnect policy's
        // backoff, as often as that policy allows (every enqueue carries an idempotency
        // key: nothing runs twice); then the error stands.
        reconnects += 1;
        const wait = retryDelay(this.#host.reconnect, reconnects, error, true);
        if (wait !== undefined) {
          try {
            await sleep(wait, this.#abort.signal);
          } catch {
            this.#stopped();
            break;
          }
          this.#reopen();
          continue;
        }
      }
      if (this.#resume && this.#byRequest.size > 0) {
        // Whatever broke the stream, accepted requests may have run: their results are
        // durable, so they are collected, never reported failed.
        await this.#resumeWithWatch(error);
      } else {
        this.#finish(error);
      }
      break;
    }
    if (this.#error !== undefined) {
      throw this.#error;
    }
  }

  /** The stream ended because #abort fired: abort(), or the client closing. */
  #stopped(): void {
    const reason = this.#abort.signal.reason as FairlaneError;
    // abort() is the caller's own doing: close() does not report it. A closed client is.
    this.#finish(reason, !(reason instanceof SessionClosedError));
  }

  #reopen(): void {
    this.#outbox.close();
    this.#outbox = this.#newOutbox();
    for (const pending of this.#unanswered) {
      if (pending.refused === undefined) {
        this.#outbox.push(pending.message);
      }
    }
    for (const message of this.#earlyCancels) {
      this.#outbox.push(message);
    }
    this.#maybeHalfClose();
  }

  /**
   * The stream broke with accepted requests unfinished: their results are durable, so
   * collect them from WatchResults after the newest lane_seq seen here (results come in
   * lane order, so every missing one is newer). Submits not answered yet fail with the
   * error: whether they were accepted is unknown (an idempotency key makes sending them
   * again safe). If WatchResults fails too, the accepted ones reject with
   * OutcomeUnknownError.
   */
  async #resumeWithWatch(error: FairlaneError): Promise<void> {
    this.#error = error;
    const unanswered = [...this.#unanswered, ...this.#waiting];
    this.#inFlight -= this.#unanswered.length; // waiting ones were never counted
    this.#unanswered = [];
    this.#waiting = [];
    let lost = false;
    for (const pending of unanswered) {
      lost ||= pending.refused === undefined;
      pending.reject(pending.refused ?? error);
    }
    try {
      for await (const result of this.#host.watch(this.#lastLaneSeq, {
        signal: this.#abort.signal,
      })) {
        this.#onResult(result);
        if (this.#byRequest.size === 0) {
          break;
        }
      }
    } catch (thrown) {
      if (this.#abort.signal.aborted) {
        this.#stopped();
      } else {
        this.#finish(toFairlaneError(thrown));
      }
      return;
    }
    if (!lost) {
      this.#error = undefined; // every request of the session got its result
    }
    this.#finish(this.#error);
  }

  #handle(response: SessionResponse): void {
    const kind = response.kind;
    if (kind.case === "batch") {
      // The server packs answers this way once the outbox has sent an enqueue_batch.
      for (const inner of kind.value.responses) {
        this.#handle(inner);
      }
      return;
    }
    if (kind.case === undefined) {
      return; // a kind from a newer contract
    }
    switch (kind.case) {
      case "accepted": {
        this.#answeredAny = true;
        this.#earlyCancels = [];
        const pending = this.#unanswered.shift();
        if (pending !== undefined) {
          const same = this.#byRequest.get(kind.value.requestId);
          if (same === undefined) {
            this.#byRequest.set(kind.value.requestId, [pending]);
          } else {
            same.push(pending);
          }
        }
        this.#onEvent?.(kind);
        this.#pump(); // a refused submit may be next in line
        return;
      }
      case "rejected": {
        // Only an enqueue's rejection answers the oldest unanswered submit; a refused
        // cancel (subject cancelRequestId) is reported as an event alone.
        const subject = kind.value.subject;
        if (subject.case === "clientRef") {
          this.#answeredAny = true;
          this.#earlyCancels = [];
          const pending = this.#unanswered.shift();
          if (pending !== undefined) {
            const retry = kind.value.retryAfterMs;
            this.#inFlight -= 1;
            pending.reject(
              new RejectedError(
                kind.value.code as number as Code,
                kind.value.message,
                retry > 0 ? retry : undefined,
                subject.value,
              ),
            );
          }
          this.#onEvent?.(kind);
          this.#pump();
          return;
        }
        break;
      }
      case "result":
        this.#onResult(kind.value);
        break;
      case "progress":
        break;
    }
    this.#onEvent?.(kind);
  }

  #onResult(result: Result): void {
    if (result.laneSeq > this.#lastLaneSeq) {
      this.#lastLaneSeq = result.laneSeq;
    }
    const pendings = this.#byRequest.get(result.requestId);
    if (pendings === undefined) {
      return; // not of this session (WatchResults sees the whole lane)
    }
    this.#byRequest.delete(result.requestId);
    for (const pending of pendings) {
      pending.resolve(result);
      this.#inFlight -= 1;
    }
    this.#pump();
  }

  #finish(error: FairlaneError | undefined, report = true): void {
    if (this.#finished) {
      return;
    }
    this.#finished = true;
    this.#unlinkClose();
    if (error !== undefined && report) {
      this.#error = error;
    }
    const unanswered =
      error ?? new SessionClosedError("the stream ended before the answer", Code.Unavailable);
    for (const pending of [...this.#unanswered, ...this.#waiting]) {
      pending.reject(pending.refused ?? unanswered);
    }
    // Accepted requests may have run: never "failed", but "outcome unknown".
    const why =
      error ?? new SessionClosedError("the stream ended before the result", Code.Unavailable);
    for (const [requestId, pendings] of this.#byRequest) {
      for (const pending of pendings) {
        pending.reject(new OutcomeUnknownError(requestId, why));
      }
    }
    this.#unanswered = [];
    this.#waiting = [];
    this.#byRequest.clear();
    this.#inFlight = 0;
    this.#outbox.close();
  }
}

function submission(promise: Promise<Result>, idempotencyKey: string): Submission {
  // A rejection is a normal answer, often read only later (or only the key is): Node must
  // not report it as unhandled meanwhile. Awaiting the promise still throws.
  promise.catch(() => undefined);
  return Object.assign(promise, { idempotencyKey });
}
