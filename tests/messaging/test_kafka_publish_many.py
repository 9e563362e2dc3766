"""kafka:// specifics: `publish_many` hands records to the producer itself, without a task per message."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Generator
from typing import Any

import pytest

import messaging
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
