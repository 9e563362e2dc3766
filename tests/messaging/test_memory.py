"""memory:// specifics: one broker per name in a process, bounded backlogs, retention."""

from __future__ import annotations

import asyncio
import time

import pytest

import messaging
from messaging.memory import MemoryPubSub, shared_broker
from tests.brokers import unique_name

pytestmark = pytest.mark.timeout(30)


async def test_connections_to_one_name_share_a_broker() -> None:
    """A message published on one `memory://NAME` connection reaches a subscriber on another."""
    url = f"memory://{unique_name('shared')}"
    topic = unique_name("t")
    async with (
        messaging.connect(url) as gateway,
        messaging.connect(url) as worker,
        worker.subscribe(topic, group="workers") as messages,
    ):
        await gateway.publish(topic, b"hello")
        message = await asyncio.wait_for(anext(messages), 5)
        await message.ack()
    assert message.data == b"hello"


async def test_connections_to_different_names_are_isolated() -> None:
    """`memory://a` and `memory://b` are separate brokers."""
    topic = unique_name("t")
    async with (
        messaging.connect(f"memory://{unique_name('a')}") as first,
        messaging.connect(f"memory://{unique_name('b')}") as second,
        second.subscribe(topic, group="g") as messages,
    ):
        await first.publish(topic, b"elsewhere")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(anext(messages), 0.3)


async def test_publish_to_a_stuck_consumer_raises_backlog_full() -> None:
    """With a consumer attached that never acks, publish waits, then raises BacklogFull naming the knob."""
    url = f"memory://{unique_name('stuck')}?max_backlog=3&publish_timeout=0.2"
    topic = unique_name("t")
    async with messaging.connect(url) as pubsub, pubsub.subscribe(topic, group="slow") as messages:
        for i in range(3):
            await pubsub.publish(topic, b"%d" % i)
        with pytest.raises(messaging.BacklogFull, match="max_backlog"):
            await pubsub.publish(topic, b"one too many")
        assert messages.max_in_flight == 256


async def test_publish_resumes_when_the_consumer_acks() -> None:
    """A publish waiting for room completes as soon as the consumer acknowledges a message."""
    url = f"memory://{unique_name('resume')}?max_backlog=2&publish_timeout=5"
    topic = unique_name("t")
    async with messaging.connect(url) as pubsub, pubsub.subscribe(topic, group="g") as messages:
        await pubsub.publish(topic, b"0")
        await pubsub.publish(topic, b"1")
        blocked = asyncio.create_task(pubsub.publish(topic, b"2"))
        await asyncio.sleep(0.1)
        assert not blocked.done()
        first = await anext(messages)
        await first.ack()
        await asyncio.wait_for(blocked, 1)


async def test_group_without_consumers_keeps_newest_and_never_blocks() -> None:
    """A group whose consumers left keeps its newest `max_backlog` messages; publishers do not wait."""
    name = unique_name("detached")
    url = f"memory://{name}?max_backlog=3&publish_timeout=0.1"
    topic = unique_name("t")
    async with messaging.connect(url) as pubsub:
        async with pubsub.subscribe(topic, group="g"):
            pass  # the group now exists, with no consumer attached
        for i in range(10):
            await pubsub.publish(topic, b"%d" % i)
        assert shared_broker(name).backlog(topic, "g") == 3
        async with pubsub.subscribe(topic, group="g") as messages:
            received = [await anext(messages) for _ in range(3)]
    assert [m.data for m in received] == [b"7", b"8", b"9"]


async def test_retention_bounds_what_a_new_group_replays() -> None:
    """A new `earliest` group replays at most `retain` messages of the topic's history."""
    url = f"memory://{unique_name('retain')}?retain=2"
    topic = unique_name("t")
    async with messaging.connect(url) as pubsub:
        for i in range(5):
            await pubsub.publish(topic, b"%d" % i)
        async with pubsub.subscribe(topic, group="late") as messages:
            received = [await asyncio.wait_for(anext(messages), 1) for _ in range(2)]
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(anext(messages), 0.2)
    assert [m.data for m in received] == [b"3", b"4"]


def test_default_url_uses_the_default_broker() -> None:
    """`memory://` with no name is the broker called `default`."""
    pubsub = messaging.connect("memory://")
    assert isinstance(pubsub, MemoryPubSub)
    assert pubsub.broker is shared_broker("default")


def test_unknown_memory_option_is_rejected() -> None:
    """A typo in a memory:// option is an error listing the accepted ones."""
    with pytest.raises(ValueError, match="max_backlog"):
        messaging.connect("memory://x?max_backlogg=3")


async def test_retained_messages_older_than_retain_s_are_not_replayed() -> None:
    """With ?retain_s=, a subscription started at a time gets only retained messages younger than that."""
    url = f"memory://{unique_name('age')}?retain_s=0.3"
    topic = unique_name("t")
    async with messaging.connect(url) as pubsub:
        await pubsub.publish(topic, b"old")
        await asyncio.sleep(0.5)
        await pubsub.publish(topic, b"young")
        async with pubsub.subscribe(topic, group="late", start=0.0) as messages:
            message = await asyncio.wait_for(anext(messages), 5)
            await message.ack()
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(anext(messages), 0.5)
    assert message.data == b"young"


async def test_a_start_time_replaces_the_groups_queue() -> None:
    """A subscription started at a time re-queues its group from the history, without duplicates."""
    name, topic = unique_name("requeue"), unique_name("t")
    async with messaging.connect(f"memory://{name}") as pubsub:
        async with pubsub.subscribe(topic, group="g") as messages:
            await pubsub.publish(topic, b"acked")
            first = await asyncio.wait_for(anext(messages), 5)
            await first.ack()
            await pubsub.publish(topic, b"queued")  # still in the group's queue at close
        async with pubsub.subscribe(topic, group="g", start=0.0) as messages:
            received = [await asyncio.wait_for(anext(messages), 5) for _ in range(2)]
            for message in received:
                await message.ack()
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(anext(messages), 0.5)
        assert shared_broker(name).backlog(topic, "g") == 0
    assert [m.data for m in received] == [b"acked", b"queued"]


async def test_retained_is_a_snapshot_from_a_time_that_joins_no_group() -> None:
    """`retained(topic, since=)` gives the retained messages published from `since` on, oldest
    first, and leaves the topic's groups as they were."""
    url = f"memory://{unique_name('snapshot')}"
    topic = unique_name("t")
    async with messaging.connect(url) as pubsub:
        assert isinstance(pubsub, MemoryPubSub)
        await pubsub.publish(topic, b"old", key="a")
        await asyncio.sleep(0.01)
        since = time.time()
        for index in range(3):
            await pubsub.publish(topic, f"new-{index}".encode(), key=str(index))
        snapshot = pubsub.retained(topic, since=since)
        everything = pubsub.retained(topic)
        for message in snapshot:
            await message.ack()  # nothing to settle: no group
    assert [m.data for m in snapshot] == [b"new-0", b"new-1", b"new-2"]
    assert [m.key for m in everything] == ["a", "0", "1", "2"]
    assert pubsub.broker.topics[topic].groups == {}
    assert pubsub.retained(unique_name("never-published")) == []
