"""What a subscriber holds: `Message` (settled once, by ack or nack) and `Subscription` (the
messages of one topic for one consumer group, as an async iterator); backends fill in the I/O."""

from __future__ import annotations

import asyncio
import logging
from abc import abstractmethod
from collections.abc import AsyncIterator
from types import TracebackType
from typing import TYPE_CHECKING, Literal, Self

if TYPE_CHECKING:
    from messaging._base import PubSub

logger = logging.getLogger("messaging")

StartPosition = Literal["earliest", "latest"] | float
"""Where a subscription starts: "earliest" / "latest" for a group without a position yet, or a unix
time in seconds (a float): every start, whatever the group committed, at the first message published
at or after that time."""


class Message:
    """One delivered message. Settle it exactly once with `ack()` or `nack()`; later calls do nothing.

    `ack()` means "done, never deliver again to this group"; `nack()` means "deliver it again soon"
    (to this or another consumer of the group). A message neither acked nor nacked when its
    subscription closes is delivered again to the group.
    """

    __slots__ = ("_settled", "attributes", "data", "key", "topic")

    def __init__(
        self, topic: str, data: bytes, key: str | None, attributes: dict[str, str]
    ) -> None:
        self.topic = topic
        self.data = data
        self.key = key
        self.attributes = attributes
        self._settled = False

    @property
    def settled(self) -> bool:
        """True once `ack()` or `nack()` was called."""
        return self._settled

    async def ack(self) -> None:
        """Mark the message done for this group."""
        if not self._settled:
            self._settled = True
            self._settle(acked=True)

    async def nack(self) -> None:
        """Ask for the message to be delivered again soon."""
        if not self._settled:
            self._settled = True
            self._settle(acked=False)

    def _settle(self, *, acked: bool) -> None:
        """Backend hook: record the ack or nack. Must not block."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<Message topic={self.topic} key={self.key} bytes={len(self.data)}>"


class Subscription(AsyncIterator[Message]):
    """The messages of one topic for one consumer group, as an async iterator.

    Iterating starts it lazily. Use `async with pubsub.subscribe(...) as messages:` to start it
    (join the group, create the subscription) before publishing: then a `start="latest"` group is
    positioned before the first publish. `aclose()` ends the iteration; unsettled messages are
    delivered again to the group.
    """

    def __init__(
        self,
        pubsub: PubSub,
        topic: str,
        *,
        group: str,
        start: StartPosition,
        max_in_flight: int,
    ) -> None:
        self.topic = topic
        self.group = group
        self.start_position: StartPosition = start
        self.max_in_flight = max_in_flight
        self._pubsub = pubsub
        self._started = False
        self._closed = False
        self._start_lock: asyncio.Lock | None = None

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def healthy(self) -> bool:
        """False while the backend knows this subscription cannot receive (e.g. its consumer group is
        rejoining a broker that came back); readiness checks read it."""
        return True

    async def start(self) -> None:
        """Join the group (idempotent). Iterating calls it for you."""
        if self._started or self._closed:
            return
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self._started or self._closed:
                return
            try:
                await self._open()
            except BaseException:
                await self.aclose()
                raise
            self._started = True

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Message:
        if not self._started:
            if self._closed:
                raise StopAsyncIteration
            await self.start()
        message = await self._receive()
        if message is None:
            raise StopAsyncIteration
        return message

    async def receive_batch(self, max_messages: int) -> list[Message]:
        """The next message (waiting for it) and those already received behind it, up to
        `max_messages` and within `max_in_flight`; `[]` once the subscription has ended.

        For consumers that handle what arrived together as one unit (the worker submits a chunk to
        its model at once): one wake-up and one task per chunk instead of per message.
        """
        try:
            first = await self.__anext__()
        except StopAsyncIteration:
            return []
        batch = [first]
        while len(batch) < max_messages:
            message = self._receive_ready()
            if message is None:
                break
            batch.append(message)
        return batch

    async def aclose(self) -> None:
        """Stop consuming; unsettled messages go back to the group. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            await self._shutdown()
        finally:
            self._pubsub._forget(self)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    @abstractmethod
    async def _open(self) -> None:
        """Join the group / create the subscription."""

    async def _receive(self) -> Message | None:
        """The next message, waiting for one; None once the subscription is closed."""
        while not self._closed:
            message = self._receive_ready()
            if message is not None:
                return message
            await self._wait_for_messages()
        return None

    @abstractmethod
    def _receive_ready(self) -> Message | None:
        """A message already received, without waiting (respecting `max_in_flight`); None if there
        is none, or once the subscription is closed."""

    @abstractmethod
    async def _wait_for_messages(self) -> None:
        """Return when `_receive_ready` may have a message or the subscription closed; raise
        `BrokerUnavailable` when the backend's delivery has stopped for good."""

    @abstractmethod
    async def _shutdown(self) -> None:
        """Stop consuming, wake a pending `_receive()` (it returns None) and release the rest."""
