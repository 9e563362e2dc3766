"""The backend boundary: `PubSub` (with `Message` and `Subscription` from `_subscription`) owns the
lifecycle; backends fill in I/O."""

from __future__ import annotations

import asyncio
import logging
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Literal, Self

from messaging._subscription import Message, StartPosition, Subscription
from messaging._url import BrokerURL
from messaging.errors import BrokerUnavailable, MessagingError, NotConnected

__all__ = ["Message", "Outgoing", "OutgoingItem", "PubSub", "StartPosition", "Subscription"]

logger = logging.getLogger("messaging")

# The intersection of what Kafka (`[A-Za-z0-9._-]`, <= 249) and Pub/Sub (starts with a letter,
# 3..255 characters) accept, so a topic that works on one backend works on all of them.
_TOPIC_NAME = re.compile(r"[A-Za-z][A-Za-z0-9._-]{2,199}")
_GROUP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def check_topic_name(topic: str) -> None:
    if not _TOPIC_NAME.fullmatch(topic):
        raise ValueError(
            f"invalid topic name {topic!r}: use 3-200 characters from A-Z a-z 0-9 . _ -, starting with a letter"
        )


def check_group_name(group: str) -> None:
    if not _GROUP_NAME.fullmatch(group):
        raise ValueError(
            f"invalid group name {group!r}: use 1-100 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit"
        )


def _check_start(start: object) -> StartPosition:
    if start == "earliest" or start == "latest":
        return start
    if (
        isinstance(start, int | float)
        and not isinstance(start, bool)
        and math.isfinite(start)
        and start >= 0
    ):
        return float(start)
    raise ValueError(f"start must be 'earliest', 'latest' or a unix time in seconds, got {start!r}")


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One message for `PubSub.publish_many`: its bytes, ordering key and attributes."""

    data: bytes
    key: str | None = None
    attributes: Mapping[str, str] | None = None


OutgoingItem = Outgoing | tuple[bytes, str | None, Mapping[str, str] | None]
"""An `Outgoing`, or the tuple `(data, key, attributes)`."""


def _not_accepted(timeout_s: float) -> TimeoutError:
    return TimeoutError(f"not accepted by the broker within {timeout_s:g} s")


def _outgoing(item: object) -> Outgoing:
    """`item` as an `Outgoing`; a TypeError naming what is wrong with it otherwise."""
    if isinstance(item, tuple) and len(item) == 3:
        item = Outgoing(*item)
    if not isinstance(item, Outgoing):
        raise TypeError(f"expected Outgoing or (data, key, attributes), got {item!r:.80}")
    if not isinstance(item.data, bytes | bytearray | memoryview):
        raise TypeError(f"message data must be bytes, got {type(item.data).__name__}")
    if item.key is not None and not isinstance(item.key, str):
        raise TypeError(f"message key must be a str or None, got {type(item.key).__name__}")
    return item


class PubSub(ABC):
    """A connection to one broker. Use as `async with messaging.connect(url) as pubsub:`.

    The base class owns the lifecycle (connect with a bounded time, close, use-before-connect
    errors, argument checks); a backend implements only the `_`-prefixed hooks.
    """

    durable: bool = True
    """False when the broker's log lives in this process (the embedded broker): it dies with the
    process, so nothing published there helps a restarted process, and a new subscription gets the
    whole retained history at once."""

    _publishes_in_turn: bool = False
    # A backend whose publish never waits on a network publishes a batch one by one: cheaper than a
    # task per message. Remote brokers want them concurrent, so that the client batches them and one
    # slow acknowledgement does not hold up the rest.

    def __init__(self, url: BrokerURL, *, connect_timeout: float) -> None:
        if not connect_timeout > 0:
            raise ValueError(f"connect_timeout must be > 0 seconds, got {connect_timeout}")
        self.url = url.redacted
        self.connect_timeout = connect_timeout
        self._state: Literal["new", "connected", "closed"] = "new"
        self._subscriptions: set[Subscription] = set()
        self._checked_topics: set[str] = set()
        self._known_topics: set[str] = set()  # exist on the broker (backends add to it)
        self._creating: dict[str, asyncio.Task[None]] = {}

    @property
    def connected(self) -> bool:
        return self._state == "connected"

    @property
    def link_up(self) -> bool:
        """False while a connected backend is recovering its link (reconnecting, re-creating topics);
        publishes then wait for it or fail with `BrokerUnavailable`."""
        return self._state == "connected"

    # --- lifecycle ------------------------------------------------------------------------

    async def connect(self) -> None:
        """Reach the broker within `connect_timeout` seconds, or raise `BrokerUnavailable`."""
        if self._state == "connected":
            return
        if self._state == "closed":
            raise NotConnected(
                f"{self.url}: this PubSub was closed; call messaging.connect() again"
            )
        try:
            await asyncio.wait_for(self._connect(), self.connect_timeout)
        except TimeoutError:
            await self._close()
            raise BrokerUnavailable(
                f"could not reach the broker at {self.url} within {self.connect_timeout:g} s: check that it is "
                "running and reachable, or raise the connect timeout (FMNIST_BROKER_CONNECT_TIMEOUT_S)"
            ) from None
        except BaseException:
            await self._close()
            raise
        self._state = "connected"

    async def close(self) -> None:
        """Stop every subscription (unsettled messages go back to their group), then disconnect."""
        if self._state == "closed":
            return
        was_connected = self._state == "connected"
        self._state = "closed"
        try:
            for subscription in list(self._subscriptions):
                try:
                    await subscription.aclose()
                except Exception as exc:  # one broken consumer must not keep the clients open
                    logger.warning(
                        "event=subscription_close_failed broker=%s topic=%s group=%s error=%r",
                        self.url,
                        subscription.topic,
                        subscription.group,
                        exc,
                    )
        finally:
            for task in self._creating.values():
                task.cancel()
            if was_connected:
                await self._close()

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _require_connected(self) -> None:
        if self._state != "connected":
            if self._state == "closed":
                raise NotConnected(
                    f"{self.url}: this PubSub was closed; call messaging.connect() again"
                )
            raise NotConnected(
                f"{self.url}: not connected yet; use `async with messaging.connect(url) as pubsub:` "
                "or `await pubsub.connect()` first"
            )

    def _check_topic(self, topic: str) -> None:
        if topic not in self._checked_topics:
            check_topic_name(topic)
            self._checked_topics.add(topic)

    async def _ensure_topic_once(self, topic: str) -> None:
        """Create `topic` unless known; concurrent first publishes share one creation."""
        if topic in self._known_topics:
            return
        task = self._creating.get(topic)
        if task is None:
            task = self._creating[topic] = asyncio.create_task(self._ensure_topics((topic,)))
        try:
            await asyncio.shield(task)
        finally:
            if task.done():
                self._creating.pop(topic, None)

    def _forget(self, subscription: Subscription) -> None:
        self._subscriptions.discard(subscription)

    # --- the contract ---------------------------------------------------------------------

    async def publish(
        self,
        topic: str,
        data: bytes,
        *,
        key: str | None = None,
        attributes: Mapping[str, str] | None = None,
    ) -> None:
        """Publish one message; returns once the broker has accepted it (acks=all on Kafka)."""
        if self._state != "connected":
            self._require_connected()
        self._check_topic(topic)
        # Pub/Sub cannot tell an empty ordering key from none: make "" mean None everywhere.
        await self._publish(topic, data, key or None, attributes)

    async def publish_many(
        self, topic: str, items: Iterable[OutgoingItem], *, timeout_s: float | None = None
    ) -> list[Exception | None]:
        """Publish every item; one outcome per item, in order: None once accepted, else its error.

        Never raises for one item (a malformed item gets its TypeError as its outcome); a broker
        outage gives every item its `BrokerUnavailable`. With `timeout_s`, the items not accepted
        within that many seconds are given up and get a TimeoutError, so that a caller waits a
        bounded time. In-process brokers publish in turn (cheaper than a task per message);
        remote ones concurrently, so that the client batches them and one slow acknowledgement
        does not hold up the rest.
        """
        if self._state != "connected":
            self._require_connected()
        self._check_topic(topic)
        if timeout_s is not None and not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s}")
        if self._publishes_in_turn:
            return await self._publish_in_turn(topic, list(items), timeout_s)
        if timeout_s is None:
            return list(await asyncio.gather(*(self._publish_outcome(topic, i) for i in items)))
        tasks = [asyncio.ensure_future(self._publish_outcome(topic, item)) for item in items]
        if not tasks:
            return []
        _, pending = await asyncio.wait(tasks, timeout=timeout_s)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
        late = _not_accepted(timeout_s)
        return [late if task in pending or task.cancelled() else task.result() for task in tasks]

    async def _publish_in_turn(
        self, topic: str, items: list[object], timeout_s: float | None
    ) -> list[Exception | None]:
        outcomes: list[Exception | None] = []
        try:
            async with asyncio.timeout(timeout_s):
                for item in items:
                    outcomes.append(await self._publish_outcome(topic, item))
        except TimeoutError:
            assert timeout_s is not None  # only a deadline raises it here
            outcomes.extend([_not_accepted(timeout_s)] * (len(items) - len(outcomes)))
        return outcomes

    async def _publish_outcome(self, topic: str, item: object) -> Exception | None:
        try:
            message = _outgoing(item)
            await self.publish(topic, message.data, key=message.key, attributes=message.attributes)
        except Exception as exc:
            return exc
        return None

    def subscribe(
        self,
        topic: str,
        *,
        group: str,
        start: StartPosition = "earliest",
        max_in_flight: int = 256,
    ) -> Subscription:
        """Messages of `topic` for consumer `group`: the same group shares the work, another group gets its own copy.

        `start` is "earliest" or "latest" (where a group without a position yet begins: the oldest
        retained message or the next one published), or a unix time in seconds as a float: the
        subscription then begins at the first message published at or after that time, whatever the
        group committed before, and again on each rebalance that gives it a partition (Kafka), so
        it re-reads a window of the log. Messages published before the time may still arrive within
        the backend's precision (milliseconds on Kafka, the record's broker time on Pub/Sub); a time
        before the retention window starts at the oldest retained message. Meant for groups of one
        consumer (a gateway's results); on a shared group it redelivers the window to the group.
        At most `max_in_flight` messages are delivered and not yet settled at any time (flow control).
        """
        self._require_connected()
        self._check_topic(topic)
        check_group_name(group)
        start = _check_start(start)
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        subscription = self._subscription(
            topic, group=group, start=start, max_in_flight=max_in_flight
        )
        self._subscriptions.add(subscription)
        return subscription

    async def ensure_topics(self, *topics: str) -> None:
        """Create the topics that do not exist yet (publish and subscribe also do this on first use)."""
        self._require_connected()
        for topic in topics:
            self._check_topic(topic)
        await self._ensure_topics(topics)

    async def ping(self) -> None:
        """Check the broker answers within `connect_timeout`; raises `BrokerUnavailable` otherwise."""
        self._require_connected()
        try:
            await asyncio.wait_for(self._ping(), self.connect_timeout)
        except TimeoutError:
            raise BrokerUnavailable(
                f"the broker at {self.url} did not answer within {self.connect_timeout:g} s"
            ) from None
        except MessagingError:
            raise
        except Exception as exc:
            raise BrokerUnavailable(f"the broker at {self.url} did not answer: {exc}") from exc

    # --- backend hooks --------------------------------------------------------------------

    @abstractmethod
    async def _connect(self) -> None:
        """Open clients and check the broker answers. The base class bounds the time."""

    @abstractmethod
    async def _close(self) -> None:
        """Release clients. Also called after a failed `_connect()`; must tolerate partial state."""

    @abstractmethod
    async def _publish(
        self, topic: str, data: bytes, key: str | None, attributes: Mapping[str, str] | None
    ) -> None: ...

    @abstractmethod
    def _subscription(
        self, topic: str, *, group: str, start: StartPosition, max_in_flight: int
    ) -> Subscription: ...

    @abstractmethod
    async def _ensure_topics(self, topics: tuple[str, ...]) -> None: ...

    @abstractmethod
    async def _ping(self) -> None: ...

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url} {self._state}>"
