/**
 * The Fairlane client: logins with rotating refresh tokens, unary calls with deadlines and
 * RetryInfo-aware retries, WatchResults with reconnects, and Session streams.
 */

import { randomUUID } from "node:crypto";
import type * as http2 from "node:http2";
import { create } from "@bufbuild/protobuf";
import { type CallOptions, type Client as ConnectClient, createClient } from "@connectrpc/connect";
import { createGrpcTransport, Http2SessionManager } from "@connectrpc/connect-node";
import {
  type EnqueueOptions,
  enqueueMessage,
  enqueueSize,
  MAX_MESSAGE_BYTES,
  type Payload,
  tooLarge,
} from "./enqueue.js";
import {
  ClientClosedError,
  Code,
  type FairlaneError,
  InvalidArgumentError,
  NotLoggedInError,
  toFairlaneError,
  UnauthenticatedError,
  UnavailableError,
} from "./errors.js";
import { AuthService } from "./gen/fairlane/auth/v1/auth_pb.js";
import type { Request, RequestStatus, Result } from "./gen/fairlane/common/v1/common_pb.js";
import {
  type Lane,
  ListRequestsRequestSchema,
  QueueService,
} from "./gen/fairlane/queue/v1/queue_pb.js";
import { type HandlerInfo, WorkerService } from "./gen/fairlane/worker/v1/worker_pb.js";
import { Health, type HealthCheckResponse_ServingStatus } from "./gen/grpc/health/v1/health_pb.js";
import {
  checkPolicy,
  DEFAULT_RETRY,
  type RetryPolicy,
  retryDelay,
  STREAM_RECONNECT,
  sleep,
} from "./retry.js";
import { Session, type SessionHost, type SessionOptions } from "./session.js";
import { linkedAbort, sharedAbortController } from "./signals.js";

/** A login: keep `refreshToken` secret, and persist the newest one (they rotate). */
export interface Tokens {
  accessToken: string;
  refreshToken: string;
  /** When the access token expires, in milliseconds since the epoch. */
  expiresAt: number;
  /** The access token's lifetime in milliseconds. */
  lifetimeMs: number;
  username: string;
}

export interface Identity {
  userId: string;
  username: string;
}

/** What a retried unary call reports to ClientOptions.onRetry before it waits. */
export interface RetryEvent {
  method: string;
  /** The attempt that failed, 1-based. */
  attempt: number;
  /** How long the client waits before the next attempt. */
  delayMs: number;
  error: FairlaneError;
}

export interface ClientOptions {
  /** Auth service: "host:port" (plaintext), or "http://host:port" / "https://host:port". */
  auth: string;
  /** Queue service (one replica or a load balancer in front of several). */
  queue: string;
  /** Worker service, for worker control and ListHandlers. */
  worker?: string;
  /**
   * Deadline of every unary call in milliseconds (default 10 s): more than 0, Infinity for
   * none; values above MAX_TIMEOUT_MS (about 27.8 hours) count as MAX_TIMEOUT_MS. Streams
   * have none.
   */
  timeoutMs?: number;
  /** Start from a login saved earlier. */
  tokens?: Tokens;
  /** Called with the new Tokens after every login and refresh, and with undefined after logout. */
  onTokens?: (tokens: Tokens | undefined) => void;
  /** Refresh the access token this long before it expires (default: a fifth of its lifetime, at most 60 s). */
  refreshMarginMs?: number;
  /** Retries of unary calls (default 5 attempts). */
  retry?: Partial<RetryPolicy>;
  /** Reopening broken WatchResults streams, and Session streams broken before their first answer (default 10 attempts in a row). */
  reconnect?: Partial<RetryPolicy>;
  /** Called before each retry wait of a unary call. */
  onRetry?: (event: RetryEvent) => void;
  /** Options for node:http2 connect(), e.g. `ca` for a private certificate authority. */
  http2Options?: http2.SecureClientSessionOptions;
}

export interface Enqueued {
  requestId: string;
  /** True when the idempotency key named an earlier request, which is returned instead. */
  duplicate: boolean;
  /** The key sent (given or generated): send it again to retry this enqueue safely. */
  idempotencyKey: string;
}

export interface WatchOptions {
  /** Stops the stream (the iterator then throws the signal's reason). */
  signal?: AbortSignal;
  /** Reopen a broken stream per ClientOptions.reconnect (default true). */
  reconnect?: boolean;
}

type Service = "auth" | "queue" | "worker";
type UnaryOptions = { auth: boolean; idempotent: boolean; method: string };

// Keepalive: a half-open connection under a long-lived stream is noticed within 40 s.
// (The message limit, MAX_MESSAGE_BYTES, is the servers' own: services/core/grpc_host.py.)
const PING_INTERVAL_MS = 30_000;
const PING_TIMEOUT_MS = 10_000;

/**
 * The longest unary deadline, in milliseconds (about 27.8 hours): gRPC's grpc-timeout
 * header carries at most 8 digits. A longer ClientOptions.timeoutMs counts as this one.
 */
export const MAX_TIMEOUT_MS = 99_999_999;

function baseUrl(target: string): string {
  return /^https?:\/\//.test(target) ? target : `http://${target}`;
}

function invalidOption(message: string): InvalidArgumentError {
  return new InvalidArgumentError(message, Code.InvalidArgument);
}

/** ClientOptions.timeoutMs checked: Infinity (no deadline), or at most MAX_TIMEOUT_MS. */
function checkTimeout(timeoutMs: unknown): number {
  if (typeof timeoutMs !== "number" || Number.isNaN(timeoutMs) || timeoutMs <= 0) {
    throw invalidOption(
      `timeoutMs must be a number of milliseconds above 0 (Infinity: no deadline), not ${String(timeoutMs)}`,
    );
  }
  return timeoutMs === Number.POSITIVE_INFINITY
    ? timeoutMs
    : Math.min(Math.ceil(timeoutMs), MAX_TIMEOUT_MS);
}

export class Client {
  /** Deadline of each unary call in milliseconds; Infinity: none. */
  readonly timeoutMs: number;
  readonly retry: RetryPolicy;
  readonly reconnect: RetryPolicy;
  /** The largest message a call sends, in bytes (the servers' limit, 8 MiB). */
  readonly maxMessageBytes = MAX_MESSAGE_BYTES;
  readonly #targets: Record<Service, string | undefined>;
  readonly #options: ClientOptions;
  readonly #managers = new Map<string, Http2SessionManager>();
  /** Aborted by close(), with a ClientClosedError: every call, watch and Session listens. */
  readonly #closing = sharedAbortController();
  #tokens: Tokens | undefined;
  #refreshing: Promise<void> | undefined;
  #auth: ConnectClient<typeof AuthService> | undefined;
  #queue: ConnectClient<typeof QueueService> | undefined;
  #worker: ConnectClient<typeof WorkerService> | undefined;
  #host: SessionHost | undefined;

  /** Options that make no sense (a timeoutMs of NaN, a negative backoff, ...) throw InvalidArgumentError. */
  constructor(options: ClientOptions) {
    this.#options = options;
    this.#targets = { auth: options.auth, queue: options.queue, worker: options.worker };
    this.timeoutMs = checkTimeout(options.timeoutMs ?? 10_000);
    this.retry = checkPolicy("retry", { ...DEFAULT_RETRY, ...options.retry });
    this.reconnect = checkPolicy("reconnect", { ...STREAM_RECONNECT, ...options.reconnect });
    const margin = options.refreshMarginMs;
    if (
      margin !== undefined &&
      (typeof margin !== "number" || !Number.isFinite(margin) || margin < 0)
    ) {
      throw invalidOption(
        `refreshMarginMs must be a finite number, 0 or more, not ${String(margin)}`,
      );
    }
    this.#tokens = options.tokens;
  }

  /**
   * Closes every connection. Calls, watch() iterators and Sessions still in progress end
   * with ClientClosedError (a Session's accepted requests with OutcomeUnknownError, whose
   * reason is the ClientClosedError), and so does every call made after.
   */
  close(): void {
    if (this.#closing.signal.aborted) {
      return;
    }
    const reason = new ClientClosedError();
    // First the calls (they end with the signal's reason), then the connections under them.
    this.#closing.abort(reason);
    for (const manager of this.#managers.values()) {
      manager.abort(reason);
    }
    this.#managers.clear();
    this.#auth = this.#queue = this.#worker = undefined;
  }

  /** Whether close() was called. */
  get closed(): boolean {
    return this.#closing.signal.aborted;
  }

  #checkOpen(): void {
    if (this.#closing.signal.aborted) {
      throw new ClientClosedError();
    }
  }

  // -- transports --------------------------------------------------------------------------

  #transport(service: Service) {
    this.#checkOpen();
    const target = this.#targets[service];
    if (target === undefined) {
      throw new Error(`no ${service} target configured`);
    }
    const url = baseUrl(target);
    // One HTTP/2 connection per target, shared by the services behind it.
    let manager = this.#managers.get(url);
    if (manager === undefined) {
      manager = new Http2SessionManager(
        url,
        { pingIntervalMs: PING_INTERVAL_MS, pingTimeoutMs: PING_TIMEOUT_MS },
        this.#options.http2Options,
      );
      this.#managers.set(url, manager);
    }
    return createGrpcTransport({
      baseUrl: url,
      sessionManager: manager,
      readMaxBytes: MAX_MESSAGE_BYTES,
      writeMaxBytes: MAX_MESSAGE_BYTES,
    });
  }

  /** The generated QueueService client (no retries, no token handling). ClientClosedError once closed. */
  get queueService(): ConnectClient<typeof QueueService> {
    this.#checkOpen();
    this.#queue ??= createClient(QueueService, this.#transport("queue"));
    return this.#queue;
  }

  /** The generated AuthService client. ClientClosedError once closed. */
  get authService(): ConnectClient<typeof AuthService> {
    this.#checkOpen();
    this.#auth ??= createClient(AuthService, this.#transport("auth"));
    return this.#auth;
  }

  /** The generated WorkerService client. ClientClosedError once closed. */
  get workerService(): ConnectClient<typeof WorkerService> {
    this.#checkOpen();
    this.#worker ??= createClient(WorkerService, this.#transport("worker"));
    return this.#worker;
  }

  // -- tokens ------------------------------------------------------------------------------

  /** The current login, if any. */
  get tokens(): Tokens | undefined {
    return this.#tokens;
  }

  #setTokens(tokens: Tokens | undefined): void {
    this.#tokens = tokens;
    this.#options.onTokens?.(tokens);
  }

  #margin(tokens: Tokens): number {
    return this.#options.refreshMarginMs ?? Math.min(tokens.lifetimeMs / 5, 60_000);
  }

  /** A valid access token: the current one, refreshed first when it is about to expire. */
  async accessToken(): Promise<string> {
    this.#checkOpen();
    const tokens = this.#tokens;
    if (tokens === undefined) {
      throw new NotLoggedInError();
    }
    if (Date.now() >= tokens.expiresAt - this.#margin(tokens)) {
      await this.refreshAfter(tokens.accessToken);
    }
    return (this.#tokens ?? tokens).accessToken;
  }

  /**
   * Refreshes because `staleAccessToken` was refused or is expiring. Concurrent callers
   * share one Refresh call, and a caller whose token was already replaced does not refresh
   * again: refresh tokens are single-use, and reusing a spent one revokes the whole login.
   */
  async refreshAfter(staleAccessToken: string): Promise<void> {
    const tokens = this.#tokens;
    if (tokens === undefined) {
      throw new NotLoggedInError();
    }
    if (tokens.accessToken !== staleAccessToken) {
      return;
    }
    this.#refreshing ??= this.#refresh(tokens).finally(() => {
      this.#refreshing = undefined;
    });
    await this.#refreshing;
  }

  async #refresh(tokens: Tokens): Promise<void> {
    try {
      const reply = await this.#unary(
        (options) => this.authService.refresh({ refreshToken: tokens.refreshToken }, options),
        { auth: false, idempotent: false, method: "Refresh" },
      );
      this.#setTokens({
        accessToken: reply.accessToken,
        refreshToken: reply.refreshToken,
        expiresAt: Date.now() + reply.expiresIn * 1000,
        lifetimeMs: reply.expiresIn * 1000,
        username: tokens.username,
      });
    } catch (error) {
      if (error instanceof UnauthenticatedError) {
        throw new UnauthenticatedError(
          `the login expired or was revoked, log in again (${error.message})`,
          Code.Unauthenticated,
          { cause: error },
        );
      }
      throw error;
    }
  }

  // -- calls -------------------------------------------------------------------------------

  /**
   * Runs one unary call with a deadline, the bearer token, one refresh on
   * UNAUTHENTICATED, and retries per the policy.
   */
  async #unary<T>(call: (options: CallOptions) => Promise<T>, how: UnaryOptions): Promise<T> {
    let attempt = 0;
    let reauthenticated = false;
    const closing = this.#closing.signal;
    for (;;) {
      attempt += 1;
      this.#checkOpen();
      const token = how.auth ? await this.accessToken() : undefined;
      const options: CallOptions = { signal: closing };
      if (this.timeoutMs !== Number.POSITIVE_INFINITY) {
        options.timeoutMs = this.timeoutMs;
      }
      if (token !== undefined) {
        options.headers = { authorization: `Bearer ${token}` };
      }
      try {
        return await call(options);
      } catch (thrown) {
        if (closing.aborted) {
          throw new ClientClosedError();
        }
        const error = toFairlaneError(thrown);
        if (error.code === Code.Unauthenticated && token !== undefined && !reauthenticated) {
          reauthenticated = true;
          attempt -= 1;
          await this.refreshAfter(token);
          continue;
        }
        const delayMs = retryDelay(this.retry, attempt, error, how.idempotent);
        if (delayMs === undefined) {
          throw error;
        }
        this.#options.onRetry?.({ method: how.method, attempt, delayMs, error });
        await sleep(delayMs, closing);
      }
    }
  }

  /** Creates a user; returns its id. AlreadyExistsError, InvalidArgumentError. */
  async register(username: string, password: string): Promise<string> {
    const reply = await this.#unary(
      (options) => this.authService.register({ username, password }, options),
      { auth: false, idempotent: false, method: "Register" },
    );
    return reply.userId;
  }

  /** Logs in and keeps the tokens. UnauthenticatedError for a bad name or password. */
  async login(username: string, password: string): Promise<Tokens> {
    const reply = await this.#unary(
      (options) => this.authService.login({ username, password }, options),
      { auth: false, idempotent: true, method: "Login" },
    );
    const tokens: Tokens = {
      accessToken: reply.accessToken,
      refreshToken: reply.refreshToken,
      expiresAt: Date.now() + reply.expiresIn * 1000,
      lifetimeMs: reply.expiresIn * 1000,
      username,
    };
    this.#setTokens(tokens);
    return tokens;
  }

  /** Refreshes the tokens now (normally automatic). */
  async refresh(): Promise<Tokens> {
    const tokens = this.#tokens;
    if (tokens === undefined) {
      throw new NotLoggedInError();
    }
    await this.refreshAfter(tokens.accessToken);
    return this.#tokens ?? tokens;
  }

  /** Revokes the refresh token (and its whole login) and forgets the tokens. */
  async logout(): Promise<void> {
    const tokens = this.#tokens;
    if (tokens === undefined) {
      return;
    }
    await this.#unary(
      (options) => this.authService.revoke({ refreshToken: tokens.refreshToken }, options),
      { auth: false, idempotent: true, method: "Revoke" },
    );
    this.#setTokens(undefined);
  }

  async whoami(): Promise<Identity> {
    const reply = await this.#unary((options) => this.authService.whoAmI({}, options), {
      auth: true,
      idempotent: true,
      method: "WhoAmI",
    });
    return { userId: reply.userId, username: reply.username };
  }

  /**
   * Enqueues one request and returns once it is durable. An idempotency key is generated
   * when none is given, so RESOURCE_EXHAUSTED/UNAVAILABLE (and a lost answer) are retried
   * without the risk of running it twice.
   *
   * A value that cannot be sent rejects with InvalidArgumentError at once, before any
   * call and without retries: a maxAttempts or deadline out of range, or a request over
   * the gRPC message limit (maxMessageBytes), which the transport would refuse.
   */
  async enqueue(
    handler: string,
    payload?: Payload,
    options: EnqueueOptions = {},
  ): Promise<Enqueued> {
    const idempotencyKey = options?.idempotencyKey ?? randomUUID();
    const message = enqueueMessage(handler, payload, { ...options, idempotencyKey });
    const why = tooLarge(message, enqueueSize(message), this.maxMessageBytes);
    if (why !== undefined) {
      throw invalidOption(why);
    }
    const reply = await this.#unary((call) => this.queueService.enqueue(message, call), {
      auth: true,
      idempotent: true,
      method: "Enqueue",
    });
    return { requestId: reply.requestId, duplicate: reply.duplicate, idempotencyKey };
  }

  /** One of your requests, with payload and output. NotFoundError otherwise. */
  async get(requestId: string): Promise<Request> {
    const reply = await this.#unary(
      (options) => this.queueService.getRequest({ requestId }, options),
      { auth: true, idempotent: true, method: "GetRequest" },
    );
    if (reply.request === undefined) {
      throw new UnavailableError("GetRequest answered without a request");
    }
    return reply.request;
  }

  /**
   * Your requests, newest first, a page at a time (payloads and outputs left out).
   * `status` unset lists every status.
   */
  async *requests(
    options: { status?: RequestStatus; pageSize?: number } = {},
  ): AsyncGenerator<Request[], void, undefined> {
    let pageToken = "";
    for (;;) {
      const message = create(ListRequestsRequestSchema, {
        pageSize: options.pageSize ?? 50,
        pageToken,
      });
      if (options.status !== undefined) {
        message.status = options.status;
      }
      const reply = await this.#unary((call) => this.queueService.listRequests(message, call), {
        auth: true,
        idempotent: true,
        method: "ListRequests",
      });
      if (reply.requests.length > 0) {
        yield reply.requests;
      }
      pageToken = reply.nextPageToken;
      if (pageToken === "") {
        return;
      }
    }
  }

  /** Cancels a queued or running request; returns its status after the call. */
  async cancel(requestId: string): Promise<RequestStatus> {
    const reply = await this.#unary(
      (options) => this.queueService.cancelRequest({ requestId }, options),
      { auth: true, idempotent: true, method: "CancelRequest" },
    );
    return reply.status;
  }

  /** Your lane. NotFoundError before the first enqueue. */
  async lane(): Promise<Lane> {
    const reply = await this.#unary((options) => this.queueService.getLane({}, options), {
      auth: true,
      idempotent: true,
      method: "GetLane",
    });
    if (reply.lane === undefined) {
      throw new UnavailableError("GetLane answered without a lane");
    }
    return reply.lane;
  }

  /** The handlers the worker replica can run. */
  async listHandlers(): Promise<HandlerInfo[]> {
    const reply = await this.#unary((options) => this.workerService.listHandlers({}, options), {
      auth: true,
      idempotent: true,
      method: "ListHandlers",
    });
    return reply.handlers;
  }

  /** grpc.health.v1 Check of one service's server ("" asks for the server as a whole). */
  async health(service: Service, name = ""): Promise<HealthCheckResponse_ServingStatus> {
    const health = createClient(Health, this.#transport(service));
    const reply = await this.#unary((options) => health.check({ service: name }, options), {
      auth: false,
      idempotent: true,
      method: "Health.Check",
    });
    return reply.status;
  }

  /**
   * Your results with lane_seq > afterLaneSeq: the stored ones first, then live ones as
   * they finish, in lane order, without end. A broken stream is reopened after the last
   * result seen (per ClientOptions.reconnect); an expired token is refreshed once.
   */
  watch(afterLaneSeq = 0n, options: WatchOptions = {}): AsyncGenerator<Result, void, undefined> {
    if (typeof afterLaneSeq !== "bigint" || afterLaneSeq < 0n || afterLaneSeq >= 2n ** 64n) {
      throw invalidOption(
        `afterLaneSeq must be a bigint from 0n to 2n ** 64n - 1n, not ${String(afterLaneSeq)}`,
      );
    }
    return this.#watch(afterLaneSeq, options);
  }

  async *#watch(
    afterLaneSeq: bigint,
    options: WatchOptions,
  ): AsyncGenerator<Result, void, undefined> {
    const user = options.signal;
    // One signal for the caller's and close(); aborted at the end, which cancels the
    // stream when the caller stops reading early.
    const { controller, unlink } = linkedAbort(user, this.#closing.signal);
    const signal = controller.signal;
    const stopped = (): unknown => (this.closed ? new ClientClosedError() : user?.reason);
    let last = afterLaneSeq;
    let failures = 0;
    let reauthenticated = false;
    try {
      for (;;) {
        const token = await this.accessToken();
        let ended: FairlaneError;
        try {
          const stream = this.queueService.watchResults(
            { afterLaneSeq: last },
            { headers: { authorization: `Bearer ${token}` }, signal },
          );
          for await (const message of stream) {
            const result = message.result;
            if (result === undefined || result.laneSeq <= last) {
              continue;
            }
            last = result.laneSeq;
            failures = 0;
            reauthenticated = false;
            yield result;
          }
          // The server ended the stream (it is shutting down): reopen, maybe elsewhere.
          ended = new UnavailableError("the server ended the result stream", Code.Unavailable);
        } catch (thrown) {
          if (signal.aborted) {
            throw stopped();
          }
          ended = toFairlaneError(thrown);
          if (ended.code === Code.Canceled) {
            // Not our signal (checked above): the peer reset the stream, e.g. a queue replica
            // killed mid-watch. Reopening after the last result seen is always safe.
            ended = new UnavailableError(ended.message, Code.Unavailable);
          }
          if (ended.code === Code.Unauthenticated && !reauthenticated) {
            reauthenticated = true;
            await this.refreshAfter(token);
            continue;
          }
        }
        failures += 1;
        const delayMs =
          options.reconnect === false
            ? undefined
            : retryDelay(this.reconnect, failures, ended, true);
        if (delayMs === undefined) {
          throw ended;
        }
        try {
          await sleep(delayMs, signal);
        } catch {
          throw stopped();
        }
      }
    } finally {
      unlink();
      controller.abort();
    }
  }

  /**
   * Opens a Session stream: `submit()` returns a promise per request, resolved with its
   * Result in lane order. `await session.close()` when done. ClientClosedError once the
   * client is closed; InvalidArgumentError for a maxInFlight that is not a whole number
   * of at least 1.
   */
  session(options: SessionOptions = {}): Session {
    this.#checkOpen();
    this.#host ??= {
      reconnect: this.reconnect,
      maxMessageBytes: this.maxMessageBytes,
      closed: this.#closing.signal,
      accessToken: () => this.accessToken(),
      refreshAfter: (stale) => this.refreshAfter(stale),
      openSession: (requests, { token, signal }) =>
        this.queueService.session(requests, {
          headers: { authorization: `Bearer ${token}` },
          signal,
        }),
      watch: (after, { signal }) => this.watch(after, { signal }),
    };
    return new Session(this.#host, options);
  }
}
