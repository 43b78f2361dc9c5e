/**
 * What a Session has to send, coalesced into as few stream messages as it can.
 *
 * Every gRPC message costs the client, the network and the server a fixed amount of work,
 * whatever it carries; at thousands of requests a second that cost dominates. The
 * transport reads this outbox whenever it can take the next message: a submit made while
 * it waits leaves at once, alone; submits made while it was busy leave together as one
 * `enqueue_batch` (the server then answers in `batch` messages, which Session unwraps). A
 * cancel goes alone, in its place, so the server sees everything in submission order.
 *
 * Hand-written rather than connect's createWritableIterable, which makes every write wait
 * for the transport: writes here never wait (the Session's window bounds them).
 */
import { create } from "@bufbuild/protobuf";
import { enqueueSize, fieldSize } from "./enqueue.js";
import {
  type EnqueueRequest,
  type SessionRequest,
  SessionRequestSchema,
} from "./gen/fairlane/queue/v1/queue_pb.js";

/** Enqueues in one message at most (the server takes up to 1,000; a batch is one intake step). */
export const MAX_BATCH_REQUESTS = 256;

/**
 * Bytes of one serialized `enqueue_batch` SessionRequest at most, framing included: well
 * under gRPC's 8 MiB message limit on both ends. A single larger enqueue still goes, alone
 * (the Session sends none that is over the message limit).
 */
export const MAX_BATCH_BYTES = 2 * 1024 * 1024;

export class Outbox implements AsyncIterable<SessionRequest> {
  #items: SessionRequest[] = [];
  #waiter: ((result: IteratorResult<SessionRequest>) => void) | undefined;
  #closed = false;
  readonly #maxRequests: number;
  readonly #maxBytes: number;

  constructor(maxRequests = MAX_BATCH_REQUESTS, maxBytes = MAX_BATCH_BYTES) {
    if (maxRequests < 1 || maxBytes < 1) {
      throw new RangeError("a batch must be allowed at least one request and one byte");
    }
    this.#maxRequests = maxRequests;
    this.#maxBytes = maxBytes;
  }

  /** Queues one message (an enqueue or a cancel); ignored once closed. */
  push(message: SessionRequest): void {
    if (this.#closed) {
      return;
    }
    const waiter = this.#waiter;
    if (waiter !== undefined) {
      this.#waiter = undefined;
      waiter({ done: false, value: message });
    } else {
      this.#items.push(message);
    }
  }

  /** Half-closes once what is queued has been read. */
  close(): void {
    this.#closed = true;
    if (this.#items.length === 0) {
      this.#waiter?.({ done: true, value: undefined });
      this.#waiter = undefined;
    }
  }

  [Symbol.asyncIterator](): AsyncIterator<SessionRequest> {
    return {
      next: () => {
        const message = this.#take();
        if (message !== undefined) {
          return Promise.resolve({ done: false, value: message });
        }
        if (this.#closed) {
          return Promise.resolve({ done: true, value: undefined });
        }
        return new Promise((resolve) => {
          this.#waiter = resolve;
        });
      },
      // The transport stops reading (the call ended): drop what was not sent.
      return: () => this.#stop(),
      throw: () => this.#stop(),
    };
  }

  /** The next stream message: a cancel, a lone enqueue, or consecutive enqueues batched. */
  #take(): SessionRequest | undefined {
    const first = this.#items.shift();
    if (first === undefined || first.kind.case !== "enqueue") {
      return first;
    }
    const batch: EnqueueRequest[] = [first.kind.value];
    // The EnqueueBatch's size; the message is fieldSize(body) (the SessionRequest around
    // it), counted whole, framing and all, so that it stays under maxBytes.
    let body = fieldSize(enqueueSize(first.kind.value));
    let taken = 0;
    for (const head of this.#items) {
      if (batch.length >= this.#maxRequests || head.kind.case !== "enqueue") {
        break;
      }
      const grown = body + fieldSize(enqueueSize(head.kind.value));
      if (fieldSize(grown) > this.#maxBytes) {
        break;
      }
      batch.push(head.kind.value);
      body = grown;
      taken += 1;
    }
    if (taken === 0) {
      return first;
    }
    this.#items.splice(0, taken);
    return create(SessionRequestSchema, {
      kind: { case: "enqueueBatch", value: { requests: batch } },
    });
  }

  #stop(): Promise<IteratorResult<SessionRequest>> {
    this.#closed = true;
    this.#items = [];
    return Promise.resolve({ done: true, value: undefined });
  }
}
