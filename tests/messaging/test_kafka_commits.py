"""kafka:// specifics: commits follow the contiguous acked prefix of each partition."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

import messaging
from messaging._url import parse_broker_url
from messaging.kafka import KafkaOptions, _PartitionAcks
from tests.brokers import connect_options, unique_name

pytestmark = pytest.mark.timeout(60)


def test_partition_commit_position_waits_for_the_oldest_ack() -> None:
    """Acks of offsets 11 and 12 do not move the commit position until offset 10 is acked."""
    from aiokafka import TopicPartition

    partition = _PartitionAcks(TopicPartition("t", 0))
    partition.outstanding.extend([10, 11, 12])
    assert not partition.ack(12)
    assert not partition.ack(11)
    assert partition.committable is None
    assert partition.ack(10)
    assert partition.committable == 13
    assert not partition.outstanding and not partition.acked


def test_kafka_url_options_are_typed_and_checked() -> None:
    """URL options reach the client settings; a typo is rejected with the accepted names."""
    options = KafkaOptions.from_url(
        parse_broker_url("kafka://h:1?session_timeout_ms=2000&linger_ms=0")
    )
    assert (options.session_timeout_ms, options.linger_ms) == (2000, 0)
    with pytest.raises(ValueError, match="session_timeout_ms"):
        messaging.connect("kafka://h:1?sesion_timeout_ms=2000")


@pytest.mark.kafka
async def test_out_of_order_acks_commit_only_the_acked_prefix(kafka_url: str) -> None:
    """With the oldest message of a partition unacked, the next consumer gets it again (and those after it)."""
    topic, group = unique_name("prefix"), unique_name("g")
    options = connect_options(kafka_url)
    async with messaging.connect(kafka_url, **options) as publisher:
        first = messaging.connect(kafka_url, **options)
        async with first, first.subscribe(topic, group=group) as messages:
            for i in range(3):
                await publisher.publish(topic, b"%d" % i, key="same-partition")
            held = [await asyncio.wait_for(anext(messages), 20) for _ in range(3)]
            await held[2].ack()
            await held[1].ack()
            await asyncio.sleep(0.3)  # let a (wrong) commit happen if the layer made one
        second = messaging.connect(kafka_url, **options)
        async with second, second.subscribe(topic, group=group) as messages:
            again = [await asyncio.wait_for(anext(messages), 20) for _ in range(3)]
            for message in again:
                await message.ack()
    assert [m.data for m in again] == [b"0", b"1", b"2"]


@pytest.mark.kafka
async def test_acked_messages_are_not_delivered_to_the_next_consumer(kafka_url: str) -> None:
    """Once every message is acked, a later consumer of the group starts after them."""
    topic, group = unique_name("commit"), unique_name("g")
    options = connect_options(kafka_url)
    async with messaging.connect(kafka_url, **options) as publisher:
        first = messaging.connect(kafka_url, **options)
        async with first, first.subscribe(topic, group=group) as messages:
            for i in range(3):
                await publisher.publish(topic, b"%d" % i, key="same-partition")
            for message in [await asyncio.wait_for(anext(messages), 20) for _ in range(3)][::-1]:
                await message.ack()
        await publisher.publish(topic, b"3", key="same-partition")
        second = messaging.connect(kafka_url, **options)
        async with second, second.subscribe(topic, group=group) as messages:
            message = await asyncio.wait_for(anext(messages), 20)
            await message.ack()
    assert message.data == b"3"


@pytest.mark.kafka
async def test_a_start_time_holds_after_a_rebalance(kafka_url: str) -> None:
    """A member joining a start-time group makes the partitions re-seek: the window is read again."""
    topic, group = unique_name("rebalance"), unique_name("g")
    options = connect_options(kafka_url)
    keys = [f"k{i}" for i in range(8)]  # spread over the partitions
    async with messaging.connect(kafka_url, **options) as publisher:
        await publisher.ensure_topics(topic)
        since = time.time()
        await asyncio.sleep(0.1)  # record timestamps are in ms: keep `since` clearly before them
        first_broker = messaging.connect(kafka_url, **options)
        second_broker = messaging.connect(kafka_url, **options)
        async with first_broker, first_broker.subscribe(topic, group=group, start=since) as first:
            for key in keys:
                await publisher.publish(topic, key.encode(), key=key)
            for message in [await asyncio.wait_for(anext(first), 20) for _ in keys]:
                await message.ack()
            await asyncio.sleep(0.5)  # the commits land: without a re-seek nobody reads these again
            async with (
                second_broker,
                second_broker.subscribe(topic, group=group, start=since) as second,
            ):
                again: set[bytes] = set()
                everything = asyncio.Event()

                async def drain(messages: messaging.Subscription) -> None:
                    async for message in messages:
                        again.add(message.data)
                        await message.ack()
                        if again >= {key.encode() for key in keys}:
                            everything.set()

                tasks = [asyncio.create_task(drain(first)), asyncio.create_task(drain(second))]
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(everything.wait(), 20)
                for task in tasks:
                    task.cancel()
    assert set(again) == {key.encode() for key in keys}
