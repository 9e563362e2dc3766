"""kafka:// specifics: `publish_many` hands records to the producer itself, without a task per
message; records without a key go to the topic's sticky partition."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Generator
from typing import Any

import pytest

import messaging
from messaging.kafka._batches import STICKY_RUN_BYTES
from messaging.kafka._partitioner import Murmur2Partitioner
from tests.brokers import connect_options, unique_name

pytestmark = [pytest.mark.timeout(60), pytest.mark.kafka]


async def test_publish_many_creates_no_task_per_message(kafka_url: str) -> None:
    """200 records in one publish_many start fewer than 10 tasks, and all arrive."""
    topic = unique_name("many")
    async with messaging.connect(kafka_url, **connect_options(kafka_url)) as pubsub:
        await pubsub.ensure_topics(topic)
        await pubsub.publish(topic, b"warm-up")  # metadata and connections outside the count
        loop = asyncio.get_running_loop()
        started: list[str] = []

        def counting_factory(
            loop: asyncio.AbstractEventLoop,
            coro: Coroutine[Any, Any, Any] | Generator[Any, None, Any],
            **kwargs: Any,
        ) -> asyncio.Task[Any]:
            started.append(getattr(coro, "__qualname__", "?"))
            return asyncio.Task(coro, loop=loop, **kwargs)

        loop.set_task_factory(counting_factory)
        try:
            outcomes = await pubsub.publish_many(
                topic, [(b"x%d" % i, f"k{i}", {"n": str(i)}) for i in range(200)]
            )
        finally:
            loop.set_task_factory(None)
    assert outcomes == [None] * 200
    assert len(started) < 10, started[:5]


async def test_concurrent_publish_many_calls_share_the_partitions_batch(kafka_url: str) -> None:
    """Two publish_many calls at once on a 1-partition topic fill one batch, and all arrive."""
    topic = unique_name("shared")
    # A linger keeps the first call's batch open in the producer while the second call appends.
    url = f"{kafka_url}{'&' if '?' in kafka_url else '?'}linger_ms=200"
    options = {**connect_options(kafka_url), "kafka_partitions": 1}
    async with messaging.connect(url, **options) as pubsub:
        await pubsub.ensure_topics(topic)
        await pubsub.publish(topic, b"warm-up")
        accumulator = pubsub._producer._message_accumulator  # type: ignore[attr-defined]
        append_batch = accumulator._append_batch
        opened: list[object] = []

        def counting_append_batch(builder: object, tp: object) -> object:
            opened.append(tp)
            return append_batch(builder, tp)

        accumulator._append_batch = counting_append_batch
        first, second = await asyncio.gather(
            pubsub.publish_many(topic, [(b"a%d" % i, f"a{i}", None) for i in range(30)]),
            pubsub.publish_many(topic, [(b"b%d" % i, f"b{i}", None) for i in range(30)]),
        )
        async with pubsub.subscribe(topic, group=unique_name("g"), start="earliest") as messages:
            received = [await anext(messages) for _ in range(61)]
    assert first == [None] * 30 and second == [None] * 30
    assert len(opened) == 1
    assert sorted(m.data for m in received) == sorted(
        [b"warm-up"] + [b"a%d" % i for i in range(30)] + [b"b%d" % i for i in range(30)]
    )


def _partition_of(message: messaging.Message) -> int:
    return message._partition.tp.partition  # type: ignore[attr-defined]


async def test_keyless_records_published_meanwhile_share_one_partition(kafka_url: str) -> None:
    """While a topic's batch waits for the sender, its keyless records (publish_many calls and a
    publish) all join that one partition; keyed records still go to their key's partition."""
    topic = unique_name("sticky")
    # A linger keeps the open batch waiting while the other calls append.
    url = f"{kafka_url}{'&' if '?' in kafka_url else '?'}linger_ms=300"
    options = {**connect_options(kafka_url), "kafka_partitions": 4}
    async with messaging.connect(url, **options) as pubsub:
        await pubsub.ensure_topics(topic)
        await pubsub.publish(topic, b"warm-up", key="w")
        outcomes = await asyncio.gather(
            pubsub.publish_many(topic, [(b"a%d" % i, None, None) for i in range(20)]),
            pubsub.publish_many(topic, [(b"b%d" % i, None, None) for i in range(20)]),
            pubsub.publish(topic, b"c0"),
            pubsub.publish_many(topic, [(b"k%d" % i, f"key{i}", None) for i in range(8)]),
        )
        async with pubsub.subscribe(topic, group=unique_name("g"), start="earliest") as messages:
            received = [await anext(messages) for _ in range(50)]
    assert outcomes[0] == [None] * 20 and outcomes[1] == [None] * 20 and outcomes[3] == [None] * 8
    keyless = {_partition_of(m) for m in received if m.key is None}
    assert len(keyless) == 1, keyless
    partitioner, partitions = Murmur2Partitioner(), [0, 1, 2, 3]
    for message in received:
        if message.key is not None:
            expected = partitioner(message.key.encode(), partitions, partitions)
            assert _partition_of(message) == expected, message.key


async def test_keyless_records_move_on_once_their_batch_was_sent(kafka_url: str) -> None:
    """A keyless record published after the previous one's batch went out goes to another
    partition: one after another, 24 records reach more than one partition and no two in a row
    share one."""
    topic = unique_name("spread")
    options = {**connect_options(kafka_url), "kafka_partitions": 4}
    async with messaging.connect(kafka_url, **options) as pubsub:
        await pubsub.ensure_topics(topic)
        for i in range(24):
            if i % 2:
                assert await pubsub.publish_many(topic, [(b"%d" % i, None, None)]) == [None]
            else:
                await pubsub.publish(topic, b"%d" % i)
        async with pubsub.subscribe(topic, group=unique_name("g"), start="earliest") as messages:
            received = [await anext(messages) for _ in range(24)]
    partition = {int(m.data): _partition_of(m) for m in received}
    assert len(set(partition.values())) > 1
    assert all(partition[i] != partition[i + 1] for i in range(23)), partition


async def test_a_big_keyless_burst_spreads_in_runs_over_the_partitions(kafka_url: str) -> None:
    """One publish_many of 200 keyless 1 KiB records moves to another partition after each 64 KiB
    run (STICKY_RUN_BYTES), so a burst still reaches several partitions and the workers behind them."""
    topic = unique_name("burst")
    options = {**connect_options(kafka_url), "kafka_partitions": 4}
    per_run = STICKY_RUN_BYTES // 1024
    async with messaging.connect(kafka_url, **options) as pubsub:
        await pubsub.ensure_topics(topic)
        records = [(b"%05d" % i + b"." * 1019, None, None) for i in range(200)]
        assert await pubsub.publish_many(topic, records) == [None] * 200
        async with pubsub.subscribe(topic, group=unique_name("g"), start="earliest") as messages:
            received = [await anext(messages) for _ in range(200)]
    partition = {int(m.data[:5]): _partition_of(m) for m in received}
    runs = [1]
    for i in range(1, 200):
        runs.append(runs[-1] + 1 if partition[i] == partition[i - 1] else 1)
    assert max(runs) == per_run and len(set(partition.values())) > 1
