"""Benchmark: messages/s through `messaging` on each backend, and ours vs raw aiokafka on the same Tansu.

    .venv/bin/python -m bench.messaging [--memory 100000] [--kafka 20000] [--gcp 3000] [--rounds 3]

Each run publishes N messages shaped like the gateway's requests (784-byte payload = one 28×28
image, a unique key, six attributes) to a fresh topic while one consumer of a fresh group acks them.
Publishes are issued `--window` at a time with `asyncio.gather`, as a busy gateway does. Reported:
publish rate (until the last publish returned, i.e. the broker acknowledged it) and end-to-end rate
(until the consumer acked the last message).

The Kafka comparison runs the same workload through raw aiokafka with the same settings (acks=all,
no idempotence, same linger, batch size, partitions and fetch wait; headers built per message, the
consumer decodes key and headers and commits after each fetched batch) on the same Tansu,
interleaved with ours round by round; the ratio ours/raw is the claim (goal >= 0.9). A third row
runs raw aiokafka with its default 16 KiB batches, the setting a user who starts from scratch has. Tansu and the Pub/Sub emulator are started on free ports and stopped afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

# Runs as `python -m bench.messaging` (like the other benches) or as a script.
_BENCH_DIR = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH_DIR]
sys.path.insert(0, str(_BENCH_DIR.parent))

import messaging  # noqa: E402
from tests.brokers import KAFKA_TEST_TUNING, start_pubsub_emulator, start_tansu  # noqa: E402

PAYLOAD = os.urandom(28 * 28)
ATTRIBUTES = {
    "request_id": "0" * 32,
    "shape": "1,28,28",
    "submitted_at": "1764246000.123",
    "deadline": "1764246060.123",
    "owner": "",
    "metadata": "{}",
}
PARTITIONS = 4
OUR_MAX_BATCH_BYTES = 256 * 1024  # messaging.kafka's default `max_batch_bytes`
AIOKAFKA_DEFAULT_BATCH_BYTES = 16 * 1024


@dataclass(frozen=True)
class Rates:
    publish_per_s: float
    end_to_end_per_s: float


def fresh(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def ours(url: str, count: int, window: int, **options: object) -> Rates:
    """Publish `count` messages through `messaging` while one subscription acks them."""
    topic, group = fresh("bench"), fresh("g")
    async with messaging.connect(url, kafka_partitions=PARTITIONS, **options) as pubsub:  # type: ignore[arg-type]
        await pubsub.ensure_topics(topic)
        messages = pubsub.subscribe(topic, group=group, max_in_flight=1024)
        await messages.start()
        received = 0
        all_received = asyncio.Event()

        async def consume() -> None:
            nonlocal received
            async for message in messages:
                await message.ack()
                received += 1
                if received == count:
                    all_received.set()

        consumer = asyncio.create_task(consume())
        started = time.perf_counter()
        for first in range(0, count, window):
            await asyncio.gather(
                *(
                    pubsub.publish(topic, PAYLOAD, key=f"r{i}", attributes=ATTRIBUTES)
                    for i in range(first, min(first + window, count))
                )
            )
        published = time.perf_counter() - started
        await asyncio.wait_for(all_received.wait(), 300)
        finished = time.perf_counter() - started
        await messages.aclose()
        await consumer
    return Rates(count / published, count / finished)


async def raw_aiokafka(
    bootstrap: str, count: int, window: int, *, max_batch_size: int = OUR_MAX_BATCH_BYTES
) -> Rates:
    """The same workload written directly against aiokafka, with the same client settings.

    `max_batch_size=16384` is aiokafka's own default, for the "library defaults" row."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    topic, group = fresh("raw"), fresh("g")
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    await admin.create_topics([NewTopic(topic, num_partitions=PARTITIONS, replication_factor=1)])
    await admin.close()
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        enable_idempotence=False,
        linger_ms=2,
        max_batch_size=max_batch_size,
        max_request_size=4 << 20,
    )
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=2000,
        heartbeat_interval_ms=200,
        fetch_max_wait_ms=50,
        max_partition_fetch_bytes=4 << 20,
    )
    await producer.start()
    await consumer.start()
    try:
        while not consumer.assignment():  # noqa: ASYNC110 - aiokafka has no awaitable for the first assignment without a listener
            await asyncio.sleep(0.05)
        received = 0

        async def consume() -> None:
            nonlocal received
            while received < count:
                batches = await consumer.getmany(timeout_ms=1000, max_records=1024)
                for records in batches.values():
                    for record in records:  # what any consumer does to use a message
                        key = record.key.decode() if record.key is not None else None
                        attributes = {name: value.decode() for name, value in record.headers}
                        received += key is not None and len(attributes) == len(ATTRIBUTES)
                if batches:
                    await consumer.commit()

        consumer_task = asyncio.create_task(consume())
        started = time.perf_counter()
        for first in range(0, count, window):
            await asyncio.gather(
                *(
                    producer.send_and_wait(
                        topic,
                        PAYLOAD,
                        key=f"r{i}".encode(),
                        # Attributes differ per request (id, deadline), so headers are built per message.
                        headers=[(name, value.encode()) for name, value in ATTRIBUTES.items()],
                    )
                    for i in range(first, min(first + window, count))
                )
            )
        published = time.perf_counter() - started
        await asyncio.wait_for(consumer_task, 300)
        finished = time.perf_counter() - started
    finally:
        await consumer.stop()
        await producer.stop()
    return Rates(count / published, count / finished)


async def rounds(name: str, runs: int, measure: Callable[[], Awaitable[Rates]]) -> Rates:
    results = []
    for round_number in range(runs):
        rates = await measure()
        print(
            f"  {name} round {round_number + 1}: publish {rates.publish_per_s:,.0f}/s, "
            f"end-to-end {rates.end_to_end_per_s:,.0f}/s",
            file=sys.stderr,
        )
        results.append(rates)
    return Rates(
        statistics.median(r.publish_per_s for r in results),
        statistics.median(r.end_to_end_per_s for r in results),
    )


async def main(args: argparse.Namespace) -> None:
    print(
        f"load average at start: {os.getloadavg()[0]:.2f} (2-core machine; compare figures of one run)",
        file=sys.stderr,
    )
    table: list[tuple[str, int, Rates]] = []
    log_dir = Path(tempfile.mkdtemp(prefix="bench-messaging-"))

    if args.memory:
        table.append(
            (
                "memory:// (ours)",
                args.memory,
                await rounds(
                    "memory",
                    args.rounds,
                    lambda: ours(f"memory://{fresh('bench')}", args.memory, args.window),
                ),
            )
        )

    if args.kafka:
        tansu = start_tansu(log_dir)
        bootstrap = f"127.0.0.1:{tansu.port}"
        url = f"kafka://{bootstrap}?{KAFKA_TEST_TUNING}"
        sides: dict[str, Callable[[], Awaitable[Rates]]] = {
            "kafka:// Tansu (ours)": lambda: ours(
                url, args.kafka, args.window, kafka_idempotence=False
            ),
            "raw aiokafka, same settings": lambda: raw_aiokafka(bootstrap, args.kafka, args.window),
            "raw aiokafka, its default batch size": lambda: raw_aiokafka(
                bootstrap, args.kafka, args.window, max_batch_size=AIOKAFKA_DEFAULT_BATCH_BYTES
            ),
        }
        runs: dict[str, list[Rates]] = {name: [] for name in sides}
        try:
            for round_number in range(args.rounds):
                # Interleaved, in a rotating order, so that machine noise and broker state hit all alike.
                names = list(sides)
                names = names[round_number % len(names) :] + names[: round_number % len(names)]
                for name in names:
                    runs[name].append(await rounds(name, 1, sides[name]))
        finally:
            tansu.stop()
        kafka_rates = {
            name: Rates(
                statistics.median(r.publish_per_s for r in results),
                statistics.median(r.end_to_end_per_s for r in results),
            )
            for name, results in runs.items()
        }
        for name, rates in kafka_rates.items():
            table.append((name, args.kafka, rates))
        ours_kafka = kafka_rates["kafka:// Tansu (ours)"]
        raw_kafka = kafka_rates["raw aiokafka, same settings"]
        pair_ratios = [
            o.publish_per_s / r.publish_per_s
            for o, r in zip(
                runs["kafka:// Tansu (ours)"], runs["raw aiokafka, same settings"], strict=True
            )
        ]

    if args.gcp:
        emulator = start_pubsub_emulator(log_dir)
        url = f"gcp://bench?emulator=127.0.0.1:{emulator.port}"
        try:
            table.append(
                (
                    "gcp:// emulator (ours)",
                    args.gcp,
                    await rounds("gcp", args.rounds, lambda: ours(url, args.gcp, args.window)),
                )
            )
            unordered = url + "&ordering=false"
            table.append(
                (
                    "gcp:// emulator, ?ordering=false",
                    args.gcp,
                    await rounds(
                        "gcp unordered", args.rounds, lambda: ours(unordered, args.gcp, args.window)
                    ),
                )
            )
        finally:
            emulator.stop()

    print(
        f"\nmedian of {args.rounds} rounds; window = {args.window} concurrent publishes; 784-byte payload + 6 attributes\n"
    )
    print("| backend | messages | publish msgs/s | end-to-end msgs/s |")
    print("| --- | ---: | ---: | ---: |")
    for name, count, rates in table:
        print(
            f"| {name} | {count:,} | {rates.publish_per_s:,.0f} | {rates.end_to_end_per_s:,.0f} |"
        )
    if args.kafka:
        print(
            f"\nours / raw aiokafka on the same Tansu: publish {ours_kafka.publish_per_s / raw_kafka.publish_per_s:.2f}, "
            f"end-to-end {ours_kafka.end_to_end_per_s / raw_kafka.end_to_end_per_s:.2f} (goal >= 0.9); "
            f"publish ratio per round: {', '.join(f'{r:.2f}' for r in pair_ratios)}"
        )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--memory", type=int, default=100_000, help="messages through memory:// (0 skips)"
    )
    parser.add_argument(
        "--kafka", type=int, default=20_000, help="messages through Tansu, ours and raw (0 skips)"
    )
    parser.add_argument(
        "--gcp", type=int, default=3_000, help="messages through the Pub/Sub emulator (0 skips)"
    )
    parser.add_argument("--window", type=int, default=1000, help="concurrent publishes per gather")
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds per backend; the median is reported"
    )
    return parser.parse_args()


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
