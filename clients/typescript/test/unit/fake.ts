/**
 * An in-process gRPC server (connect-node's handler on node:http2) for unit tests that need
 * a peer: the test gives the service implementations, the client talks real gRPC to it.
 * No test here: node --test loads this file too, and it only declares.
 */
import * as http2 from "node:http2";
import type { AddressInfo } from "node:net";
import { setTimeout as delay } from "node:timers/promises";
import { create, type MessageInitShape } from "@bufbuild/protobuf";
import type { ConnectError, ConnectRouter } from "@connectrpc/connect";
import { connectNodeAdapter } from "@connectrpc/connect-node";
import { AuthService } from "../../src/gen/fairlane/auth/v1/auth_pb.js";
import {
  RequestStatus,
  type Result,
  ResultSchema,
} from "../../src/gen/fairlane/common/v1/common_pb.js";
import {
  type EnqueueRequest,
  QueueService,
  type SessionRequest,
  type SessionResponseSchema,
  type WatchResultsResponseSchema,
} from "../../src/gen/fairlane/queue/v1/queue_pb.js";
import { Client, type ClientOptions, type Tokens } from "../../src/index.js";

export class FakeServer {
  readonly #server: http2.Http2Server;
  readonly #sessions = new Set<http2.ServerHttp2Session>();

  private constructor(routes: (router: ConnectRouter) => void) {
    this.#server = http2.createServer(connectNodeAdapter({ routes, grpc: true }));
    this.#server.on("session", (session) => {
      this.#sessions.add(session);
      session.on("close", () => this.#sessions.delete(session));
    });
  }

  static async start(routes: (router: ConnectRouter) => void): Promise<FakeServer> {
    const server = new FakeServer(routes);
    await new Promise<void>((resolve) => server.#server.listen(0, "127.0.0.1", resolve));
    return server;
  }

  get target(): string {
    return `127.0.0.1:${(this.#server.address() as AddressInfo).port}`;
  }

  /** Connections open now. */
  get connections(): number {
    return this.#sessions.size;
  }

  async close(): Promise<void> {
    for (const session of this.#sessions) {
      session.destroy();
    }
    await new Promise<void>((resolve) => this.#server.close(() => resolve()));
  }
}

/** A login that needs no auth call for an hour. */
export function tokens(): Tokens {
  return {
    accessToken: "access",
    refreshToken: "refresh",
    expiresAt: Date.now() + 3_600_000,
    lifetimeMs: 3_600_000,
    username: "alice",
  };
}

/** A logged-in client of `server` (auth, queue and worker all on it). */
export function clientOf(server: FakeServer, options: Partial<ClientOptions> = {}): Client {
  return new Client({
    auth: server.target,
    queue: server.target,
    worker: server.target,
    tokens: tokens(),
    ...options,
  });
}

/** Polls until `check` holds; fails after `timeoutMs`. */
export async function waitUntil(check: () => boolean, timeoutMs = 5_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!check()) {
    if (Date.now() > deadline) {
      throw new Error(`condition not met within ${timeoutMs} ms`);
    }
    await delay(5);
  }
}

/** Resolves when `signal` aborts (a handler's call ending). */
export function aborted(signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    if (signal.aborted) {
      resolve();
    } else {
      signal.addEventListener("abort", () => resolve(), { once: true });
    }
  });
}

/** How a promise settled: "ok", or the error's class name. */
export async function outcome(promise: Promise<unknown>): Promise<string> {
  try {
    await promise;
    return "ok";
  } catch (error) {
    return (error as Error).constructor.name;
  }
}

/** A push-fed async iterable: what a streaming handler yields. */
class Channel<T> implements AsyncIterable<T> {
  readonly #items: T[] = [];
  #waiter: (() => void) | undefined;
  #ended = false;
  #error: unknown;

  push(item: T): void {
    this.#items.push(item);
    this.#wake();
  }

  end(error?: unknown): void {
    this.#ended = true;
    this.#error = error;
    this.#wake();
  }

  #wake(): void {
    const waiter = this.#waiter;
    this.#waiter = undefined;
    waiter?.();
  }

  async *[Symbol.asyncIterator](): AsyncIterator<T> {
    for (;;) {
      const item = this.#items.shift();
      if (item !== undefined) {
        yield item;
        continue;
      }
      if (this.#ended) {
        if (this.#error !== undefined) {
          throw this.#error;
        }
        return;
      }
      await new Promise<void>((resolve) => {
        this.#waiter = resolve;
      });
    }
  }
}

/**
 * A lane behind a fake QueueService: Enqueue, Session (accepts every enqueue in order and
 * sends its result once it is finished) and WatchResults (stored results, then live ones).
 */
export class FakeQueue {
  /** Every enqueue the server received, unary or on a Session, in order. */
  readonly received: EnqueueRequest[] = [];
  /** Every Session message received, as sent (enqueue, enqueueBatch, cancel). */
  readonly messages: SessionRequest[] = [];
  /** Results stored, in lane order. */
  readonly results: Result[] = [];
  /** Unary Enqueue calls received. */
  enqueueCalls = 0;
  /** Accepted requests stay unfinished until finishAll(). */
  holdResults = false;
  /** Session streams end with this error once they have accepted this many enqueues. */
  breakSession: { afterAccepted: number; error: ConnectError } | undefined;
  /** WatchResults fails with this error at once. */
  watchError: ConnectError | undefined;
  /** WhoAmI answers after this long. */
  whoAmIDelayMs = 0;
  /** The grpc-timeout header of each WhoAmI call (null: none). */
  readonly timeouts: (string | null)[] = [];
  /** Calls whose handler is running now, by method name. */
  readonly open = new Map<string, number>();
  #seq = 0n;
  #unfinished: { requestId: string; clientRef: string; seq: bigint }[] = [];
  readonly #listeners = new Set<(result: Result) => void>();
  readonly #byKey = new Map<string, string>();

  routes = (router: ConnectRouter): void => {
    router.service(QueueService, {
      enqueue: (request) => {
        this.enqueueCalls += 1;
        const [requestId, duplicate] = this.#store(request);
        return { requestId, duplicate };
      },
      session: (requests, context) => this.#session(requests, context.signal),
      watchResults: (request, context) => this.#watch(request.afterLaneSeq, context.signal),
    });
    router.service(AuthService, {
      whoAmI: async (_request, context) => {
        this.timeouts.push(context.requestHeader.get("grpc-timeout"));
        this.#count("whoAmI", 1);
        try {
          await delay(this.whoAmIDelayMs, undefined, { signal: context.signal });
        } finally {
          this.#count("whoAmI", -1);
        }
        return { userId: "u1", username: "alice" };
      },
    });
  };

  /** Finishes every accepted request (SUCCEEDED). */
  finishAll(): void {
    const unfinished = this.#unfinished;
    this.#unfinished = [];
    for (const { requestId, clientRef, seq } of unfinished) {
      const result = create(ResultSchema, {
        requestId,
        laneSeq: seq,
        status: RequestStatus.SUCCEEDED,
        clientRef,
        attempts: 1,
      });
      this.results.push(result);
      for (const listener of this.#listeners) {
        listener(result);
      }
    }
  }

  #count(method: string, delta: number): void {
    this.open.set(method, (this.open.get(method) ?? 0) + delta);
  }

  #store(request: EnqueueRequest): [string, boolean] {
    this.received.push(request);
    const known = this.#byKey.get(request.idempotencyKey);
    if (known !== undefined) {
      return [known, true];
    }
    this.#seq += 1n;
    const requestId = `req-${this.#seq}`;
    this.#byKey.set(request.idempotencyKey, requestId);
    this.#unfinished.push({ requestId, clientRef: request.clientRef, seq: this.#seq });
    if (!this.holdResults) {
      this.finishAll();
    }
    return [requestId, false];
  }

  async *#session(
    requests: AsyncIterable<SessionRequest>,
    signal: AbortSignal,
  ): AsyncIterable<MessageInitShape<typeof SessionResponseSchema>> {
    this.#count("session", 1);
    const out = new Channel<MessageInitShape<typeof SessionResponseSchema>>();
    const mine = new Set<string>();
    let halfClosed = false;
    const onResult = (result: Result): void => {
      if (mine.delete(result.requestId)) {
        out.push({ kind: { case: "result", value: result } });
        if (halfClosed && mine.size === 0) {
          out.end();
        }
      }
    };
    this.#listeners.add(onResult);
    let accepted = 0;
    const read = async (): Promise<void> => {
      for await (const message of requests) {
        this.messages.push(message);
        const kind = message.kind;
        const batch =
          kind.case === "enqueue"
            ? [kind.value]
            : kind.case === "enqueueBatch"
              ? kind.value.requests
              : [];
        for (const request of batch) {
          const before = this.results.length;
          const [requestId, duplicate] = this.#store(request);
          out.push({
            kind: {
              case: "accepted",
              value: { requestId, clientRef: request.clientRef, duplicate },
            },
          });
          accepted += 1;
          // A result stored at once goes after its answer.
          mine.add(requestId);
          for (const result of this.results.slice(before)) {
            onResult(result);
          }
          const rule = this.breakSession;
          if (rule !== undefined && accepted >= rule.afterAccepted) {
            out.end(rule.error);
            return;
          }
        }
      }
      halfClosed = true;
      if (mine.size === 0) {
        out.end();
      }
    };
    read().catch((error: unknown) => out.end(error));
    signal.addEventListener("abort", () => out.end(signal.reason), { once: true });
    try {
      yield* out;
    } finally {
      this.#listeners.delete(onResult);
      this.#count("session", -1);
    }
  }

  async *#watch(
    afterLaneSeq: bigint,
    signal: AbortSignal,
  ): AsyncIterable<MessageInitShape<typeof WatchResultsResponseSchema>> {
    if (this.watchError !== undefined) {
      throw this.watchError;
    }
    this.#count("watchResults", 1);
    const out = new Channel<Result>();
    const listener = (result: Result): void => out.push(result);
    this.#listeners.add(listener);
    for (const result of this.results) {
      if (result.laneSeq > afterLaneSeq) {
        out.push(result);
      }
    }
    signal.addEventListener("abort", () => out.end(), { once: true });
    try {
      for await (const result of out) {
        yield { result };
      }
    } finally {
      this.#listeners.delete(listener);
      this.#count("watchResults", -1);
    }
  }
}

/** A fake QueueService (and AuthService) served for the body, then closed. */
export async function withQueue(
  body: (queue: FakeQueue, server: FakeServer) => Promise<void>,
): Promise<void> {
  const queue = new FakeQueue();
  const server = await FakeServer.start(queue.routes);
  try {
    await body(queue, server);
  } finally {
    await server.close();
  }
}
