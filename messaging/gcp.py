"""The `gcp://PROJECT_ID` backend on google-cloud-pubsub: one subscription per group, streaming pull, asyncio bridge.

* Topics are created on first use (or by `ensure_topics`) with message retention
  (`topic_retention_s`, 1 day by default); each consumer group is one subscription named
  `<topic>.<group>`, created the first time the group subscribes. A new group with
  `start="earliest"` is sought back over the retention window, so it also receives what was
  published before it existed, as on Kafka; with `start="latest"` it is sought to its creation.
  (`?topic_retention_s=0` creates topics without retention: then every new group starts "latest".
  The emulator cannot seek ordered subscriptions: there, `start` takes effect only with
  `?ordering=false`; otherwise a new group sees what the topic retained.)
  A subscription started at a time (`start=<unix seconds>`) seeks the group's subscription to that
  time each time it opens: messages published since (within the topic's retention) are delivered
  again, acked or not. The emulator seeks unordered subscriptions only; on an ordered one it logs
  `pubsub_seek_unsupported` and the subscription keeps its own position (unacked messages only).
* Keys become ordering keys (subscriptions have message ordering on), so messages with one key
  arrive in order, as on Kafka; attributes are Pub/Sub attributes. Pub/Sub hands out the next
  message of a key only after the previous one was acked: give messages that a consumer should
  hold at the same time (a batch) different keys, as request ids are. `?ordering=false` turns it off.
* Streaming pull with `FlowControl(max_messages=max_in_flight)`; the client library extends the
  leases of held messages, so a slow batch is not redelivered. `ack()` / `nack()` map to Pub/Sub's.
  Messages a closed (or dead) subscription held come back to the group after the ack deadline
  (`ack_deadline_s`); ones the client pulled but had not handed over are nacked at once.
* The client's threads never touch the event loop: its callback hands each message over with
  `loop.call_soon_threadsafe`, publish futures are awaited through `asyncio.wrap_future`, and
  blocking admin calls run in worker threads.
* `PUBSUB_EMULATOR_HOST` (or the URL option `?emulator=host:port`) points the clients at the emulator.

URL options: `emulator`, `ack_deadline_s` (60), `max_latency_ms` (publish batching, 5), `ordering` (true),
`topic_retention_s` (86400; Pub/Sub allows 600 to 2678400, or 0 for none; retained bytes are billed).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from messaging._base import Message, PubSub, StartPosition, Subscription
from messaging._url import BrokerURL, OptionReader
from messaging.errors import BrokerUnavailable, MessagingError, MissingDependency

try:
    import grpc
    from google.api_core import exceptions as google_errors
    from google.auth import exceptions as auth_errors
    from google.cloud import pubsub_v1
    from google.cloud.pubsub_v1.subscriber.message import Message as PulledMessage
    from google.protobuf.duration_pb2 import Duration
    from google.protobuf.timestamp_pb2 import Timestamp
    from google.pubsub_v1.services.publisher.transports import PublisherGrpcTransport
    from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcTransport
except ImportError as missing:  # pragma: no cover - exercised by a test that hides the library
    raise MissingDependency(
        f"gcp:// needs google-cloud-pubsub ({missing}); install it with: pip install 'fmnist-service[gcp]'"
    ) from missing

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Pub/Sub accepts requests up to 10 MB; a batch stays below that, a single message may use it all.
_MAX_BATCH_BYTES = 9 * 1000 * 1000
_UNLIMITED_GRPC = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


@dataclass(frozen=True)
class GcpOptions:
    emulator: str | None = None
    ack_deadline_s: int = 60
    max_latency_ms: float = 5.0
    ordering: bool = True
    topic_retention_s: int = 86_400

    @classmethod
    def from_url(cls, url: BrokerURL) -> GcpOptions:
        read = OptionReader(url)
        ordering = (read.text("ordering", "true") or "true").lower()
        if ordering not in ("true", "false", "1", "0"):
            raise ValueError(f"broker URL option ordering={ordering!r}: expected true or false")
        options = cls(
            emulator=read.text("emulator", None) or os.environ.get("PUBSUB_EMULATOR_HOST") or None,
            ack_deadline_s=read.integer("ack_deadline_s", cls.ack_deadline_s, minimum=10),
            max_latency_ms=read.number("max_latency_ms", cls.max_latency_ms),
            ordering=ordering in ("true", "1"),
            topic_retention_s=read.integer("topic_retention_s", cls.topic_retention_s),
        )
        read.finish()
        if options.ack_deadline_s > 600:
            raise ValueError("broker URL option ack_deadline_s: Pub/Sub allows at most 600 seconds")
        if options.topic_retention_s and not 600 <= options.topic_retention_s <= 2_678_400:
            raise ValueError(
                "broker URL option topic_retention_s: Pub/Sub allows 600 to 2678400 seconds (or 0 for none)"
            )
        return options


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
    """One streaming pull on the group's subscription."""

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
        self._stream: Any = None  # StreamingPullFuture
        self._ready: deque[GoogleMessage] = deque()
        self._unsettled: dict[GoogleMessage, None] = {}
        self._receiver: asyncio.Future[None] | None = None

    async def _open(self) -> None:
        pubsub = self._google
        await pubsub._ensure_topic_once(self.topic)
        path = await pubsub._ensure_subscription(self.topic, self.group, self.start_position)
        if isinstance(self.start_position, float):
            await pubsub._seek(path, self.start_position, "the start time")
        self._loop = asyncio.get_running_loop()
        self._stream = pubsub.subscriber.subscribe(
            path,
            callback=self._from_client_thread,
            flow_control=pubsub_v1.types.FlowControl(max_messages=self.max_in_flight),
        )

    def _from_client_thread(self, pulled: PulledMessage) -> None:
        """Runs in the client's thread pool: hand over to the loop, never touch it directly."""
        loop = self._loop
        try:
            assert loop is not None
            loop.call_soon_threadsafe(self._deliver, pulled)
        except RuntimeError:  # the loop is closed: let another consumer have it
            pulled.nack()

    def _deliver(self, pulled: PulledMessage) -> None:
        if self._closed:
            pulled.nack()
            return
        self._ready.append(GoogleMessage(self.topic, pulled, self))
        receiver = self._receiver
        if receiver is not None and not receiver.done():
            receiver.set_result(None)

    async def _wait_for_messages(self) -> None:
        if self._stream is not None and self._stream.done():
            error = self._stream.exception()
            raise BrokerUnavailable(
                f"the Pub/Sub stream for {self.topic}/{self.group} on {self._google.url} ended: {error!r}"
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

    async def _shutdown(self) -> None:
        receiver = self._receiver
        if receiver is not None and not receiver.done():
            receiver.set_result(None)
        # What we hold stays unacknowledged: once the stream stops, nobody extends its lease and
        # Pub/Sub redelivers it to the group after the ack deadline. (An explicit nack would be
        # faster on the service, but the emulator then withholds the message from new streams.)
        for message in [*self._unsettled, *self._ready]:
            message._settled = True
        self._unsettled.clear()
        self._ready.clear()
        stream = self._stream
        if stream is not None:
            stream.cancel()  # the client nacks what it pulled but did not hand to us
            with contextlib.suppress(Exception):
                await asyncio.to_thread(stream.result, 30)


class GooglePubSub(PubSub):
    """`gcp://PROJECT_ID` through google-cloud-pubsub (or its emulator)."""

    def __init__(self, url: BrokerURL, *, connect_timeout: float = 10.0) -> None:
        super().__init__(url, connect_timeout=connect_timeout)
        self.project = url.location
        if not self.project:
            raise ValueError(f"gcp:// URL {url.raw!r} names no project; use gcp://PROJECT_ID")
        self.options = GcpOptions.from_url(url)
        self.publisher: Any = None
        self.subscriber: Any = None
        self._known_subscriptions: set[str] = set()

    def _clients(self) -> tuple[Any, Any]:
        batching = pubsub_v1.types.BatchSettings(
            max_bytes=_MAX_BATCH_BYTES,
            max_latency=self.options.max_latency_ms / 1000,
            max_messages=1000,
        )
        ordering = pubsub_v1.types.PublisherOptions(enable_message_ordering=self.options.ordering)
        host = self.options.emulator
        if host is None:
            return (
                pubsub_v1.PublisherClient(batch_settings=batching, publisher_options=ordering),
                pubsub_v1.SubscriberClient(),
            )
        # The emulator speaks plain gRPC and needs no credentials.
        publisher = pubsub_v1.PublisherClient(
            batch_settings=batching,
            publisher_options=ordering,
            transport=PublisherGrpcTransport(
                channel=grpc.insecure_channel(host, options=_UNLIMITED_GRPC)
            ),
        )
        subscriber = pubsub_v1.SubscriberClient(
            transport=SubscriberGrpcTransport(
                channel=grpc.insecure_channel(host, options=_UNLIMITED_GRPC)
            )
        )
        return publisher, subscriber

    async def _blocking(self, call: Callable[[], T], what: str) -> T:
        """Run a blocking client call in a worker thread; map transport failures to BrokerUnavailable."""
        try:
            return await asyncio.to_thread(call)
        except (
            google_errors.ServiceUnavailable,
            google_errors.DeadlineExceeded,
            google_errors.RetryError,
        ) as exc:
            raise BrokerUnavailable(
                f"Pub/Sub at {self.url} did not answer ({what}): {exc}"
            ) from exc

    async def _connect(self) -> None:
        try:
            self.publisher, self.subscriber = await asyncio.to_thread(self._clients)
        except auth_errors.DefaultCredentialsError as exc:
            raise BrokerUnavailable(
                f"no Google credentials for {self.url}: set GOOGLE_APPLICATION_CREDENTIALS or run "
                "`gcloud auth application-default login` (or set PUBSUB_EMULATOR_HOST for the emulator)"
            ) from exc
        await self._blocking(self._list_one_topic, "list topics")

    async def _close(self) -> None:
        publisher, subscriber = self.publisher, self.subscriber
        if publisher is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(publisher.stop)  # flushes pending batches
            with contextlib.suppress(Exception):
                publisher.transport.close()
        if subscriber is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(subscriber.close)

    async def _publish(
        self, topic: str, data: bytes, key: str | None, attributes: Mapping[str, str] | None
    ) -> None:
        if topic not in self._known_topics:
            await self._ensure_topic_once(topic)
        path = self.publisher.topic_path(self.project, topic)
        ordering_key = (key or "") if self.options.ordering else ""
        try:
            future = self.publisher.publish(
                path, data, ordering_key=ordering_key, **(attributes or {})
            )
            await asyncio.wrap_future(future)
        except google_errors.GoogleAPICallError as exc:
            if ordering_key:
                self.publisher.resume_publish(
                    path, ordering_key
                )  # a failure pauses the key; unpause it
            raise BrokerUnavailable(f"publishing to {topic!r} on {self.url} failed: {exc}") from exc
        except ValueError as exc:  # too large for one request
            raise MessagingError(
                f"Pub/Sub refused a message of {len(data)} bytes on {self.url}: {exc}"
            ) from exc

    async def _ensure_topics(self, topics: tuple[str, ...]) -> None:
        for topic in topics:
            if topic in self._known_topics:
                continue
            request: dict[str, Any] = {"name": self.publisher.topic_path(self.project, topic)}
            if self.options.topic_retention_s:
                request["message_retention_duration"] = Duration(
                    seconds=self.options.topic_retention_s
                )
            with contextlib.suppress(google_errors.AlreadyExists):
                await self._blocking(
                    functools.partial(self.publisher.create_topic, request=request),
                    f"create topic {topic}",
                )
            self._known_topics.add(topic)

    async def _ensure_subscription(self, topic: str, group: str, start: StartPosition) -> str:
        """The group's subscription; a new one with start="earliest" is sought back over the topic's retention."""
        path: str = self.subscriber.subscription_path(self.project, f"{topic}.{group}")
        if path in self._known_subscriptions:
            return path
        request = {
            "name": path,
            "topic": self.publisher.topic_path(self.project, topic),
            "ack_deadline_seconds": self.options.ack_deadline_s,
            "enable_message_ordering": self.options.ordering,
        }
        try:
            await self._blocking(
                lambda: self.subscriber.create_subscription(request=request),
                f"create subscription {path}",
            )
        except google_errors.AlreadyExists:
            pass  # the group has a position already: `start` does not apply
        else:
            if isinstance(start, str):  # a start time is sought on every open instead
                await self._position_new_group(path, start)
        self._known_subscriptions.add(path)
        return path

    async def _position_new_group(self, path: str, start: Literal["earliest", "latest"]) -> None:
        """Seek a new subscription to `start`: back over the topic's retention, or to now.

        Seeking to now makes "latest" exact even where a new subscription would see retained
        messages (the emulator does that).
        """
        if start == "earliest" and not self.options.topic_retention_s:
            return
        since = time.time()
        if start == "earliest":
            since -= self.options.topic_retention_s
        await self._seek(path, since, f"the {start} position")

    async def _seek(self, path: str, since: float, what: str) -> None:
        """Seek the subscription to unix time `since`; the emulator refuses it on ordered subscriptions."""
        when = Timestamp()
        when.FromNanoseconds(int(since * 1e9))
        try:
            await self._blocking(
                lambda: self.subscriber.seek(request={"subscription": path, "time": when}),
                f"seek {path} to {what}",
            )
        except google_errors.MethodNotImplemented:
            # The emulator has no seek on ordered subscriptions; the service has.
            logger.warning(
                "event=pubsub_seek_unsupported subscription=%s to=%s effect=%s",
                path,
                what,
                "the group starts wherever the server puts it",
            )

    def _subscription(
        self, topic: str, *, group: str, start: StartPosition, max_in_flight: int
    ) -> Subscription:
        return GoogleSubscription(
            self, topic, group=group, start=start, max_in_flight=max_in_flight
        )

    async def _ping(self) -> None:
        await self._blocking(self._list_one_topic, "ping")

    def _list_one_topic(self) -> None:
        """A cheap authenticated round trip, without retries, bounded by the connect timeout."""
        request = {"project": f"projects/{self.project}", "page_size": 1}
        next(
            iter(
                self.publisher.list_topics(
                    request=request, retry=None, timeout=self.connect_timeout
                )
            ),
            None,
        )
