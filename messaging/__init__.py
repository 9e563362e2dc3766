"""Publish/subscribe for the service: one `PubSub` contract over memory://, kafka:// and gcp:// brokers.

    async with messaging.connect("kafka://127.0.0.1:9092") as pubsub:
        await pubsub.publish("fmnist.requests", b"...", key="r1", attributes={"shape": "1,28,28"})
        async for message in pubsub.subscribe("fmnist.requests", group="workers"):
            ...
            await message.ack()

Backends are chosen by URL scheme; Kafka and Pub/Sub need the `kafka` / `gcp` extras. Errors:

    MessagingError
     ├── BrokerUnavailable
     ├── MissingDependency
     ├── NotConnected
     └── BacklogFull
"""

from __future__ import annotations

from messaging._base import Message, Outgoing, PubSub, StartPosition, Subscription
from messaging._url import SUPPORTED_SCHEMES, parse_broker_url
from messaging.errors import (
    BacklogFull,
    BrokerUnavailable,
    MessagingError,
    MissingDependency,
    NotConnected,
)

__all__ = [
    "SUPPORTED_SCHEMES",
    "BacklogFull",
    "BrokerUnavailable",
    "Message",
    "MessagingError",
    "MissingDependency",
    "NotConnected",
    "Outgoing",
    "PubSub",
    "StartPosition",
    "Subscription",
    "connect",
]


def connect(
    url: str,
    *,
    connect_timeout: float = 10.0,
    kafka_idempotence: bool = True,
    kafka_partitions: int = 4,
) -> PubSub:
    """A `PubSub` for `url`, not yet connected: `async with` it (or `await .connect()`).

    URLs: `memory://[name]`, `kafka://host:port[,host:port]`, `gcp://PROJECT_ID`. Backend options
    go in the query string (see each backend's module docstring), e.g.
    `kafka://127.0.0.1:9092?session_timeout_ms=6000` or `gcp://my-project?ack_deadline_s=30`.
    An unknown scheme or option raises ValueError; a missing client library raises `MissingDependency`.
    """
    parsed = parse_broker_url(url)
    if parsed.scheme == "memory":
        from messaging.memory import MemoryPubSub

        return MemoryPubSub(parsed, connect_timeout=connect_timeout)
    if parsed.scheme == "kafka":
        from messaging.kafka import KafkaPubSub

        return KafkaPubSub(
            parsed,
            connect_timeout=connect_timeout,
            idempotence=kafka_idempotence,
            partitions=kafka_partitions,
        )
    from messaging.gcp import GooglePubSub

    return GooglePubSub(parsed, connect_timeout=connect_timeout)
