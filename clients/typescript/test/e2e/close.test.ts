import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { test } from "node:test";
import { fileURLToPath } from "node:url";
import {
  ClientClosedError,
  OutcomeUnknownError,
  RequestStatus,
  type Result,
} from "../../src/index.js";
import { newClient, newUser, targets, waitUntil } from "./support.js";

test("Client.close(): an open watch and Session end with ClientClosedError, new calls too", async () => {
  const client = newClient();
  await newUser(client);
  const { requestId: first } = await client.enqueue("echo", "stored");
  const seen: Result[] = [];
  const watching = (async () => {
    for await (const result of client.watch(0n)) {
      seen.push(result);
    }
  })();
  let accepted = 0;
  const session = client.session({
    onEvent: (event) => {
      if (event.case === "accepted") {
        accepted += 1;
      }
    },
  });
  const running = session.submit("sleep", "3", { clientRef: "running" });
  await waitUntil(() => accepted === 1 && seen.length === 1);
  assert.equal(seen[0]?.requestId, first);

  client.close();
  await assert.rejects(watching, ClientClosedError);
  await assert.rejects(session.close(), ClientClosedError);
  let requestId = "";
  await assert.rejects(running, (error: unknown) => {
    assert.ok(error instanceof OutcomeUnknownError, String(error));
    assert.ok(error.reason instanceof ClientClosedError);
    assert.match(error.message, /was accepted/);
    requestId = error.requestId;
    return true;
  });
  await assert.rejects(client.whoami(), ClientClosedError);
  await assert.rejects(client.enqueue("echo", "after close"), ClientClosedError);
  assert.throws(() => client.session(), ClientClosedError);

  // The request the closed session had accepted still runs: another client reads its result.
  const other = newClient({ tokens: client.tokens });
  try {
    for await (const result of other.watch(1n)) {
      assert.equal(result.requestId, requestId);
      assert.equal(result.status, RequestStatus.SUCCEEDED);
      break;
    }
  } finally {
    other.close();
  }
});

test("a program that closes its client with a watch and a Session open exits by itself", async () => {
  const client = newClient();
  try {
    await newUser(client);
    const child = spawn(
      process.execPath,
      [fileURLToPath(new URL("../fixtures/close-child.js", import.meta.url))],
      {
        env: {
          ...process.env,
          FAIRLANE_AUTH_TARGET: targets.auth,
          FAIRLANE_QUEUE_TARGET: targets.queue,
          FAIRLANE_TEST_TOKENS: JSON.stringify(client.tokens),
        },
        stdio: ["ignore", "pipe", "pipe"],
      },
    );
    let output = "";
    for (const stream of [child.stdout, child.stderr]) {
      stream.on("data", (chunk: Buffer) => {
        output += chunk.toString();
      });
    }
    const exited = new Promise<number | null>((resolve) => child.on("exit", resolve));
    const timer = setTimeout(() => child.kill("SIGKILL"), 20_000);
    const code = await exited;
    clearTimeout(timer);
    assert.equal(code, 0, `the program did not exit by itself:\n${output}`);
    assert.deepEqual(JSON.parse(output.trim()), [
      "ClientClosedError",
      "OutcomeUnknownError",
      "ClientClosedError",
    ]);
  } finally {
    client.close();
  }
});
