"""The in-process broker behind `memory://[name]`: consumer groups, redelivery and bounded backlogs.

Every `connect("memory://NAME")` in one process shares the broker called NAME (`memory://` is
`memory://default`), so a gateway and a worker in one process talk through it. It follows the
same contract as Kafka and Pub/Sub:

* a topic keeps its last `retain` messages (at most `retain_bytes`, and with `retain_s` > 0 none
  older than that many seconds), like a Kafka log with size and time retention: a group that
  subscribes for the first time with `start="earliest"` begins with those; with `start="latest"`
  it begins empty; a subscription started at a time (a float) replaces its group's queue with the
  retained messages published at or after that time, whatever the group had;
* everything lives in this process: a restart loses every topic, group and retained message;
* each group keeps its own backlog of unacknowledged messages; the consumers attached to a group
  share it (one delivery per message while nobody fails), different groups each get every message;
* `nack()` puts the message back at the front of its group's backlog; a subscription closed with
  unsettled messages puts them back too, so another consumer of the group gets them;
* bounds: while a group has consumers attached, `publish()` **waits** for room when the group holds
  `max_backlog` unacknowledged messages (or `max_backlog_bytes`), and raises `BacklogFull` after
  `publish_timeout` seconds, so a stuck consumer cannot eat all memory. A group with no consumer
  attached never blocks publishers: it keeps its newest `max_backlog` messages and drops the oldest,
  as a Kafka log drops old segments.

Options (URL query): `max_backlog`, `max_backlog_bytes`, `publish_timeout`, `retain`, `retain_bytes`,
`retain_s` (0: no age bound).
Single event loop: a named broker is meant to be used from one event loop at a time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

from messaging._base import Message, PubSub, StartPosition, Subscription
from messaging._url import BrokerURL, OptionReader
from messaging.errors import BacklogFull

logger = logging.getLogger(__name__)

DEFAULT_BROKER_NAME = "default"


@dataclass(frozen=True)
class MemoryLimits:
    """Bounds applied by one connection to what it publishes."""

    max_backlog: int = 100_000
    max_backlog_bytes: int = 256 * 1024 * 1024
    publish_timeout: float = 10.0
    retain: int = 10_000
    retain_bytes: int = 64 * 1024 * 1024
    retain_s: float = 0.0  # 0: retained messages are bounded by count and bytes only

    @classmethod
    def from_url(cls, url: BrokerURL) -> MemoryLimits:
        options = OptionReader(url)
        limits = cls(
            max_backlog=options.integer("max_backlog", cls.max_backlog, minimum=1),
            max_backlog_bytes=options.integer(
                "max_backlog_bytes", cls.max_backlog_bytes, minimum=1
            ),
            publish_timeout=options.number("publish_timeout", cls.publish_timeout),
            retain=options.integer("retain", cls.retain),
            retain_bytes=options.integer("retain_bytes", cls.retain_bytes),
            retain_s=options.number("retain_s", cls.retain_s),
        )
        options.finish()
        return limits


class _Entry:
    """One published message, shared (read-only) by every group's backlog."""

    __slots__ = ("attributes", "data", "key", "published_at", "size")

    def __init__(
        self, data: bytes, key: str | None, attributes: dict[str, str], published_at: float
    ) -> None:
        self.data = data
        self.key = key
        self.attributes = attributes
        self.size = len(data)
        self.published_at = published_at  # unix seconds


def _wake_one(waiters: deque[asyncio.Future[None]]) -> None:
    while waiters:
        waiter = waiters.popleft()
        if not waiter.done():
            waiter.set_result(None)
            return


class _Group:
    """One consumer group's view of a topic: its backlog and the consumers waiting on it."""

    __slots__ = (
        "consumer_waiters",
        "dropped",
        "name",
        "pending",
        "space_waiters",
        "subscribers",
        "unacked",
        "unacked_bytes",
    )

    def __init__(self, name: str) -> None:
        self.name = name
        self.pending: deque[_Entry] = deque()
        self.unacked = 0  # pending + delivered-but-unsettled
        self.unacked_bytes = 0
        self.subscribers = 0
        self.dropped = 0
        self.consumer_waiters: deque[asyncio.Future[None]] = deque()
        self.space_waiters: deque[asyncio.Future[None]] = deque()

    def is_full(self, limits: MemoryLimits, size: int) -> bool:
        # An empty group always takes one message, even one larger than the byte bound.
        return self.unacked >= limits.max_backlog or (
            self.unacked > 0 and self.unacked_bytes + size > limits.max_backlog_bytes
        )

    def push(self, entry: _Entry, limits: MemoryLimits) -> None:
        if not self.subscribers:
            while self.pending and self.is_full(limits, entry.size):
                dropped = self.pending.popleft()
                self.unacked -= 1
                self.unacked_bytes -= dropped.size
                self.dropped += 1
        self.pending.append(entry)
        self.unacked += 1
        self.unacked_bytes += entry.size
        if self.consumer_waiters:
            _wake_one(self.consumer_waiters)

    def replace_queue(self, entries: list[_Entry]) -> None:
        """Queue exactly `entries` (a subscription started at a time); delivered ones stay held."""
        for entry in self.pending:
            self.unacked -= 1
            self.unacked_bytes -= entry.size
        self.pending = deque(entries)
        self.unacked += len(entries)
        self.unacked_bytes += sum(entry.size for entry in entries)

    def requeue(self, entry: _Entry) -> None:
        self.pending.appendleft(entry)
        if self.consumer_waiters:
            _wake_one(self.consumer_waiters)

    def release(self, entry: _Entry) -> None:
        self.unacked -= 1
        self.unacked_bytes -= entry.size
        if self.space_waiters:
            _wake_one(self.space_waiters)


class _Topic:
    """A topic: its retained tail (for new `earliest` groups) and its groups."""

    __slots__ = ("groups", "name", "retained", "retained_bytes")

    def __init__(self, name: str) -> None:
        self.name = name
        self.retained: deque[_Entry] = deque()
        self.retained_bytes = 0
        self.groups: dict[str, _Group] = {}

    def retain(self, entry: _Entry, limits: MemoryLimits) -> None:
        if limits.retain == 0 or entry.size > limits.retain_bytes:
            return
        self.retained.append(entry)
        self.retained_bytes += entry.size
        while len(self.retained) > limits.retain or self.retained_bytes > limits.retain_bytes:
            self.retained_bytes -= self.retained.popleft().size
        self.forget_older(entry.published_at, limits)

    def forget_older(self, now: float, limits: MemoryLimits) -> None:
        """Drop retained messages older than `retain_s` (when set)."""
        if not limits.retain_s:
            return
        horizon = now - limits.retain_s
        while self.retained and self.retained[0].published_at < horizon:
            self.retained_bytes -= self.retained.popleft().size

    def join(self, group_name: str, start: StartPosition, limits: MemoryLimits) -> _Group:
        group = self.groups.get(group_name)
        created = group is None
        if group is None:
            group = self.groups[group_name] = _Group(group_name)
        if isinstance(start, float):
            self.forget_older(time.time(), limits)
            group.replace_queue([e for e in self.retained if e.published_at >= start])
        elif created and start == "earliest":
            self.forget_older(time.time(), limits)
            group.replace_queue(list(self.retained))
        group.subscribers += 1
        return group


class MemoryBroker:
    """The state of one named in-process broker."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.topics: dict[str, _Topic] = {}

    def topic(self, name: str) -> _Topic:
        topic = self.topics.get(name)
        if topic is None:
            topic = self.topics[name] = _Topic(name)
        return topic

    def backlog(self, topic: str, group: str) -> int:
        """Messages the group has not acknowledged yet (queued plus delivered-but-unsettled)."""
        state = self.topics.get(topic)
        found = state.groups.get(group) if state else None
        return found.unacked if found else 0


_brokers: dict[str, MemoryBroker] = {}


def shared_broker(name: str = DEFAULT_BROKER_NAME) -> MemoryBroker:
    """The process-wide broker called `name`, created on first use."""
    broker = _brokers.get(name)
    if broker is None:
        broker = _brokers[name] = MemoryBroker(name)
    return broker


class MemoryMessage(Message):
    __slots__ = ("_entry", "_subscription")

    def __init__(self, topic: str, entry: _Entry, subscription: MemorySubscription) -> None:
        super().__init__(topic, entry.data, entry.key, dict(entry.attributes))
        self._entry = entry
        self._subscription = subscription

    def _settle(self, *, acked: bool) -> None:
        self._subscription._settle(self, acked=acked)


class RetainedMessage(Message):
    """A retained message read outside any group (`MemoryPubSub.retained`): settling it does nothing."""

    __slots__ = ()

    def _settle(self, *, acked: bool) -> None:
        return None


class MemorySubscription(Subscription):
    """One consumer attached to a group of an in-process topic."""

    def __init__(
        self,
        pubsub: MemoryPubSub,
        topic: str,
        *,
        group: str,
        start: StartPosition,
        max_in_flight: int,
    ) -> None:
        super().__init__(pubsub, topic, group=group, start=start, max_in_flight=max_in_flight)
        self._broker = pubsub.broker
        self._limits = pubsub.limits
        self._group: _Group | None = None
        self._unsettled: dict[MemoryMessage, None] = {}  # insertion-ordered, for requeue on close
        self._waiter: asyncio.Future[None] | None = None

    async def _open(self) -> None:
        self._group = self._broker.topic(self.topic).join(
            self.group, self.start_position, self._limits
        )

    async def _wait_for_messages(self) -> None:
        group = self._group
        assert group is not None
        if len(self._unsettled) < self.max_in_flight:
            await self._wait(group.consumer_waiters)
        else:
            await self._wait(None)  # woken by our own ack/nack or by close

    def _receive_ready(self) -> Message | None:
        group = self._group
        if self._closed or group is None or not group.pending:
            return None
        if len(self._unsettled) >= self.max_in_flight:
            return None
        message = MemoryMessage(self.topic, group.pending.popleft(), self)
        self._unsettled[message] = None
        return message

    async def _wait(self, queue: deque[asyncio.Future[None]] | None) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._waiter = waiter
        if queue is not None:
            queue.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            # A wake-up meant for us must not be lost: hand it to the next consumer of the group.
            if queue is not None and waiter.done() and not waiter.cancelled() and self._group:
                _wake_one(self._group.consumer_waiters)
            raise
        finally:
            self._waiter = None

    def _settle(self, message: MemoryMessage, *, acked: bool) -> None:
        if message not in self._unsettled:
            return  # already handed back by close(): the group owns it again
        del self._unsettled[message]
        group = self._group
        assert group is not None
        if acked:
            group.release(message._entry)
        else:
            group.requeue(message._entry)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _shutdown(self) -> None:
        group = self._group
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if group is None:
            return
        group.subscribers -= 1
        unsettled = list(self._unsettled)
        self._unsettled.clear()
        for message in reversed(unsettled):
            message._settled = True
            group.requeue(message._entry)
        if group.pending and group.consumer_waiters:
            _wake_one(group.consumer_waiters)


class MemoryPubSub(PubSub):
    """`memory://[name]`: the embedded broker, shared by every connection to the same name in this process."""

    durable = False
    _publishes_in_turn = True

    def __init__(self, url: BrokerURL, *, connect_timeout: float = 10.0) -> None:
        super().__init__(url, connect_timeout=connect_timeout)
        self.limits = MemoryLimits.from_url(url)
        self.broker = shared_broker(url.location or DEFAULT_BROKER_NAME)

    async def _connect(self) -> None:
        return None

    async def _close(self) -> None:
        return None

    async def _publish(
        self, topic: str, data: bytes, key: str | None, attributes: Mapping[str, str] | None
    ) -> None:
        state = self.broker.topics.get(topic) or self.broker.topic(topic)
        entry = _Entry(
            data if type(data) is bytes else bytes(data),
            key,
            dict(attributes) if attributes else {},
            time.time(),
        )
        limits = self.limits
        groups = state.groups.values()
        for group in groups:
            if group.subscribers and group.is_full(limits, entry.size):
                await self._wait_for_room(state, entry.size)
                break
        state.retain(entry, limits)
        for group in groups:
            group.push(entry, limits)

    async def _wait_for_room(self, topic: _Topic, size: int) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.publish_timeout
        while True:
            full = next(
                (
                    g
                    for g in topic.groups.values()
                    if g.subscribers and g.is_full(self.limits, size)
                ),
                None,
            )
            if full is None:
                return
            waiter = loop.create_future()
            full.space_waiters.append(waiter)
            try:
                async with asyncio.timeout_at(deadline):
                    await waiter
            except BaseException as exc:
                if waiter.done() and not waiter.cancelled():
                    _wake_one(
                        full.space_waiters
                    )  # a wake-up we will not use goes to the next publisher
                if isinstance(exc, TimeoutError):
                    raise BacklogFull(
                        f"{self.url}: group {full.name!r} of topic {topic.name!r} holds {full.unacked} "
                        f"unacknowledged messages ({full.unacked_bytes} bytes) and none was acknowledged "
                        f"within {self.limits.publish_timeout:g} s; its consumer is stuck or too slow: add "
                        "consumers, or raise ?max_backlog= / ?max_backlog_bytes= / ?publish_timeout= in the URL"
                    ) from None
                raise

    def _subscription(
        self, topic: str, *, group: str, start: StartPosition, max_in_flight: int
    ) -> Subscription:
        return MemorySubscription(
            self, topic, group=group, start=start, max_in_flight=max_in_flight
        )

    def retained(self, topic: str, *, since: float = 0.0) -> list[Message]:
        """A snapshot of `topic`'s retained messages published at or after `since` (unix seconds),
        oldest first. It reads outside any group, so no group is created, moved or kept: what an
        in-process replay (`fmnist serve`) needs."""
        state = self.broker.topics.get(topic)
        if state is None:
            return []
        state.forget_older(time.time(), self.limits)
        return [
            RetainedMessage(topic, entry.data, entry.key, dict(entry.attributes))
            for entry in state.retained
            if entry.published_at >= since
        ]

    async def _ensure_topics(self, topics: tuple[str, ...]) -> None:
        for topic in topics:
            self.broker.topic(topic)

    async def _ping(self) -> None:
        return None
