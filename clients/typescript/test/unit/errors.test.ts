import assert from "node:assert/strict";
import { test } from "node:test";
import { create, toBinary } from "@bufbuild/protobuf";
import { ConnectError } from "@connectrpc/connect";
import { RetryInfoSchema } from "../../src/gen/google/rpc/error_details_pb.js";
import {
  Code,
  FairlaneError,
  InvalidArgumentError,
  ResourceExhaustedError,
  retryDelayMs,
  toFairlaneError,
  UnavailableError,
} from "../../src/index.js";

function withRetryInfo(code: Code, seconds: bigint, nanos: number): ConnectError {
  const error = new ConnectError("slow down", code);
  // What the gRPC transport makes of a grpc-status-details-bin trailer's Any.
  error.details.push({
    type: RetryInfoSchema.typeName,
    value: toBinary(RetryInfoSchema, create(RetryInfoSchema, { retryDelay: { seconds, nanos } })),
  });
  return error;
}

test("a RetryInfo detail becomes retryAfterMs on the typed error", () => {
  const error = toFairlaneError(withRetryInfo(Code.ResourceExhausted, 1n, 250_000_000));
  assert.ok(error instanceof ResourceExhaustedError);
  assert.ok(error instanceof FairlaneError);
  assert.equal(error.code, Code.ResourceExhausted);
  assert.equal(error.retryAfterMs, 1250);
  assert.equal(error.message, "slow down");
  assert.equal(error.name, "ResourceExhaustedError");
});

test("no RetryInfo means no retry advice", () => {
  const error = toFairlaneError(new ConnectError("down", Code.Unavailable));
  assert.ok(error instanceof UnavailableError);
  assert.equal(error.retryAfterMs, undefined);
  assert.equal(retryDelayMs(new ConnectError("x", Code.Unavailable)), undefined);
});

test("each status code has its class; others stay FairlaneError", () => {
  assert.ok(
    toFairlaneError(new ConnectError("bad", Code.InvalidArgument)) instanceof InvalidArgumentError,
  );
  const other = toFairlaneError(new ConnectError("odd", Code.DataLoss));
  assert.equal(other.constructor, FairlaneError);
  assert.equal(other.code, Code.DataLoss);
});

test("a connection reset under a call is UNAVAILABLE, not connect-node's ABORTED", () => {
  const reset = Object.assign(new Error("read ECONNRESET"), { code: "ECONNRESET" });
  const error = toFairlaneError(
    new ConnectError("read ECONNRESET", Code.Aborted, undefined, undefined, reset),
  );
  assert.ok(error instanceof UnavailableError);
  assert.equal(error.code, Code.Unavailable);
  const aborted = toFairlaneError(new ConnectError("gone", Code.Aborted));
  assert.equal(aborted.code, Code.Aborted);
});
