"""Client tuning read from the kafka:// URL query."""

from __future__ import annotations

from dataclasses import dataclass, field

from messaging._url import BrokerURL, OptionReader
from messaging.kafka._security import KafkaSecurity


@dataclass(frozen=True)
class KafkaOptions:
    """Client tuning read from the URL query; the defaults suit production."""

    # Under load the producer batches anyway (one request in flight per broker while records queue
    # behind it), so lingering only delays each publish at light load.
    linger_ms: int = 0
    # aiokafka's default (16 KiB) is too small for a batch request's publishes, which then spin in
    # its accumulator (each waiter wakes on every drain); 1 MiB holds a whole 256-image batch
    # request, and bigger batches cost nothing when idle (docs/benchmarks.md has the figures).
    max_batch_bytes: int = 1024 * 1024
    max_message_bytes: int = 4 * 1024 * 1024
    request_timeout_ms: int = 30_000
    session_timeout_ms: int = 10_000
    heartbeat_interval_ms: int = 3_000
    max_poll_interval_ms: int = 300_000
    # Brokers that answer a waiting fetch late (Tansu does) add up to this to every hop at low load;
    # it applies while the topic is idle (no record for a second), so it bounds idle polling.
    fetch_max_wait_ms: int = 100
    # The fetch wait while records flow, so a broker that answers late (Tansu polls its log through
    # the wait) costs little per hop; an idle consumer goes back to fetch_max_wait_ms. 0 (or >=
    # fetch_max_wait_ms) keeps one wait: right for Apache Kafka, which answers when a record
    # arrives, so the short wait only adds empty fetches there.
    fetch_busy_wait_ms: int = 2
    rebalance_timeout_ms: int = 0  # 0: aiokafka's default (the session timeout)
    replication_factor: int = 0  # 0: min(3, number of brokers)
    client_id: str = "fmnist"
    # None: what the code that made the PubSub asked for (messaging.connect's kafka_* arguments).
    idempotence: bool | None = None
    partitions: int | None = None
    security: KafkaSecurity = field(default_factory=KafkaSecurity)

    @classmethod
    def from_url(cls, url: BrokerURL) -> KafkaOptions:
        read = OptionReader(url)
        options = cls(
            linger_ms=read.integer("linger_ms", cls.linger_ms),
            max_batch_bytes=read.integer("max_batch_bytes", cls.max_batch_bytes, minimum=1024),
            max_message_bytes=read.integer(
                "max_message_bytes", cls.max_message_bytes, minimum=1024
            ),
            request_timeout_ms=read.integer(
                "request_timeout_ms", cls.request_timeout_ms, minimum=100
            ),
            session_timeout_ms=read.integer(
                "session_timeout_ms", cls.session_timeout_ms, minimum=100
            ),
            heartbeat_interval_ms=read.integer(
                "heartbeat_interval_ms", cls.heartbeat_interval_ms, minimum=10
            ),
            max_poll_interval_ms=read.integer(
                "max_poll_interval_ms", cls.max_poll_interval_ms, minimum=100
            ),
            fetch_max_wait_ms=read.integer("fetch_max_wait_ms", cls.fetch_max_wait_ms),
            fetch_busy_wait_ms=read.integer("fetch_busy_wait_ms", cls.fetch_busy_wait_ms),
            rebalance_timeout_ms=read.integer("rebalance_timeout_ms", cls.rebalance_timeout_ms),
            replication_factor=read.integer("replication_factor", cls.replication_factor),
            client_id=read.text("client_id", cls.client_id) or cls.client_id,
            idempotence=_flag_or_none(read, "idempotence"),
            partitions=_integer_or_none(read, "partitions", minimum=1),
            security=KafkaSecurity.from_url(url, read),
        )
        read.finish()
        return options


def _flag_or_none(read: OptionReader, name: str) -> bool | None:
    """The option as a flag, or None when the URL does not set it."""
    present = name in read.pending
    value = read.flag(name, False)
    return value if present else None


def _integer_or_none(read: OptionReader, name: str, *, minimum: int) -> int | None:
    """The option as an integer, or None when the URL does not set it."""
    present = name in read.pending
    value = read.integer(name, minimum, minimum=minimum)
    return value if present else None


def _bootstrap(url: BrokerURL) -> list[str]:
    servers = [server.strip() for server in url.location.split(",") if server.strip()]
    if not servers:
        raise ValueError(
            f"kafka:// URL {url.redacted!r} names no broker; use kafka://host:port[,host:port]"
        )
    return servers
