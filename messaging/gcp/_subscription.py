"""One consumer group's streaming pull, bridged from the client's threads to asyncio."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import TYPE_CHECKING, Any

from google.api_core import exceptions as google_errors
from google.cloud import pubsub_v1
from google.cloud.pubsub_v1.subscriber.message import Message as PulledMessage

from messaging._base import Message, StartPosition, Subscription
from messaging.errors import BrokerUnavailable

if TYPE_CHECKING:
    from messaging.gcp._pubsub import GooglePubSub

# A stream ended by these is a broker that lost the subscription: recovery re-creates it. Any other
# end (permission, credentials) needs a person, so the receiver gets BrokerUnavailable.
_RECOVERABLE_STREAM_ENDS = (google_errors.NotFound,)


class GoogleMessage(Message):
    __slots__ = ("_pulled", "_subscription")

    def __init__(self, topic: str, pulled: PulledMessage, subscription: GoogleSubscription) -> None:
        super().__init__(topic, pulled.data, pulled.ordering_key or None, dict(pulled.attributes))
        self._pulled = pulled
        self._subscription = subscription

    def _settle(self, *, acked: bool) -> None:
        # Both only queue a request for the client's dispatcher thread; they never block.
        if acked:
            self._pulled.ack()
        else:
            self._pulled.nack()
        self._subscription._settled(self)


class GoogleSubscription(Subscription):
    """One streaming pull on the group's subscription, restarted after the broker recovers."""

    def __init__(
        self,
        pubsub: GooglePubSub,
        topic: str,
        *,
        group: str,
        start: StartPosition,
        max_in_flight: int,
    ) -> None:
        super().__init__(pubsub, topic, group=group, start=start, max_in_flight=max_in_flight)
        self._google = pubsub
        self._loop: asyncio.AbstractEventLoop | None = None
        self._path = ""
        self._stream: Any = None  # StreamingPullFuture
        self._failure: BaseException | None = None  # why the stream ended for good
        self._rejoining = False  # the link broke; healthy again once the stream is restarted
        self._retiring: set[asyncio.Task[None]] = set()
        self._ready: deque[GoogleMessage] = deque()
        self._unsettled: dict[GoogleMessage, None] = {}
        self._receiver: asyncio.Future[None] | None = None

    @property
    def healthy(self) -> bool:
        return not self._closed and not self._rejoining and self._failure is None

    async def _open(self) -> None:
        pubsub = self._google
        await pubsub._ensure_topic_once(self.topic)
        self._path = await pubsub._ensure_subscription(self.topic, self.group, self.start_position)
        if isinstance(self.start_position, float):
            await pubsub._seek(self._path, self.start_position, "the start time")
        self._loop = asyncio.get_running_loop()
        self._start_stream()

    def _start_stream(self) -> None:
        stream = self._google.subscriber.subscribe(
            self._path,
            callback=self._from_client_thread,
            flow_control=pubsub_v1.types.FlowControl(max_messages=self.max_in_flight),
        )
        self._stream = stream
        stream.add_done_callback(self._stream_done_in_client_thread)

    def _from_client_thread(self, pulled: PulledMessage) -> None:
        """Runs in the client's thread pool: hand over to the loop, never touch it directly."""
        loop = self._loop
        try:
            assert loop is not None
            loop.call_soon_threadsafe(self._deliver, pulled)
        except RuntimeError:  # the loop is closed: let another consumer have it
            pulled.nack()

    def _stream_done_in_client_thread(self, stream: Any) -> None:
        loop = self._loop
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody to tell
            assert loop is not None
            loop.call_soon_threadsafe(self._stream_ended, stream)

    def _stream_ended(self, stream: Any) -> None:
        if self._closed or stream is not self._stream or stream.cancelled():
            return  # replaced or stopped on purpose
        error = stream.exception()
        if isinstance(error, _RECOVERABLE_STREAM_ENDS):
            self._google._link.broken(f"subscription_missing:{self._path}")
            return
        self._failure = error
        self._wake_receiver()

    def _deliver(self, pulled: PulledMessage) -> None:
        if self._closed:
            pulled.nack()
            return
        self._ready.append(GoogleMessage(self.topic, pulled, self))
        self._wake_receiver()

    def _wake_receiver(self) -> None:
        receiver = self._receiver
        if receiver is not None and not receiver.done():
            receiver.set_result(None)

    async def _wait_for_messages(self) -> None:
        if self._failure is not None:
            raise BrokerUnavailable(
                f"the Pub/Sub stream for {self.topic}/{self.group} on {self._google.url} ended: {self._failure!r}"
            )
        self._receiver = asyncio.get_running_loop().create_future()
        try:
            await self._receiver
        finally:
            self._receiver = None

    def _receive_ready(self) -> Message | None:
        if self._closed or not self._ready:
            return None
        message = self._ready.popleft()
        self._unsettled[message] = None
        return message

    def _settled(self, message: GoogleMessage) -> None:
        self._unsettled.pop(message, None)

    def _link_broken(self) -> None:
        self._rejoining = True

    def _link_restored(self) -> None:
        """The subscription exists again: pull on a fresh stream (the old one may be retrying into
        a subscription that was gone, or have ended) and report healthy."""
        if self._closed or not self._path:
            return
        old = self._stream
        self._start_stream()
        if old is not None:
            task = asyncio.get_running_loop().create_task(_stop_stream(old))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
        self._failure = None
        self._rejoining = False

    async def _shutdown(self) -> None:
        self._wake_receiver()
        # What we hold stays unacknowledged: once the stream stops, nobody extends its lease and
        # Pub/Sub redelivers it to the group after the ack deadline. (An explicit nack would be
        # faster on the service, but the emulator then withholds the message from new streams.)
        for message in [*self._unsettled, *self._ready]:
            message._settled = True
        self._unsettled.clear()
        self._ready.clear()
        if self._stream is not None:
            await _stop_stream(self._stream)
        for task in list(self._retiring):
            with contextlib.suppress(Exception):
                await task


async def _stop_stream(stream: Any) -> None:
    stream.cancel()  # the client nacks what it pulled but did not hand to us
    with contextlib.suppress(Exception):
        await asyncio.to_thread(stream.result, 30)
