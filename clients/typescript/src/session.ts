/**
 * A Session stream: one promise per submitted request, resolved with its Result. Results
 * arrive in lane order, so the promises resolve in lane order.
 */
import { randomUUID } from "node:crypto";
import { create } from "@bufbuild/protobuf";
import type { Client, EnqueueOptions, Payload } from "./client.js";
import { enqueueMessage } from "./client.js";
import {
  Code,
  type FairlaneError,
  RejectedError,
  SessionClosedError,
  toFairlaneError,
} from "./errors.js";
import type { Result } from "./gen/fairlane/common/v1/common_pb.js";
import {
  type SessionRequest,
  SessionRequestSchema,
  type SessionResponse,
} from "./gen/fairlane/queue/v1/queue_pb.js";
import { Outbox } from "./outbox.js";
import { retryDelay, sleep } from "./retry.js";

/** One server message of a Session, batches unwrapped: accepted, rejected, progress or result. */
export type SessionEvent = Exclude<
  SessionResponse["kind"],
  { case: "batch" } | { case: undefined }
>;

export interface SessionOptions {
  /**
   * Requests submitted and not finished that may be on the wire at once (default 512);
   * further submits wait in the client until earlier ones finish.
   */
  maxInFlight?: number;
  /** Collect accepted requests' results from WatchResults if the stream breaks (default true). */
  resume?: boolean;
  /** Every answer, progress report and result, in the order received. */
  onEvent?: (event: SessionEvent) => void;
}

export type SubmitOptions = EnqueueOptions;

interface Pending {
  message: SessionRequest;
  clientRef: string;
  requestId?: string;
  resolve: (result: Result) => void;
  reject: (error: FairlaneError) => void;
}

// A stream that broke this way may have left accepted requests running: their results are
// durable and WatchResults finds them.
const RESUMABLE = new Set<Code>([Code.Unavailable, Code.Canceled, Code.Internal, Code.Unknown]);
/** Before any answer, a stream that ended so is sent again on a new one. */
const REOPENABLE = new Set<Code>([Code.Unavailable, Code.Canceled]);

export class Session {
  readonly #client: Client;
  readonly #maxInFlight: number;
  readonly #resume: boolean;
  readonly #onEvent: ((event: SessionEvent) => void) | undefined;
  readonly #abort = new AbortController();
  #outbox = new Outbox();
  /** Submitted, not yet written: the window was full. */
  #waiting: Pending[] = [];
  /** Written, not yet answered; answers come in this order. */
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

  constructor(client: Client, options: SessionOptions) {
    this.#client = client;
    this.#maxInFlight = options.maxInFlight ?? 512;
    this.#resume = options.resume ?? true;
    this.#onEvent = options.onEvent;
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
   * `result.status`), or rejects with RejectedError if the server did not accept it, or
   * with the stream's error if the session broke before it was accepted. Rejections are
   * not resent automatically: that would reorder the lane.
   */
  submit(handler: string, payload?: Payload, options: SubmitOptions = {}): Promise<Result> {
    if (this.#error !== undefined) {
      return Promise.reject(this.#error);
    }
    if (this.#closing || this.#finished) {
      return Promise.reject(new SessionClosedError("the session is closed"));
    }
    const message = create(SessionRequestSchema, {
      // Every enqueue carries a key (generated when the caller gave none): a stream
      // reopened before its answers sends it again, and the server must see the same one.
      kind: {
        case: "enqueue",
        value: enqueueMessage(handler, payload, {
          ...options,
          idempotencyKey: options.idempotencyKey ?? randomUUID(),
        }),
      },
    });
    const promise = new Promise<Result>((resolve, reject) => {
      const pending: Pending = { message, clientRef: options.clientRef ?? "", resolve, reject };
      if (this.#inFlight < this.#maxInFlight && this.#waiting.length === 0) {
        this.#send(pending);
      } else {
        this.#waiting.push(pending);
      }
    });
    // Rejections are a normal answer here (rate limits), often read only after close():
    // Node must not report them as unhandled meanwhile. Awaiting the promise still throws.
    promise.catch(() => undefined);
    return promise;
  }

  /**
   * Asks the server to cancel a queued or running request. If it was submitted on this
   * session, its promise resolves with a CANCELLED result. A refusal arrives only as a
   * `rejected` event whose subject is `cancelRequestId`; Client.cancel gives an answer.
   */
  cancel(requestId: string): void {
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

  /** Ends the stream at once; unfinished promises reject with SessionClosedError. */
  abort(): void {
    this.#abort.abort(new SessionClosedError("the session was aborted"));
  }

  // -- sending -----------------------------------------------------------------------------

  #send(pending: Pending): void {
    this.#inFlight += 1;
    this.#unanswered.push(pending);
    this.#outbox.push(pending.message);
  }

  #finishedOne(): void {
    this.#inFlight -= 1;
    while (this.#inFlight < this.#maxInFlight && !this.#finished) {
      const next = this.#waiting.shift();
      if (next === undefined) {
        break;
      }
      this.#send(next);
    }
    this.#maybeHalfClose();
  }

  #maybeHalfClose(): void {
    if (this.#closing && this.#waiting.length === 0) {
      this.#outbox.close();
    }
  }

  // -- receiving ---------------------------------------------------------------------------

  #open(token: string): AsyncIterable<SessionResponse> {
    return this.#client.queueService.session(this.#outbox, {
      headers: { authorization: `Bearer ${token}` },
      signal: this.#abort.signal,
    });
  }

  async #run(): Promise<void> {
    let reauthenticated = false;
    let reconnects = 0;
    let token: string;
    try {
      token = await this.#client.accessToken();
    } catch (thrown) {
      this.#finish(toFairlaneError(thrown));
      throw this.#error;
    }
    let responses = this.#open(token);
    for (;;) {
      try {
        for await (const response of responses) {
          this.#handle(response);
        }
        this.#finish(undefined);
        break;
      } catch (thrown) {
        if (this.#abort.signal.aborted) {
          this.#finish(this.#abort.signal.reason as FairlaneError, false);
          break;
        }
        const error = toFairlaneError(thrown);
        if (error.code === Code.Unauthenticated && !this.#answeredAny && !reauthenticated) {
          // Refused before answering anything: refresh and send it all again.
          reauthenticated = true;
          try {
            await this.#client.refreshAfter(token);
            token = await this.#client.accessToken();
          } catch (refreshError) {
            this.#finish(toFairlaneError(refreshError));
            break;
          }
          responses = this.#reopen(token);
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
          const wait = retryDelay(this.#client.reconnect, reconnects, error, true);
          if (wait !== undefined) {
            try {
              await sleep(wait, this.#abort.signal);
            } catch {
              this.#finish(this.#abort.signal.reason as FairlaneError, false);
              break;
            }
            responses = this.#reopen(token);
            continue;
          }
        }
        if (this.#resume && RESUMABLE.has(error.code) && this.#byRequest.size > 0) {
          await this.#resumeWithWatch(error);
        } else {
          this.#finish(error);
        }
        break;
      }
    }
    if (this.#error !== undefined) {
      throw this.#error;
    }
  }

  #reopen(token: string): AsyncIterable<SessionResponse> {
    this.#outbox = new Outbox();
    for (const pending of this.#unanswered) {
      this.#outbox.push(pending.message);
    }
    for (const message of this.#earlyCancels) {
      this.#outbox.push(message);
    }
    this.#maybeHalfClose();
    return this.#open(token);
  }

  /**
   * The stream broke with accepted requests unfinished: their results are durable, so
   * collect them from WatchResults after the newest lane_seq seen here (results come in
   * lane order, so every missing one is newer). Submits not answered yet fail with the
   * error: whether they were accepted is unknown (an idempotency key makes sending them
   * again safe).
   */
  async #resumeWithWatch(error: FairlaneError): Promise<void> {
    this.#error = error;
    const lost = [...this.#unanswered, ...this.#waiting];
    this.#inFlight -= this.#unanswered.length; // waiting ones were never counted
    this.#unanswered = [];
    this.#waiting = [];
    for (const pending of lost) {
      pending.reject(error);
    }
    try {
      for await (const result of this.#client.watch(this.#lastLaneSeq, {
        signal: this.#abort.signal,
      })) {
        this.#onResult(result);
        if (this.#byRequest.size === 0) {
          break;
        }
      }
    } catch (thrown) {
      this.#finish(
        this.#abort.signal.aborted
          ? (this.#abort.signal.reason as FairlaneError)
          : toFairlaneError(thrown),
      );
      return;
    }
    if (lost.length === 0) {
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
          pending.requestId = kind.value.requestId;
          const same = this.#byRequest.get(kind.value.requestId);
          if (same === undefined) {
            this.#byRequest.set(kind.value.requestId, [pending]);
          } else {
            same.push(pending);
          }
        }
        break;
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
            pending.reject(
              new RejectedError(
                kind.value.code as number as Code,
                kind.value.message,
                retry > 0 ? retry : undefined,
                subject.value,
              ),
            );
            this.#finishedOne();
          }
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
      this.#finishedOne();
    }
  }

  #finish(error: FairlaneError | undefined, report = true): void {
    if (this.#finished) {
      return;
    }
    this.#finished = true;
    if (error !== undefined && report) {
      this.#error = error;
    }
    const failure = (what: string): FairlaneError =>
      error ?? new SessionClosedError(`the stream ended before the ${what}`, Code.Unavailable);
    for (const pending of [...this.#unanswered, ...this.#waiting]) {
      pending.reject(failure("answer"));
    }
    for (const pendings of this.#byRequest.values()) {
      for (const pending of pendings) {
        pending.reject(failure("result"));
      }
    }
    this.#unanswered = [];
    this.#waiting = [];
    this.#byRequest.clear();
    this.#inFlight = 0;
    this.#outbox.close();
  }
}
