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
