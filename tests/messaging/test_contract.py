"""The PubSub contract, written once and run on memory://, Kafka (Tansu) and Pub/Sub (emulator)."""

from __future__ import annotations

import asyncio
import os
import time
from collections import defaultdict
from typing import Any

import pytest

import messaging
from messaging import Message, PubSub, Subscription
from messaging.kafka import KafkaPubSub
from tests.brokers import connect_options, unique_name

pytestmark = pytest.mark.timeout(60)

ONE_MIB = 1024 * 1024


def open_broker(url: str) -> PubSub:
    return messaging.connect(url, connect_timeout=10.0, **connect_options(url))


def seekable(url: str) -> str:
    """On Pub/Sub, `start` is a seek, which the emulator cannot do on ordered subscriptions."""
    return url + "&ordering=false" if url.startswith("gcp://") else url


async def take(messages: Subscription, count: int, *, within: float = 20.0) -> list[Message]:
    """The next `count` messages, failing the test if they do not arrive within `within` seconds."""
    received: list[Message] = []
    async with asyncio.timeout(within):
        while len(received) < count:
            received.append(await anext(messages))
    return received


async def nothing_more(messages: Subscription, *, wait: float) -> bool:
    """True if no message arrives within `wait` seconds."""
    try:
        async with asyncio.timeout(wait):
            await anext(messages)
    except TimeoutError:
        return True
    return False


async def test_round_trip_keeps_payload_key_and_attributes(broker_url: str) -> None:
    """A published message arrives with its bytes, key, attributes and topic."""
    topic = unique_name("rt")
    async with (
        open_broker(broker_url) as pubsub,
        pubsub.subscribe(topic, group=unique_name("g")) as messages,
    ):
        await pubsub.publish(
            topic, b"\x00\xffpayload", key="req-1", attributes={"shape": "1,28,28", "a": "é"}
        )
        [message] = await take(messages, 1)
        await message.ack()
    assert (message.data, message.key, message.topic) == (b"\x00\xffpayload", "req-1", topic)
    assert message.attributes == {"shape": "1,28,28", "a": "é"}


async def test_message_without_key_or_attributes(broker_url: str) -> None:
    """A message published without key (or with key "") and attributes arrives with key None and none."""
    topic = unique_name("nk")
    async with (
        open_broker(broker_url) as pubsub,
        pubsub.subscribe(topic, group=unique_name("g")) as messages,
    ):
        await pubsub.publish(topic, b"plain")
        await pubsub.publish(topic, b"empty key", key="")
        received = await take(messages, 2)
        for message in received:
            await message.ack()
    assert sorted((m.data, m.key, m.attributes) for m in received) == [
        (b"empty key", None, {}),
        (b"plain", None, {}),
    ]


async def test_messages_with_one_key_arrive_in_publish_order(broker_url: str) -> None:
    """Messages that share a key reach a consumer in the order they were published."""
    topic = unique_name("order")
    keys = ["a", "b", "c"]
    async with (
        open_broker(broker_url) as pubsub,
        pubsub.subscribe(topic, group=unique_name("g")) as messages,
    ):
        for seq in range(15):
            for key in keys:
                await pubsub.publish(topic, str(seq).encode(), key=key)
        received = []
        for _ in range(45):
            [message] = await take(messages, 1)
            await (
                message.ack()
            )  # Pub/Sub holds back a key's next message until the previous is acked
            received.append(message)
    by_key: dict[str | None, list[int]] = defaultdict(list)
    for message in received:
        by_key[message.key].append(int(message.data))
    assert by_key == {key: list(range(15)) for key in keys}


async def test_one_group_shares_the_work_without_duplicates(broker_url: str) -> None:
    """Two consumers of one group together receive every message exactly once, and both get work."""
    topic, group = unique_name("share"), unique_name("g")
    total = 200
    async with open_broker(broker_url) as first_broker, open_broker(broker_url) as second_broker:
        first = first_broker.subscribe(topic, group=group, max_in_flight=10)
        second = second_broker.subscribe(topic, group=group, max_in_flight=10)
        await first.start()
        await second.start()
        seen: dict[str, list[bytes]] = {"first": [], "second": []}
        done = asyncio.Event()

        async def consume(name: str, messages: Subscription) -> None:
            async for message in messages:
                seen[name].append(message.data)
                await asyncio.sleep(0.002)  # a little work, so neither consumer can take everything
                await message.ack()
                if sum(map(len, seen.values())) >= total:
                    done.set()

        tasks = [
            asyncio.create_task(consume("first", first)),
            asyncio.create_task(consume("second", second)),
        ]
        await asyncio.gather(
            *(first_broker.publish(topic, b"%d" % i, key=f"k{i}") for i in range(total))
        )
        async with asyncio.timeout(30):
            await done.wait()
        await asyncio.sleep(0.5)  # a duplicate delivery would show up meanwhile
        await first.aclose()
        await second.aclose()
        async with asyncio.timeout(10):
            await asyncio.gather(*tasks)
    everything = seen["first"] + seen["second"]
    assert sorted(everything) == sorted(b"%d" % i for i in range(total))
    assert seen["first"] and seen["second"]


async def test_every_group_receives_every_message(broker_url: str) -> None:
    """Two different groups each receive all messages (broadcast)."""
    topic = unique_name("bcast")
    async with (
        open_broker(broker_url) as pubsub,
        pubsub.subscribe(topic, group=unique_name("g1")) as first,
        pubsub.subscribe(topic, group=unique_name("g2")) as second,
    ):
        for i in range(20):
            await pubsub.publish(topic, b"%d" % i, key=f"k{i}")
        for messages in (first, second):
            received = await take(messages, 20)
            for message in received:
                await message.ack()
            assert sorted(m.data for m in received) == sorted(b"%d" % i for i in range(20))


async def test_nacked_message_is_delivered_again(broker_url: str) -> None:
    """A nacked message comes back to the group; once acked it does not come back."""
    topic = unique_name("nack")
    async with (
        open_broker(broker_url) as pubsub,
        pubsub.subscribe(topic, group=unique_name("g")) as messages,
    ):
        await pubsub.publish(topic, b"retry-me", key="k")
        [first] = await take(messages, 1)
        await first.nack()
        [again] = await take(messages, 1)
        await again.ack()
        assert await nothing_more(messages, wait=1.0)
    assert again.data == b"retry-me"


async def test_unacked_message_goes_to_another_consumer_after_its_consumer_dies(
    broker_url: str,
) -> None:
    """A message whose consumer closes without acking is delivered to the next consumer of the group."""
    topic, group = unique_name("die"), unique_name("g")
    async with open_broker(broker_url) as publisher:
        doomed = open_broker(broker_url)
        async with doomed, doomed.subscribe(topic, group=group) as messages:
            await publisher.publish(topic, b"orphan", key="k")
            [lost] = await take(messages, 1)
        # `doomed` is closed now, without having acked.
        survivor = open_broker(broker_url)
        async with survivor, survivor.subscribe(topic, group=group) as messages:
            [found] = await take(messages, 1, within=30)
            await found.ack()
    assert lost.data == found.data == b"orphan"


async def test_one_mebibyte_payloads_round_trip(broker_url: str) -> None:
    """Messages of 1 MiB are published and received intact."""
    topic = unique_name("big")
    payloads = [os.urandom(ONE_MIB) for _ in range(3)]
    async with (
        open_broker(broker_url) as pubsub,
        pubsub.subscribe(topic, group=unique_name("g")) as messages,
    ):
        for i, payload in enumerate(payloads):
            await pubsub.publish(topic, payload, key=f"big{i}", attributes={"i": str(i)})
        received = await take(messages, 3)
        for message in received:
            await message.ack()
    assert sorted(m.data for m in received) == sorted(payloads)


async def test_max_in_flight_bounds_unsettled_deliveries(broker_url: str) -> None:
    """A subscription holds at most `max_in_flight` unsettled messages; settling one lets the next through."""
    topic = unique_name("flow")
    async with (
        open_broker(broker_url) as pubsub,
        pubsub.subscribe(topic, group=unique_name("g"), max_in_flight=3) as messages,
    ):
        for i in range(6):
            await pubsub.publish(topic, b"%d" % i, key=f"k{i}")
        held = await take(messages, 3)
        assert await nothing_more(messages, wait=1.0)
        await held[0].ack()
        [fourth] = await take(messages, 1)
        for message in [*held[1:], fourth]:
            await message.ack()


async def test_receive_batch_takes_what_arrived_within_its_limits(broker_url: str) -> None:
    """receive_batch: at least one message, never more than asked or than max_in_flight allows,
    every message exactly once across chunks; [] after close."""
    topic = unique_name("chunks")
    async with open_broker(broker_url) as pubsub:
        messages = pubsub.subscribe(topic, group=unique_name("g"), max_in_flight=8)
        await messages.start()
        for i in range(20):
            await pubsub.publish(topic, b"%d" % i, key=f"k{i}")
        seen: list[bytes] = []
        async with asyncio.timeout(30):
            while len(seen) < 20:
                chunk = await messages.receive_batch(5)
                assert 1 <= len(chunk) <= 5
                seen.extend(message.data for message in chunk)
                for message in chunk:
                    await message.ack()
        assert sorted(seen) == sorted(b"%d" % i for i in range(20))
        for i in range(10):
            await pubsub.publish(topic, b"x%d" % i, key=f"x{i}")
        held: list[Message] = []
        async with asyncio.timeout(30):
            while len(held) < 8:
                held.extend(await messages.receive_batch(100))
        assert len(held) == 8  # max_in_flight, although 10 were published and 100 asked for
        for message in held:
            await message.ack()
        await messages.aclose()
        assert await messages.receive_batch(5) == []


async def test_latest_group_skips_messages_published_before_it_started(broker_url: str) -> None:
    """A new group with start="latest" receives only what is published after it started."""
    topic = unique_name("latest")
    broker_url = seekable(broker_url)
    async with open_broker(broker_url) as pubsub:
        await pubsub.ensure_topics(topic)
        await pubsub.publish(topic, b"old", key="k")
        async with pubsub.subscribe(topic, group=unique_name("g"), start="latest") as messages:
            await pubsub.publish(topic, b"new", key="k")
            [message] = await take(messages, 1)
            await message.ack()
    assert message.data == b"new"


async def test_closing_the_pubsub_ends_iteration_cleanly(broker_url: str) -> None:
    """close() ends a running `async for` without an error and leaves no task behind."""
    topic = unique_name("close")
    pubsub = open_broker(broker_url)
    await pubsub.connect()
    messages = pubsub.subscribe(topic, group=unique_name("g"))
    await messages.start()

    async def consume() -> int:
        count = 0
        async for message in messages:
            await message.ack()
            count += 1
        return count

    consumer = asyncio.create_task(consume())
    await pubsub.publish(topic, b"one", key="k")
    await asyncio.sleep(0.5)
    started = time.monotonic()
    await pubsub.close()
    async with asyncio.timeout(10):
        assert await consumer == 1
    assert time.monotonic() - started < 10
    assert messages.closed
    with pytest.raises(messaging.NotConnected, match="closed"):
        await pubsub.publish(topic, b"late")


async def test_ping_answers_on_a_connected_broker(broker_url: str) -> None:
    """ping() returns on a reachable broker, and raises NotConnected before connect()."""
    pubsub = open_broker(broker_url)
    with pytest.raises(messaging.NotConnected, match=r"async with messaging\.connect"):
        await pubsub.ping()
    async with pubsub:
        await pubsub.ping()


async def test_new_earliest_group_receives_messages_published_before_it(broker_url: str) -> None:
    """A group subscribing for the first time with start="earliest" gets what was published before."""
    topic = unique_name("early")
    broker_url = seekable(broker_url)
    async with open_broker(broker_url) as pubsub:
        await pubsub.publish(topic, b"before", key="k")
        async with pubsub.subscribe(topic, group=unique_name("g"), start="earliest") as messages:
            [message] = await take(messages, 1)
            await message.ack()
    assert message.data == b"before"


# Backends stamp records with their own clock at their own precision (milliseconds on Kafka):
# keep the start time this far from either side's records.
CLOCK_MARGIN_S = 0.5


async def test_subscription_started_at_a_time_skips_what_came_before(broker_url: str) -> None:
    """A subscription started at time T receives what was published after T and nothing before."""
    topic = unique_name("since")
    broker_url = seekable(broker_url)
    async with open_broker(broker_url) as pubsub:
        for i in range(3):
            await pubsub.publish(topic, b"before%d" % i, key=f"b{i}")
        await asyncio.sleep(CLOCK_MARGIN_S)
        since = time.time()
        await asyncio.sleep(CLOCK_MARGIN_S)
        for i in range(3):
            await pubsub.publish(topic, b"after%d" % i, key=f"a{i}")
        async with pubsub.subscribe(topic, group=unique_name("g"), start=since) as messages:
            received = await take(messages, 3)
            for message in received:
                await message.ack()
            assert await nothing_more(messages, wait=1.0)
    assert sorted(m.data for m in received) == [b"after0", b"after1", b"after2"]


async def test_subscription_started_at_a_time_rereads_what_its_group_acked(
    broker_url: str, request: pytest.FixtureRequest
) -> None:
    """A start time wins over the group's position: acked messages published after it come again."""
    if broker_url.startswith("gcp://"):
        # The emulator accepts the seek and a plain Pull then returns the messages again, but its
        # StreamingPull usually never delivers them (Google's service does); not strict, since a
        # later emulator stream sometimes does deliver them.
        request.applymarker(
            pytest.mark.xfail(
                strict=False, reason="the Pub/Sub emulator's StreamingPull ignores seek-to-time"
            )
        )
    topic, group = unique_name("reread"), unique_name("g")
    broker_url = seekable(broker_url)
    async with open_broker(broker_url) as pubsub:
        await pubsub.ensure_topics(topic)
        await asyncio.sleep(CLOCK_MARGIN_S)
        since = time.time()
        await asyncio.sleep(CLOCK_MARGIN_S)
        async with pubsub.subscribe(topic, group=group, start="latest") as messages:
            for i in range(3):
                await pubsub.publish(topic, b"%d" % i, key=f"k{i}")
            for message in await take(messages, 3):
                await message.ack()
        await asyncio.sleep(1.0)  # let the acks (Kafka commits) land before the group reopens
    # The emulator delivers a seek at once or not at all: waiting long for it only slows the xfail.
    within = 5.0 if broker_url.startswith("gcp://") else 30.0
    restarted = open_broker(broker_url)  # a new connection, as a restarted process has
    async with restarted, restarted.subscribe(topic, group=group, start=since) as messages:
        again = await take(messages, 3, within=within)
        for message in again:
            await message.ack()
    assert sorted(m.data for m in again) == [b"0", b"1", b"2"]


@pytest.mark.parametrize("start", ["oldest", float("nan"), -1.0, True])
async def test_start_must_be_a_position_or_a_time(start: object) -> None:
    """subscribe() refuses a start that is neither "earliest", "latest" nor a finite unix time."""
    async with open_broker(f"memory://{unique_name('start')}") as pubsub:
        with pytest.raises(ValueError, match="unix time in seconds"):
            pubsub.subscribe("topic", group="g", start=start)  # type: ignore[arg-type]


async def test_publish_many_delivers_every_item_and_answers_none_for_each(broker_url: str) -> None:
    """publish_many takes Outgoing and (data, key, attributes) items and returns None per accepted item, in order."""
    topic = unique_name("pm")
    items = [
        messaging.Outgoing(b"one", key="k1", attributes={"n": "1"}),
        (b"two", "k2", {"n": "2"}),
        (b"three", None, None),
    ]
    async with (
        open_broker(broker_url) as pubsub,
        pubsub.subscribe(topic, group=unique_name("g")) as messages,
    ):
        outcomes = await pubsub.publish_many(topic, items)
        received = await take(messages, 3)
        for message in received:
            await message.ack()
    assert outcomes == [None, None, None]
    assert sorted((m.data, m.key, m.attributes) for m in received) == [
        (b"one", "k1", {"n": "1"}),
        (b"three", None, {}),
        (b"two", "k2", {"n": "2"}),
    ]


async def test_publish_many_fails_a_bad_item_alone_and_in_its_place(broker_url: str) -> None:
    """A malformed item gets its TypeError as its outcome, in its position; the others are published."""
    topic = unique_name("pb")
    async with (
        open_broker(broker_url) as pubsub,
        pubsub.subscribe(topic, group=unique_name("g")) as messages,
    ):
        outcomes = await pubsub.publish_many(
            topic,
            [(b"first", "a", None), ("not bytes", "b", None), (b"last", "c", None)],  # type: ignore[list-item]
        )
        received = await take(messages, 2)
        for message in received:
            await message.ack()
    assert outcomes[0] is None and outcomes[2] is None
    assert isinstance(outcomes[1], TypeError)
    assert sorted(m.data for m in received) == [b"first", b"last"]


async def test_publish_many_fails_what_is_not_accepted_within_its_timeout(
    broker_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With timeout_s, an item the broker has not accepted in time gets a TimeoutError; the rest are published."""
    topic = unique_name("pt")
    async with (
        open_broker(broker_url) as pubsub,
        pubsub.subscribe(topic, group=unique_name("g")) as messages,
    ):
        publish = pubsub._publish

        async def stuck_on_slow(*args: object) -> None:
            if args[2] == "slow":
                await asyncio.sleep(30)
            await publish(*args)  # type: ignore[arg-type]

        monkeypatch.setattr(pubsub, "_publish", stuck_on_slow)
        if isinstance(pubsub, KafkaPubSub):  # its publish_many hands batches over without _publish
            send_batches = pubsub._send_batches

            # Keys "fast" and "slow" hash to different partitions (of 4), so to different batches.
            async def send_stuck_on_slow(*args: Any) -> Any:
                if any(index == 1 for index, _ in args[3]):  # the second item's ("slow")
                    await asyncio.sleep(30)
                return await send_batches(*args)

            monkeypatch.setattr(pubsub, "_send_batches", send_stuck_on_slow)
        started = time.monotonic()
        outcomes = await pubsub.publish_many(
            topic, [(b"fast", "fast", None), (b"slow", "slow", None)], timeout_s=0.5
        )
        elapsed = time.monotonic() - started
        received = await take(messages, 1)
        for message in received:
            await message.ack()
    assert outcomes[0] is None and isinstance(outcomes[1], TimeoutError)
    assert elapsed < 5
    assert [m.data for m in received] == [b"fast"]


async def test_publish_many_after_close_raises_not_connected(broker_url: str) -> None:
    """publish_many on a closed PubSub raises NotConnected for the call, not per item."""
    pubsub = open_broker(broker_url)
    async with pubsub:
        pass
    with pytest.raises(messaging.NotConnected):
        await pubsub.publish_many(unique_name("pc"), [(b"x", None, None)])
