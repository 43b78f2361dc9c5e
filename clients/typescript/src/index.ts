/**
 * @fairlane/client: a typed client for Fairlane's per-user FIFO request lanes.
 *
 * The generated messages and service descriptors are re-exported under their proto
 * packages (`queue`, `common`, `auth`, `worker`, `rpc`, `health`) for direct use.
 */

export {
  Client,
  type ClientOptions,
  type Enqueued,
  type Identity,
  MAX_TIMEOUT_MS,
  type RetryEvent,
  type Tokens,
  type WatchOptions,
} from "./client.js";
export { type EnqueueOptions, MAX_MESSAGE_BYTES, type Payload } from "./enqueue.js";
export {
  AlreadyExistsError,
  ClientClosedError,
  Code,
  DeadlineExceededError,
  FailedPreconditionError,
  FairlaneError,
  InvalidArgumentError,
  NotFoundError,
  NotLoggedInError,
  OutcomeUnknownError,
  PermissionDeniedError,
  RejectedError,
  ResourceExhaustedError,
  retryDelayMs,
  SessionClosedError,
  toFairlaneError,
  UnauthenticatedError,
  UnavailableError,
} from "./errors.js";
export * as auth from "./gen/fairlane/auth/v1/auth_pb.js";
export * as common from "./gen/fairlane/common/v1/common_pb.js";
export {
  type Progress,
  type Request,
  RequestStatus,
  type Result,
} from "./gen/fairlane/common/v1/common_pb.js";
export * as queue from "./gen/fairlane/queue/v1/queue_pb.js";
export * as worker from "./gen/fairlane/worker/v1/worker_pb.js";
export * as rpc from "./gen/google/rpc/error_details_pb.js";
export * as health from "./gen/grpc/health/v1/health_pb.js";
export {
  DEFAULT_RETRY,
  type RetryPolicy,
  retryDelay,
  STREAM_RECONNECT,
} from "./retry.js";
export {
  Session,
  type SessionEvent,
  type SessionHost,
  type SessionOptions,
  type Submission,
  type SubmitOptions,
} from "./session.js";
