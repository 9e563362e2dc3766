"""`GooglePubSub`: the clients, publishing, and the topics and subscriptions it creates."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal, TypeVar

import grpc
from google.api_core import exceptions as google_errors
from google.auth import exceptions as auth_errors
from google.cloud import pubsub_v1
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from google.pubsub_v1.services.publisher.transports import PublisherGrpcTransport
from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcTransport

from messaging._base import PubSub, StartPosition, Subscription
from messaging._url import BrokerURL
from messaging.errors import BrokerUnavailable, MessagingError
from messaging.gcp._link import Link
from messaging.gcp._options import GcpOptions
from messaging.gcp._subscription import GoogleSubscription

logger = logging.getLogger("messaging.gcp")

T = TypeVar("T")

# Pub/Sub accepts requests up to 10 MB; a batch stays below that, a single message may use it all.
_MAX_BATCH_BYTES = 9 * 1000 * 1000
_UNLIMITED_GRPC = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
# A failed call of these kinds means the broker is away or lost the topic: check the link again.
_LINK_FAILURES = (
    google_errors.NotFound,
    google_errors.ServiceUnavailable,
    google_errors.DeadlineExceeded,
    google_errors.RetryError,
)


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
        # Everything this client created or checked: re-created when the broker comes back without it.
        self._wanted_topics: set[str] = set()
        self._wanted_subscriptions: dict[str, str] = {}  # subscription path -> topic
        self._link = Link(self)
        self._unanswered: set[Any] = set()  # publish futures the client has not settled yet

    @property
    def link_up(self) -> bool:
        return self.connected and self._link.ready.is_set()

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
        for client in (self.publisher, self.subscriber):
            channel = getattr(client.transport, "grpc_channel", None)
            if channel is not None:
                self._link.watch(channel)
        self._link.ready.set()

    async def _close(self) -> None:
        await self._link.close()
        publisher, subscriber = self.publisher, self.subscriber
        if publisher is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(publisher.stop)  # sends the pending batches
            if await self._publishes_answered():
                with contextlib.suppress(Exception):
                    publisher.transport.close()
        if subscriber is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(subscriber.close)

    async def _publishes_answered(self) -> bool:
        """Wait up to the connect timeout for the publishes in flight; False if some never were.

        Their threads keep retrying (for ever with ordering on) and would fail loudly on a closed
        channel, so then the channel is left open for the process's exit to release.
        """
        deadline = time.monotonic() + self.connect_timeout
        while self._unanswered and time.monotonic() < deadline:  # noqa: ASYNC110 - client threads settle them
            await asyncio.sleep(0.02)
        if self._unanswered:
            logger.warning(
                "event=pubsub_close_with_unanswered_publishes broker=%s count=%d effect=%s",
                self.url,
                len(self._unanswered),
                "their callers were told BrokerUnavailable; the channel is left open",
            )
            return False
        return True

    async def _publish(
        self, topic: str, data: bytes, key: str | None, attributes: Mapping[str, str] | None
    ) -> None:
        deadline = time.monotonic() + self.connect_timeout
        if not self._link.ready.is_set():
            await self._wait_for_link(deadline)
        if topic not in self._known_topics:
            await self._ensure_topic_once(topic)
        path = self.publisher.topic_path(self.project, topic)
        ordering_key = (key or "") if self.options.ordering else ""
        try:
            future = self.publisher.publish(
                path, data, ordering_key=ordering_key, **(attributes or {})
            )
        except ValueError as exc:  # too large for one request
            raise MessagingError(
                f"Pub/Sub refused a message of {len(data)} bytes on {self.url}: {exc}"
            ) from exc
        self._unanswered.add(future)
        future.add_done_callback(functools.partial(self._published, path, ordering_key))
        delivery = asyncio.wrap_future(future)
        try:
            # With ordering on, the client retries a publish for ever: bound it here.
            await asyncio.wait_for(asyncio.shield(delivery), deadline - time.monotonic())
        except TimeoutError:
            delivery.add_done_callback(_ignore_outcome)
            self._link.broken("publish_timed_out")
            raise BrokerUnavailable(
                f"publishing to {topic!r} on {self.url} got no answer within {self.connect_timeout:g} s"
            ) from None
        except (google_errors.GoogleAPICallError, google_errors.RetryError) as exc:
            if isinstance(exc, _LINK_FAILURES):
                self._link.broken(f"publish_failed:{type(exc).__name__}")
            raise BrokerUnavailable(f"publishing to {topic!r} on {self.url} failed: {exc}") from exc

    def _published(self, path: str, ordering_key: str, future: Any) -> None:
        """Runs in the client's thread: a failure pauses the ordering key, so unpause it."""
        self._unanswered.discard(future)
        if ordering_key and future.exception() is not None:
            with contextlib.suppress(Exception):
                self.publisher.resume_publish(path, ordering_key)

    async def _wait_for_link(self, deadline: float) -> None:
        try:
            await asyncio.wait_for(self._link.ready.wait(), deadline - time.monotonic())
        except TimeoutError:
            raise BrokerUnavailable(
                f"the link to {self.url} is down (recovering) after {self.connect_timeout:g} s"
            ) from None

    async def _ensure_topics(self, topics: tuple[str, ...]) -> None:
        for topic in topics:
            if topic not in self._known_topics:
                await self._create_topic(topic)
                self._known_topics.add(topic)
                self._wanted_topics.add(topic)

    async def _create_topic(self, topic: str, **call: Any) -> bool:
        """Create `topic` with this client's retention; False if it existed already."""
        request: dict[str, Any] = {"name": self.publisher.topic_path(self.project, topic)}
        if self.options.topic_retention_s:
            request["message_retention_duration"] = Duration(seconds=self.options.topic_retention_s)
        try:
            await self._blocking(
                functools.partial(self.publisher.create_topic, request=request, **call),
                f"create topic {topic}",
            )
        except google_errors.AlreadyExists:
            return False
        return True

    async def _create_subscription(self, path: str, topic: str, **call: Any) -> bool:
        """Create the subscription `path` on `topic`; False if it existed already."""
        request = {
            "name": path,
            "topic": self.publisher.topic_path(self.project, topic),
            "ack_deadline_seconds": self.options.ack_deadline_s,
            "enable_message_ordering": self.options.ordering,
        }
        try:
            await self._blocking(
                functools.partial(self.subscriber.create_subscription, request=request, **call),
                f"create subscription {path}",
            )
        except google_errors.AlreadyExists:
            return False
        return True

    async def _ensure_subscription(self, topic: str, group: str, start: StartPosition) -> str:
        """The group's subscription; a new one with start="earliest" is sought back over the topic's retention."""
        path: str = self.subscriber.subscription_path(self.project, f"{topic}.{group}")
        if path in self._known_subscriptions:
            return path
        # An existing subscription means the group has a position already: `start` does not apply;
        # a start time is sought on every open instead.
        if await self._create_subscription(path, topic) and isinstance(start, str):
            await self._position_new_group(path, start)
        self._known_subscriptions.add(path)
        self._wanted_subscriptions[path] = topic
        return path

    async def _recreate(self) -> tuple[list[str], list[str]]:
        """Create every topic and subscription this client made that the broker no longer has.

        A re-created subscription is not sought: it starts at its creation, which is all that a
        re-created (empty) topic holds.
        """
        once = {"retry": None, "timeout": self.connect_timeout}  # the recovery loop retries
        topics = [t for t in sorted(self._wanted_topics) if await self._create_topic(t, **once)]
        self._known_topics.update(self._wanted_topics)
        subscriptions = [
            path.rpartition("/")[2]
            for path, topic in sorted(self._wanted_subscriptions.items())
            if await self._create_subscription(path, topic, **once)
        ]
        self._known_subscriptions.update(self._wanted_subscriptions)
        return topics, subscriptions

    def _forget_known(self) -> None:
        self._known_topics.clear()
        self._known_subscriptions.clear()

    def _google_subscriptions(self) -> Iterator[GoogleSubscription]:
        for subscription in list(self._subscriptions):
            if isinstance(subscription, GoogleSubscription):
                yield subscription

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


def _ignore_outcome(delivery: asyncio.Future[Any]) -> None:
    """Mark a publish that outlived its caller's wait as seen, so it leaves no warning behind."""
    if not delivery.cancelled():
        delivery.exception()
