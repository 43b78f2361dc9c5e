"""What RabbitMQ alone does with the lane relay's publishing pattern: persistent,
confirmed messages to many durable queues, one message in flight per queue.

It declares `--queues` throw-away durable queues (single active consumer, as lanes are)
behind a direct exchange, publishes to each from its own task with one publish awaiting
its confirm at a time, over `--channels` channels, for `--seconds`, and reports
messages/s and the confirm latency; then it deletes what it declared.

    .venv/bin/python scripts/lane_publish_probe.py --queues 1000
    .venv/bin/python scripts/lane_publish_probe.py --queues 1000 --channels 8

With one publish in flight per queue, the confirm latency is the number of queues over
the rate (Little's law): a slow confirm at 1,000 lanes says how many wait, not that the
broker is slow.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid

import aio_pika

BODY = b"x" * 200  # about one LaneBatch of one small request


async def probe(url: str, queues: int, channels: int, seconds: float) -> None:
    connection = await aio_pika.connect(url)
    try:
        setup = await connection.channel()
        tag = uuid.uuid4().hex[:8]
        exchange = await setup.declare_exchange(
            f"probe-{tag}", aio_pika.ExchangeType.DIRECT, auto_delete=True
        )
        declared = []
        for n in range(queues):
            queue = await setup.declare_queue(
                f"probe-{tag}-{n}", durable=True, arguments={"x-single-active-consumer": True}
            )
            await queue.bind(exchange, routing_key=str(n))
            declared.append(queue)
        publishers = []
        for _ in range(channels):
            channel = await connection.channel(publisher_confirms=True)
            publishers.append(await channel.get_exchange(exchange.name, ensure=False))
        latencies: list[float] = []
        stop = time.perf_counter() + seconds

        async def lane(n: int) -> None:
            target = publishers[n % channels]
            message = aio_pika.Message(BODY, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
            while time.perf_counter() < stop:
                started = time.perf_counter()
                await target.publish(message, str(n), mandatory=True)
                latencies.append(time.perf_counter() - started)

        began = time.perf_counter()
        await asyncio.gather(*(lane(n) for n in range(queues)))
        elapsed = time.perf_counter() - began
        latencies.sort()
        p50 = latencies[len(latencies) // 2] * 1000
        p99 = latencies[int(len(latencies) * 0.99)] * 1000
        print(
            f"{queues} queues over {channels} channel(s): {len(latencies) / elapsed:,.0f} "
            f"confirmed messages/s, confirm p50 {p50:.1f} ms, p99 {p99:.1f} ms"
        )
        for queue in declared:
            await queue.delete(if_unused=False, if_empty=False)
    finally:
        await connection.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--queues", type=int, default=1000)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=8.0)
    args = parser.parse_args()
    asyncio.run(probe(args.url, args.queues, args.channels, args.seconds))


if __name__ == "__main__":
    main()
