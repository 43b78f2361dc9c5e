import assert from "node:assert/strict";
import { test } from "node:test";
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { RequestStatus, ResultSchema } from "../../src/gen/fairlane/common/v1/common_pb.js";
import {
  EnqueueRequestSchema,
  ListRequestsRequestSchema,
} from "../../src/gen/fairlane/queue/v1/queue_pb.js";

test("a negative uint32 is refused at encoding, not wrapped", () => {
  const message = create(EnqueueRequestSchema, { handler: "echo", maxAttempts: -1 });
  assert.throws(() => toBinary(EnqueueRequestSchema, message), /uint32/);
});

test("an unset ListRequests status is absent on the wire; a set one is sent even if 0", () => {
  const unset = create(ListRequestsRequestSchema, {});
  assert.equal(toBinary(ListRequestsRequestSchema, unset).length, 0);
  const unspecified = create(ListRequestsRequestSchema, { status: RequestStatus.UNSPECIFIED });
  assert.deepEqual([...toBinary(ListRequestsRequestSchema, unspecified)], [0x08, 0x00]);
});

test("lane_seq beyond 2^53 stays exact as a bigint", () => {
  const big = 2n ** 63n + 7n;
  const bytes = toBinary(ResultSchema, create(ResultSchema, { laneSeq: big }));
  assert.equal(fromBinary(ResultSchema, bytes).laneSeq, big);
});
