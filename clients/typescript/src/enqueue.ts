/**
 * The wire form of an enqueue, shared by Client.enqueue and Session.submit: the checks that
 * refuse a value that cannot be sent (InvalidArgumentError, before anything is sent) and
 * the exact size of the message, which must stay under the gRPC message limit.
 */
import { create } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import { Code, InvalidArgumentError } from "./errors.js";
import { type EnqueueRequest, EnqueueRequestSchema } from "./gen/fairlane/queue/v1/queue_pb.js";

/** Handler input: bytes, or a string sent UTF-8 encoded. */
export type Payload = Uint8Array | string;

export interface EnqueueOptions {
  /** Unique per user; a repeat returns the first request. Generated when not given. */
  idempotencyKey?: string;
  /** If the request has not started by then it becomes EXPIRED (a valid Date in the years 1 to 9999). */
  deadline?: Date;
  /** Attempts before dead-lettering, a whole number from 0 to 2^32 - 1; 0 or unset: the handler's default. */
  maxAttempts?: number;
  /** Echoed in the result. */
  clientRef?: string;
}

/**
 * The servers' message limit (services/core/grpc_host.py), which the client's transport
 * enforces on what it sends too: a larger message would fail the whole call (a Session
 * stream with every request on it), so the client refuses such an enqueue itself.
 */
export const MAX_MESSAGE_BYTES = 8 * 1024 * 1024;

export const UINT32_MAX = 2 ** 32 - 1;

// google.protobuf.Timestamp's range: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999Z.
const MIN_TIMESTAMP_MS = -62_135_596_800_000;
const MAX_TIMESTAMP_MS = 253_402_300_799_999;

export function payloadBytes(payload: Payload | undefined): Uint8Array {
  if (payload === undefined) {
    return new Uint8Array();
  }
  return typeof payload === "string" ? new TextEncoder().encode(payload) : payload;
}

function describe(value: unknown): string {
  if (typeof value === "string") {
    return JSON.stringify(value.length > 40 ? `${value.slice(0, 40)}...` : value);
  }
  if (value instanceof Date) {
    return Number.isNaN(value.getTime()) ? "Invalid Date" : value.toISOString();
  }
  return typeof value === "bigint" ? `${value}n` : String(value);
}

function invalid(message: string): InvalidArgumentError {
  return new InvalidArgumentError(message, Code.InvalidArgument);
}

/** `value` for an unsigned protobuf field, or InvalidArgumentError (protobuf-es would fail the write). */
export function unsigned(name: string, value: unknown, high: number): number {
  if (typeof value !== "number" || !Number.isInteger(value)) {
    throw invalid(`${name} must be a whole number, not ${describe(value)}`);
  }
  if (value < 0 || value > high) {
    throw invalid(`${name} must be from 0 to ${high}, not ${value}`);
  }
  return value;
}

function optionalString(name: string, value: unknown): string {
  if (value === undefined) {
    return "";
  }
  if (typeof value !== "string") {
    throw invalid(`${name} must be a string, not ${describe(value)}`);
  }
  return value;
}

function deadlineTimestamp(deadline: unknown) {
  if (deadline === undefined) {
    return undefined;
  }
  if (!(deadline instanceof Date)) {
    throw invalid(`deadline must be a Date, not ${describe(deadline)}`);
  }
  const ms = deadline.getTime();
  if (Number.isNaN(ms)) {
    throw invalid("deadline is an invalid Date");
  }
  if (ms < MIN_TIMESTAMP_MS || ms > MAX_TIMESTAMP_MS) {
    throw invalid(
      `deadline ${describe(deadline)} is out of range (it must fall in the years 1 to 9999)`,
    );
  }
  return timestampFromDate(deadline);
}

/**
 * The EnqueueRequest to send. A value that cannot be sent (a maxAttempts that is not a
 * whole number from 0 to 2^32 - 1, a deadline that is not a valid Date in the years 1 to
 * 9999, a payload that is neither bytes nor a string, ...) throws InvalidArgumentError.
 */
export function enqueueMessage(
  handler: string,
  payload: Payload | undefined,
  options: EnqueueOptions,
): EnqueueRequest {
  if (typeof handler !== "string") {
    throw invalid(`handler must be a string, not ${describe(handler)}`);
  }
  if (payload !== undefined && typeof payload !== "string" && !(payload instanceof Uint8Array)) {
    throw invalid(`payload must be a Uint8Array or a string, not ${describe(payload)}`);
  }
  if (options === null || typeof options !== "object") {
    throw invalid(`options must be an object, not ${describe(options)}`);
  }
  const maxAttempts =
    options.maxAttempts === undefined
      ? 0
      : unsigned("maxAttempts", options.maxAttempts, UINT32_MAX);
  return create(EnqueueRequestSchema, {
    handler,
    payload: payloadBytes(payload),
    idempotencyKey: optionalString("idempotencyKey", options.idempotencyKey),
    deadline: deadlineTimestamp(options.deadline),
    maxAttempts,
    clientRef: optionalString("clientRef", options.clientRef),
  });
}

// -- sizes ---------------------------------------------------------------------------------

/** Bytes of a varint holding `value` (a non-negative safe integer). */
function varintSize(value: number): number {
  let size = 1;
  while (value >= 128) {
    value = Math.floor(value / 128);
    size += 1;
  }
  return size;
}

/** Bytes of an int64 varint: a negative number takes ten. */
function varint64Size(value: bigint): number {
  if (value < 0n) {
    return 10;
  }
  let size = 1;
  while (value >= 128n) {
    value >>= 7n;
    size += 1;
  }
  return size;
}

/** UTF-8 bytes of a string as protobuf-es writes it (TextEncoder: a lone surrogate becomes U+FFFD). */
export function utf8Size(text: string): number {
  let size = 0;
  for (let i = 0; i < text.length; i++) {
    const unit = text.charCodeAt(i);
    if (unit < 0x80) {
      size += 1;
    } else if (unit < 0x800) {
      size += 2;
    } else if (unit >= 0xd800 && unit <= 0xdbff && i + 1 < text.length) {
      const next = text.charCodeAt(i + 1);
      if (next >= 0xdc00 && next <= 0xdfff) {
        size += 4;
        i += 1;
      } else {
        size += 3;
      }
    } else {
      size += 3;
    }
  }
  return size;
}

/**
 * Bytes that a message of `size` bytes takes as a field of another (a one-byte tag, the
 * length as a varint, then the message): SessionRequest{enqueue: r} is
 * fieldSize(enqueueSize(r)) bytes.
 */
export function fieldSize(size: number): number {
  return 1 + varintSize(size) + size;
}

/** Serialized bytes of an EnqueueRequest (its fields' numbers are all below 16: one-byte tags). */
export function enqueueSize(request: EnqueueRequest): number {
  let size = 0;
  const text = (value: string): void => {
    if (value.length > 0) {
      size += fieldSize(utf8Size(value));
    }
  };
  text(request.handler);
  if (request.payload.byteLength > 0) {
    size += fieldSize(request.payload.byteLength);
  }
  text(request.idempotencyKey);
  const deadline = request.deadline;
  if (deadline !== undefined) {
    let body = 0;
    if (deadline.seconds !== 0n) {
      body += 1 + varint64Size(deadline.seconds);
    }
    if (deadline.nanos !== 0) {
      body += 1 + (deadline.nanos < 0 ? 10 : varintSize(deadline.nanos));
    }
    size += fieldSize(body);
  }
  if (request.maxAttempts !== 0) {
    size += 1 + varintSize(request.maxAttempts);
  }
  text(request.clientRef);
  return size;
}

/**
 * Why an enqueue of `size` serialized bytes cannot be sent under a message limit of
 * `limit` bytes, or undefined when it can.
 */
export function tooLarge(request: EnqueueRequest, size: number, limit: number): string | undefined {
  if (size <= limit) {
    return undefined;
  }
  const mib = limit % 2 ** 20 === 0 ? ` (${limit / 2 ** 20} MiB)` : "";
  return (
    `the request is ${size} bytes serialized (payload ${request.payload.byteLength} bytes), ` +
    `over the ${limit}-byte gRPC message limit${mib}; it was not sent`
  );
}
