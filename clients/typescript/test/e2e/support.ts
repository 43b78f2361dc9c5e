/**
 * What the end-to-end tests share. They run against real service processes that
 * tests/e2e/test_typescript_client.py starts (with PostgreSQL and RabbitMQ) and describes
 * in the environment; `npm run test:e2e` alone, without them, fails at once.
 */
import { randomUUID } from "node:crypto";
import { type AddressInfo, connect, createServer, type Server, type Socket } from "node:net";
import { setTimeout as delay } from "node:timers/promises";
import { Client, type ClientOptions } from "../../src/index.js";

function required(name: string): string {
  const value = process.env[name];
  if (value === undefined || value === "") {
    throw new Error(
      `${name} is not set: run these tests through tests/e2e/test_typescript_client.py`,
    );
  }
  return value;
}

export const targets = {
  auth: required("FAIRLANE_AUTH_TARGET"),
  queue: required("FAIRLANE_QUEUE_TARGET"),
  worker: required("FAIRLANE_WORKER_TARGET"),
};
/** Lifetime of access tokens in the suite under test. */
export const TOKEN_TTL_MS = Number(required("FAIRLANE_TEST_TOKEN_TTL_SECONDS")) * 1000;
/** Per-user token bucket of the suite under test: size and refill per second. */
export const USER_BURST = Number(required("FAIRLANE_TEST_USER_BURST"));

export const PASSWORD = "correct horse battery";

export function newClient(options: Partial<ClientOptions> = {}): Client {
  return new Client({ ...targets, ...options });
}

/** Registers a fresh user and logs `client` in as it; returns the username. */
export async function newUser(client: Client): Promise<string> {
  const username = `ts-${randomUUID().slice(0, 12)}`;
  await client.register(username, PASSWORD);
  await client.login(username, PASSWORD);
  return username;
}

/** Polls real state until `check` holds; fails after `timeoutMs`. */
export async function waitUntil(check: () => boolean | Promise<boolean>, timeoutMs = 30_000) {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) {
      throw new Error(`condition not met within ${timeoutMs} ms`);
    }
    await delay(20);
  }
}

/**
 * Asks the harness to SIGKILL the queue replica and start a new one on the same port;
 * resolves once the new one is SERVING.
 */
export function restartQueue(): Promise<void> {
  const [host, port] = required("FAIRLANE_TEST_CONTROL").split(":");
  return new Promise((resolve, reject) => {
    const socket = connect(Number(port), host, () => socket.write("restart queue\n"));
    let answer = "";
    socket.setEncoding("utf8");
    socket.on("data", (chunk: string) => {
      answer += chunk;
    });
    socket.on("error", reject);
    socket.on("end", () => {
      if (answer.trim() === "ok") {
        resolve();
      } else {
        reject(new Error(`the harness answered ${JSON.stringify(answer)}`));
      }
    });
  });
}

/**
 * A TCP proxy for fault drills: forwards to `target` and lets a test lose the server's
 * answers (requests still arrive) or cut every connection at once.
 */
export class TcpProxy {
  readonly #server: Server;
  readonly #pairs = new Set<[Socket, Socket]>();
  #repliesHeld = false;

  private constructor(target: string) {
    const [host, port] = target.split(":");
    this.#server = createServer((client) => {
      const upstream = connect(Number(port), host);
      const pair: [Socket, Socket] = [client, upstream];
      this.#pairs.add(pair);
      const close = (): void => {
        this.#pairs.delete(pair);
        client.destroy();
        upstream.destroy();
      };
      client.on("data", (chunk) => upstream.write(chunk));
      upstream.on("data", (chunk) => {
        if (!this.#repliesHeld) {
          client.write(chunk);
        }
      });
      for (const socket of pair) {
        socket.on("error", close);
        socket.on("close", close);
      }
    });
  }

  static async start(target: string): Promise<TcpProxy> {
    const proxy = new TcpProxy(target);
    await new Promise<void>((resolve) => proxy.#server.listen(0, "127.0.0.1", resolve));
    return proxy;
  }

  get target(): string {
    const address = this.#server.address() as AddressInfo;
    return `127.0.0.1:${address.port}`;
  }

  /** Drops what the server sends from now on, until cut(): its answers are lost. */
  holdReplies(): void {
    this.#repliesHeld = true;
  }

  /** Drops every open connection at once (both directions); returns how many. */
  cut(): number {
    this.#repliesHeld = false;
    const pairs = [...this.#pairs];
    for (const pair of pairs) {
      this.#pairs.delete(pair);
      for (const socket of pair) {
        socket.resetAndDestroy();
      }
    }
    return pairs.length;
  }

  async close(): Promise<void> {
    this.cut();
    await new Promise<void>((resolve) => this.#server.close(() => resolve()));
  }
}
