/**
 * Typed errors. Every failure the client reports is a FairlaneError; the subclass tells the
 * gRPC status, `retryAfterMs` the server's retry advice (undefined when it gave none).
 */
import { Code, ConnectError } from "@connectrpc/connect";
import { RetryInfoSchema } from "./gen/google/rpc/error_details_pb.js";

export { Code };

export interface FairlaneErrorOptions {
  /** The server's retry advice in milliseconds; undefined when it gave none. */
  retryAfterMs?: number | undefined;
  cause?: unknown;
}

export class FairlaneError extends Error {
  override name = "FairlaneError";
  /** The gRPC status code (the numbers of google.rpc.Code). */
  readonly code: Code;
  /**
   * How long the server asked the client to wait before sending this again: the
   * google.rpc.RetryInfo of a unary call, Rejected.retry_after_ms on a Session.
   */
  readonly retryAfterMs: number | undefined;

  constructor(message: string, code: Code = Code.Unknown, options: FairlaneErrorOptions = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.code = code;
    this.retryAfterMs = options.retryAfterMs;
  }
}

export class UnauthenticatedError extends FairlaneError {
  override name = "UnauthenticatedError";
}
export class PermissionDeniedError extends FairlaneError {
  override name = "PermissionDeniedError";
}
export class NotFoundError extends FairlaneError {
  override name = "NotFoundError";
}
export class AlreadyExistsError extends FairlaneError {
  override name = "AlreadyExistsError";
}
export class InvalidArgumentError extends FairlaneError {
  override name = "InvalidArgumentError";
}
export class FailedPreconditionError extends FairlaneError {
  override name = "FailedPreconditionError";
}
/** Your fault: rate limit or full lane. Retry after `retryAfterMs`. */
export class ResourceExhaustedError extends FairlaneError {
  override name = "ResourceExhaustedError";
}
/** Our trouble: database, broker or replica down, or shutting down. Retry later. */
export class UnavailableError extends FairlaneError {
  override name = "UnavailableError";
}
export class DeadlineExceededError extends FairlaneError {
  override name = "DeadlineExceededError";
}

/** A call that needs a login was made before login() (or after logout()). */
export class NotLoggedInError extends FairlaneError {
  override name = "NotLoggedInError";
  constructor() {
    super("not logged in: call login() first", Code.Unauthenticated);
  }
}

/**
 * A Session enqueue the server did not accept (nothing was stored). `code` says why:
 * InvalidArgument (fix the request), ResourceExhausted or Unavailable (send it again after
 * `retryAfterMs`, if the lane order does not matter to you).
 */
export class RejectedError extends FairlaneError {
  override name = "RejectedError";
  /** The client_ref of the rejected enqueue. */
  readonly clientRef: string;

  constructor(code: Code, message: string, retryAfterMs: number | undefined, clientRef: string) {
    super(message, code, { retryAfterMs });
    this.clientRef = clientRef;
  }
}

/** The Session stream ended (or was aborted) before this request was answered or finished. */
export class SessionClosedError extends FairlaneError {
  override name = "SessionClosedError";
  constructor(message: string, code: Code = Code.Canceled) {
    super(message, code);
  }
}

/**
 * The client was closed (Client.close) while this call, watch or Session was in progress,
 * or before it began.
 */
export class ClientClosedError extends FairlaneError {
  override name = "ClientClosedError";
  constructor(message = "the client is closed") {
    super(message, Code.Canceled);
  }
}

/**
 * A Session request the server accepted (it is stored: it runs, or ran) whose result the
 * session could not collect: the stream ended and reading WatchResults failed too, or the
 * session was aborted, or the client closed. Its outcome is unknown here, which is not a
 * failure: read it with `client.get(requestId)` or `client.watch()`. `reason` (also
 * `cause`) is what ended the session; `code` is its code.
 */
export class OutcomeUnknownError extends FairlaneError {
  override name = "OutcomeUnknownError";
  /** Always true: the server accepted this request. */
  readonly accepted = true;
  /** The accepted request's id. */
  readonly requestId: string;
  /** What ended the session before the request's result arrived. */
  readonly reason: FairlaneError;

  constructor(requestId: string, reason: FairlaneError) {
    super(
      `request ${requestId} was accepted (it is stored and runs or ran), but its outcome is ` +
        `unknown: ${reason.message}. Read it with client.get("${requestId}") or client.watch()`,
      reason.code,
      { cause: reason },
    );
    this.requestId = requestId;
    this.reason = reason;
  }
}

const BY_CODE: Partial<
  Record<Code, new (m: string, c: Code, o: FairlaneErrorOptions) => FairlaneError>
> = {
  [Code.Unauthenticated]: UnauthenticatedError,
  [Code.PermissionDenied]: PermissionDeniedError,
  [Code.NotFound]: NotFoundError,
  [Code.AlreadyExists]: AlreadyExistsError,
  [Code.InvalidArgument]: InvalidArgumentError,
  [Code.FailedPrecondition]: FailedPreconditionError,
  [Code.ResourceExhausted]: ResourceExhaustedError,
  [Code.Unavailable]: UnavailableError,
  [Code.DeadlineExceeded]: DeadlineExceededError,
};

/** Builds the FairlaneError subclass for a status code. */
export function errorForCode(
  code: Code,
  message: string,
  options: FairlaneErrorOptions = {},
): FairlaneError {
  const cls = BY_CODE[code] ?? FairlaneError;
  return new cls(message, code, options);
}

/**
 * The google.rpc.RetryInfo delay a server attached to an error (the grpc-status-details-bin
 * trailer, a google.rpc.Status whose details hold the RetryInfo), or undefined.
 */
export function retryDelayMs(error: ConnectError): number | undefined {
  for (const info of error.findDetails(RetryInfoSchema)) {
    const delay = info.retryDelay;
    if (delay !== undefined) {
      return Number(delay.seconds) * 1000 + Math.floor(delay.nanos / 1_000_000);
    }
  }
  return undefined;
}

// Node's codes for a connection that failed or went away under a call.
const CONNECTION_LOST = new Set([
  "ECONNRESET",
  "ECONNREFUSED",
  "EPIPE",
  "ETIMEDOUT",
  "ENOTFOUND",
  "EAI_AGAIN",
  "ERR_HTTP2_GOAWAY_SESSION",
  "ERR_HTTP2_INVALID_SESSION",
  "ERR_HTTP2_SESSION_ERROR",
  "ERR_HTTP2_STREAM_CANCEL",
  "ERR_STREAM_DESTROYED",
]);

function lostConnection(error: unknown): boolean {
  for (let e = error, depth = 0; e instanceof Error && depth < 10; e = e.cause, depth++) {
    const code = (e as { code?: unknown }).code;
    if (typeof code === "string" && CONNECTION_LOST.has(code)) {
      return true;
    }
  }
  return false;
}

// connect's own refusal to send a message over the transport's writeMaxBytes: the client's
// fault, not the server's RESOURCE_EXHAUSTED ("slow down"), so never retried.
const OVER_WRITE_LIMIT = /message size (\d+) is larger than configured writeMaxBytes (\d+)/;

/** Any thrown value as a FairlaneError, keeping the server's message and RetryInfo. */
export function toFairlaneError(error: unknown): FairlaneError {
  if (error instanceof FairlaneError) {
    return error;
  }
  const connect = ConnectError.from(error);
  let code = connect.code;
  const over = code === Code.ResourceExhausted ? OVER_WRITE_LIMIT.exec(connect.rawMessage) : null;
  if (over !== null) {
    return new InvalidArgumentError(
      `the message is ${over[1]} bytes serialized, over the ${over[2]}-byte gRPC message ` +
        "limit; it was not sent",
      Code.InvalidArgument,
      { cause: error },
    );
  }
  // connect-node reports a reset connection as ABORTED (a server's reading: the client
  // hung up). To a client it means the server or the path to it went away, which gRPC
  // calls UNAVAILABLE, and which retries and Session resume rightly treat as transient.
  if (
    (code === Code.Aborted || code === Code.Unknown || code === Code.Internal) &&
    lostConnection(error)
  ) {
    code = Code.Unavailable;
  }
  return errorForCode(code, connect.rawMessage || Code[code], {
    retryAfterMs: retryDelayMs(connect),
    cause: error,
  });
}
