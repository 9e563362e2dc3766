"""kafka:// partitions vs consumers: warnings when workers outnumber partitions or a topic has fewer than asked."""

from __future__ import annotations

import asyncio

import pytest

import messaging
from tests.brokers import connect_options, unique_name

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(60)]


def _warnings(caplog: pytest.LogCaptureFixture, event: str) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.levelname == "WARNING" and f"event={event} " in record.getMessage()
    ]


async def test_a_consumer_without_a_partition_warns_once(
    kafka_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Two consumers of one group on a 1-partition topic: one WARNING naming ?partitions= and the count."""
    topic, group = unique_name("idle"), unique_name("g")
    options = {**connect_options(kafka_url), "kafka_partitions": 1, "connect_timeout": 4.0}
    first, second = messaging.connect(kafka_url, **options), messaging.connect(kafka_url, **options)
    async with (
        first,
        second,
        first.subscribe(topic, group=group),
        second.subscribe(topic, group=group),
    ):
        await asyncio.sleep(1.0)  # a further rebalance would warn again if the layer repeated it
    warnings = _warnings(caplog, "kafka_no_partition")
    assert len(warnings) == 1, warnings
    assert f"topic={topic} group={group} topic_partitions=1 " in warnings[0]
    assert "?partitions=" in warnings[0] and "--partitions" in warnings[0]


async def test_an_existing_topic_with_fewer_partitions_warns_once(
    kafka_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """ensure_topics on a topic made with 1 partition, asked for 4, warns once that the setting changes nothing."""
    topic = unique_name("few")
    async with messaging.connect(
        kafka_url, **connect_options(kafka_url), kafka_partitions=1
    ) as made:
        await made.ensure_topics(topic)
    asking = messaging.connect(kafka_url, **connect_options(kafka_url), kafka_partitions=4)
    async with asking:
        await asking.ensure_topics(topic)
        await asking.ensure_topics(topic)
        await asking.publish(topic, b"x")
    warnings = _warnings(caplog, "kafka_topic_has_fewer_partitions")
    assert len(warnings) == 1, warnings
    assert f"topic={topic} topic_partitions=1 kafka_partitions=4 " in warnings[0]
    assert "?partitions= does not change an existing topic" in warnings[0]


async def test_a_topic_with_enough_partitions_does_not_warn(
    kafka_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """ensure_topics on an existing topic with as many partitions as asked logs no partition warning."""
    topic = unique_name("enough")
    for _ in range(2):
        async with messaging.connect(
            kafka_url, **connect_options(kafka_url), kafka_partitions=2
        ) as pubsub:
            await pubsub.ensure_topics(topic)
    assert not _warnings(caplog, "kafka_topic_has_fewer_partitions")
