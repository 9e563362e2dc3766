"""kafka:// fetch pacing: a short fetch wait while records flow, the long one when idle."""

from __future__ import annotations

import asyncio

import pytest

import messaging
from messaging._url import parse_broker_url
from messaging.kafka import KafkaOptions
from tests.brokers import connect_options, unique_name

pytestmark = pytest.mark.timeout(60)

IDLE_WAIT_MS, BUSY_WAIT_MS = 400, 5


def paced_url(kafka_url: str) -> str:
    """`kafka_url` with the idle and busy fetch waits of these tests."""
    base, _, query = kafka_url.partition("?")
    kept = [item for item in query.split("&") if item and not item.startswith("fetch_")]
    kept += [f"fetch_max_wait_ms={IDLE_WAIT_MS}", f"fetch_busy_wait_ms={BUSY_WAIT_MS}"]
    return f"{base}?{'&'.join(kept)}"


def fetch_wait_ms(subscription: object) -> int:
    """The wait the subscription's aiokafka consumer puts in its next fetch request."""
    return int(subscription._consumer._fetcher._fetch_max_wait_ms)  # type: ignore[attr-defined]


def test_the_fetch_waits_are_url_options_with_a_short_busy_default() -> None:
    """fetch_busy_wait_ms is read from the URL; by default it is shorter than the idle wait."""
    default = KafkaOptions.from_url(parse_broker_url("kafka://h:1"))
    assert 0 < default.fetch_busy_wait_ms < default.fetch_max_wait_ms
    options = KafkaOptions.from_url(parse_broker_url("kafka://h:1?fetch_busy_wait_ms=0"))
    assert options.fetch_busy_wait_ms == 0


@pytest.mark.kafka
async def test_records_shorten_the_fetch_wait_until_the_topic_goes_idle(kafka_url: str) -> None:
    """After a record the consumer fetches with fetch_busy_wait_ms; a second without one restores fetch_max_wait_ms."""
    url = paced_url(kafka_url)
    topic, group = unique_name("pacing"), unique_name("g")
    pubsub = messaging.connect(url, **connect_options(url))
    async with pubsub, pubsub.subscribe(topic, group=group) as messages:
        assert fetch_wait_ms(messages) == IDLE_WAIT_MS
        await pubsub.publish(topic, b"one", key="k")
        message = await asyncio.wait_for(anext(messages), 20)
        await message.ack()
        assert fetch_wait_ms(messages) == BUSY_WAIT_MS
        await asyncio.sleep(2.0)  # longer than the pump's one-second getmany
        assert fetch_wait_ms(messages) == IDLE_WAIT_MS
