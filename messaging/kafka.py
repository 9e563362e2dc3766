"""The `kafka://host:port[,host:port]` backend on aiokafka: consumer groups, commit-after-ack, keys and headers.

* Producer: `acks=all`, idempotent by default (`kafka_idempotence`; brokers that refuse
  `InitProducerId`, such as Tansu, need `FMNIST_KAFKA_IDEMPOTENCE=false`). `publish()` returns when
  the broker acknowledged the record; concurrent publishes share batches (`linger_ms`).
* Topics are created on first use (or by `ensure_topics`) with `kafka_partitions` partitions and
  `max.message.bytes = max_message_bytes`; the producer's request size and the consumer's fetch
  sizes are raised to the same bound, so 1 MB images fit by default.
* Consumer: one aiokafka consumer per subscription, auto-commit off. An offset is committed only
  when it and every earlier offset of its partition were acked (acks may come out of order); commits
  are coalesced in the background. On a rebalance the acked prefix of revoked partitions is
  committed and their unsettled messages are dropped locally: the partition's new owner gets them.
* A subscription started at a time (`start=<unix seconds>`) seeks every partition it is assigned,
  on every (re)assignment, to the first record whose timestamp is at or after that time
  (`offsets_for_times`), or to the end where no record is that new; the group's committed offsets
  are ignored for those partitions.
* `nack()` hands the message back to this subscription's own queue (it is delivered again soon);
  its offset stays uncommitted, so if this consumer dies first another member of the group gets it.

URL options: `linger_ms` (2), `max_batch_bytes` (1048576), `max_message_bytes` (4194304), `request_timeout_ms` (30000),
`session_timeout_ms` (10000), `heartbeat_interval_ms` (3000), `max_poll_interval_ms` (300000),
`rebalance_timeout_ms` (the session timeout), `fetch_max_wait_ms` (100),
`replication_factor` (min(3, brokers)), `client_id`.

Security (every client the backend makes gets it: producer, consumers, admin client):
`kafka://[user:password@]host:port?security_protocol=PLAINTEXT|SSL|SASL_PLAINTEXT|SASL_SSL`,
`ssl_cafile`, `ssl_certfile` + `ssl_keyfile` (a client certificate), `ssl_check_hostname` (true),
`sasl_mechanism=PLAIN|SCRAM-SHA-256|SCRAM-SHA-512`, `sasl_username` (or the URL's user),
`sasl_password_file` or `sasl_password_env` (or the URL's password, percent-encoded). Options that
do not fit together are refused when the PubSub is made, naming what to change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from messaging._base import Message, PubSub, StartPosition, Subscription
from messaging._url import BrokerURL, OptionReader
from messaging.errors import BrokerUnavailable, MessagingError, MissingDependency

try:
    from aiokafka import (
        AIOKafkaConsumer,
        AIOKafkaProducer,
        ConsumerRebalanceListener,
        TopicPartition,
    )
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.conn import CloseReason, create_conn
    from aiokafka.errors import (
        CommitFailedError,
        IllegalStateError,
        KafkaConnectionError,
        KafkaError,
        MessageSizeTooLargeError,
        UnsupportedSaslMechanismError,
    )
    from aiokafka.helpers import create_ssl_context
except ImportError as missing:  # pragma: no cover - exercised by a test that hides aiokafka
    raise MissingDependency(
        f"kafka:// needs aiokafka ({missing}); install it with: pip install 'fmnist-service[kafka]'"
    ) from missing

logger = logging.getLogger(__name__)

_TOPIC_ALREADY_EXISTS = 36
_RECOVERY_MAX_BACKOFF_S = 1.0
# aiokafka logs an ERROR per retry (every 100 ms per client) while a broker is away: let one line
# of each kind through per window, and say how many were held back.
_CLIENT_LOG_WINDOW_S = 30.0


class _RepeatedLineFilter(logging.Filter):
    """Lets the first record of each (logger, message template) through once per window."""

    def __init__(self, window_s: float) -> None:
        super().__init__()
        self.window_s = window_s
        self._seen: dict[tuple[str, object], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = (record.name, record.msg)
        now = time.monotonic()
        first, held = self._seen.get(key, (-self.window_s, 0))
        if now - first < self.window_s:
            self._seen[key] = (first, held + 1)
            return False
        self._seen[key] = (now, 0)
        if held:
            record.msg = (
                f"{record.msg} ({held} similar lines held back in the last {self.window_s:g} s)"
            )
        return True


_client_log_filter: _RepeatedLineFilter | None = None


def quiet_client_logs(window_s: float = _CLIENT_LOG_WINDOW_S) -> None:
    """Rate-limit aiokafka's repeated WARNING/ERROR lines (idempotent; called when connecting)."""
    global _client_log_filter
    if _client_log_filter is None:
        _client_log_filter = _RepeatedLineFilter(window_s)
    names = [name for name in logging.root.manager.loggerDict if name.startswith("aiokafka")]
    for name in ["aiokafka", *names]:
        client_logger = logging.getLogger(name)
        if _client_log_filter not in client_logger.filters:
            client_logger.addFilter(_client_log_filter)


SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


@dataclass(frozen=True)
class KafkaSecurity:
    """TLS and SASL for every client, read from the URL's userinfo and its `ssl_*` / `sasl_*` options."""

    protocol: str = "PLAINTEXT"
    ssl_context: ssl.SSLContext | None = field(default=None, repr=False, compare=False)
    ssl_certfile: str | None = None
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = field(default=None, repr=False)

    @property
    def uses_tls(self) -> bool:
        return self.protocol in ("SSL", "SASL_SSL")

    @property
    def uses_sasl(self) -> bool:
        return self.protocol in ("SASL_PLAINTEXT", "SASL_SSL")

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for AIOKafkaProducer, AIOKafkaConsumer and AIOKafkaAdminClient."""
        kwargs: dict[str, Any] = {"security_protocol": self.protocol}
        if self.ssl_context is not None:
            kwargs["ssl_context"] = self.ssl_context
        if self.sasl_mechanism is not None:
            kwargs.update(
                sasl_mechanism=self.sasl_mechanism,
                sasl_plain_username=self.sasl_username,
                sasl_plain_password=self.sasl_password,
            )
        return kwargs

    @classmethod
    def from_url(cls, url: BrokerURL, read: OptionReader) -> KafkaSecurity:
        """Read the security options; a missing or contradictory one is a ValueError saying what to set."""
        where = url.redacted
        protocol = read.choice("security_protocol", SECURITY_PROTOCOLS)
        cafile = _readable_file(read.text("ssl_cafile", None), "ssl_cafile", where)
        certfile = _readable_file(read.text("ssl_certfile", None), "ssl_certfile", where)
        keyfile = _readable_file(read.text("ssl_keyfile", None), "ssl_keyfile", where)
        check_hostname = read.flag("ssl_check_hostname", True)
        mechanism = read.choice("sasl_mechanism", SASL_MECHANISMS)
        username = _one_of(
            where,
            ("the URL's user name", url.username),
            ("sasl_username", read.text("sasl_username", None)),
        )
        password_file = read.text("sasl_password_file", None)
        password_env = read.text("sasl_password_env", None)
        password = _one_of(
            where,
            ("the URL's password", url.password),
            ("sasl_password_file", _read_secret_file(password_file, where)),
            ("sasl_password_env", _read_secret_env(password_env, where)),
        )
        tls_given = [
            name
            for name, value in (
                ("ssl_cafile", cafile),
                ("ssl_certfile", certfile),
                ("ssl_keyfile", keyfile),
                ("ssl_check_hostname", None if check_hostname else "false"),
            )
            if value is not None
        ]
        sasl_given = [
            name
            for name, value in (
                ("sasl_mechanism", mechanism),
                ("user name", username),
                ("password", password),
            )
            if value is not None
        ]
        if protocol is None:
            if tls_given or sasl_given:
                wanted = "SASL_SSL" if sasl_given else "SSL"
                raise ValueError(
                    f"kafka:// URL {where} sets {', '.join(tls_given + sasl_given)} but no "
                    f"security_protocol: add ?security_protocol={wanted} (or one of {', '.join(SECURITY_PROTOCOLS)})"
                )
            return cls()
        tls = protocol in ("SSL", "SASL_SSL")
        sasl = protocol in ("SASL_PLAINTEXT", "SASL_SSL")
        if tls_given and not tls:
            raise ValueError(
                f"kafka:// URL {where} sets {', '.join(tls_given)} with security_protocol={protocol}, "
                "which does not use TLS: use security_protocol=SSL or SASL_SSL, or drop the ssl_* options"
            )
        if sasl_given and not sasl:
            raise ValueError(
                f"kafka:// URL {where} sets SASL credentials ({', '.join(sasl_given)}) with "
                f"security_protocol={protocol}, which does not use SASL: use SASL_SSL or SASL_PLAINTEXT"
            )
        if sasl and mechanism is None:
            raise ValueError(
                f"kafka:// URL {where} uses security_protocol={protocol} without sasl_mechanism: "
                f"add ?sasl_mechanism= one of {', '.join(SASL_MECHANISMS)} (the one your provider names)"
            )
        if sasl and (not username or password is None):
            missing = "a user name" if not username else "a password"
            raise ValueError(
                f"kafka:// URL {where} uses SASL {mechanism} without {missing}: write "
                "kafka://USER:PASSWORD@host:port (percent-encoded), or give sasl_username= and "
                "sasl_password_file= or sasl_password_env="
            )
        if (certfile is None) != (keyfile is None):
            given, lacking = (
                ("ssl_certfile", "ssl_keyfile")
                if keyfile is None
                else ("ssl_keyfile", "ssl_certfile")
            )
            raise ValueError(
                f"kafka:// URL {where} sets {given} without {lacking}: a client certificate needs both"
            )
        context = None
        if tls:
            try:
                context = create_ssl_context(cafile=cafile, certfile=certfile, keyfile=keyfile)
            except (ssl.SSLError, OSError) as exc:
                raise ValueError(
                    f"kafka:// URL {where}: could not load the TLS files (ssl_cafile={cafile}, "
                    f"ssl_certfile={certfile}, ssl_keyfile={keyfile}): {exc}"
                ) from exc
            context.check_hostname = check_hostname
        return cls(
            protocol=protocol,
            ssl_context=context,
            ssl_certfile=certfile,
            sasl_mechanism=mechanism if sasl else None,
            sasl_username=username,
            sasl_password=password,
        )


def _readable_file(path: str | None, option: str, where: str) -> str | None:
    if path is not None and not os.access(path, os.R_OK):
        raise ValueError(f"kafka:// URL {where}: {option}={path} is not a readable file")
    return path


def _read_secret_file(path: str | None, where: str) -> str | None:
    if path is None:
        return None
    try:
        return Path(path).read_text().rstrip("\r\n")
    except OSError as exc:
        raise ValueError(
            f"kafka:// URL {where}: cannot read sasl_password_file={path}: {exc.strerror}"
        ) from None


def _read_secret_env(name: str | None, where: str) -> str | None:
    if name is None:
        return None
    value = os.environ.get(name)
    if value is None:
        raise ValueError(
            f"kafka:// URL {where}: sasl_password_env={name} names an environment variable that is not set"
        )
    return value


def _one_of(where: str, *sources: tuple[str, str | None]) -> str | None:
    """The one source that is given; two given at once is a ValueError naming them."""
    given = [(name, value) for name, value in sources if value is not None]
    if len(given) > 1:
        raise ValueError(
            f"kafka:// URL {where} gives {' and '.join(name for name, _ in given)}: keep one"
        )
    return given[0][1] if given else None


@dataclass(frozen=True)
class KafkaOptions:
    """Client tuning read from the URL query; the defaults suit production."""

    linger_ms: int = 2
    # aiokafka's default (16 KiB) holds ~16 requests of 1 KB per partition batch; concurrent
    # publishes beyond that spin in its accumulator (each waiter wakes on every drain). 1 MiB holds
    # a whole 256-image batch request: 996 -> 4,282 images/s through the batch endpoint (bench/batch.py).
    # Bigger batches cost nothing when idle.
    max_batch_bytes: int = 1024 * 1024
    max_message_bytes: int = 4 * 1024 * 1024
    request_timeout_ms: int = 30_000
    session_timeout_ms: int = 10_000
    heartbeat_interval_ms: int = 3_000
    max_poll_interval_ms: int = 300_000
    # Brokers that hold a fetch for the full wait (Tansu does) add this to every hop at low load.
    fetch_max_wait_ms: int = 100
    rebalance_timeout_ms: int = 0  # 0: aiokafka's default (the session timeout)
    replication_factor: int = 0  # 0: min(3, number of brokers)
    client_id: str = "fmnist"
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
            rebalance_timeout_ms=read.integer("rebalance_timeout_ms", cls.rebalance_timeout_ms),
            replication_factor=read.integer("replication_factor", cls.replication_factor),
            client_id=read.text("client_id", cls.client_id) or cls.client_id,
            security=KafkaSecurity.from_url(url, read),
        )
        read.finish()
        return options


def _bootstrap(url: BrokerURL) -> list[str]:
    servers = [server.strip() for server in url.location.split(",") if server.strip()]
    if not servers:
        raise ValueError(
            f"kafka:// URL {url.redacted!r} names no broker; use kafka://host:port[,host:port]"
        )
    return servers


class _PartitionAcks:
    """Delivered offsets of one assigned partition, to find the contiguous acked prefix to commit."""

    __slots__ = ("acked", "committable", "outstanding", "revoked", "stale", "tp")

    def __init__(self, tp: TopicPartition) -> None:
        self.tp = tp
        self.outstanding: deque[int] = deque()  # delivered offsets, ascending, not yet committable
        self.acked: set[int] = set()
        self.committable: int | None = None  # next offset to commit
        self.revoked = False
        # Fetched before the link to the broker broke: its offsets may name records of a log that
        # was wiped, so they are never committed; its messages still get handled (and nacks retried).
        self.stale = False

    def ack(self, offset: int) -> bool:
        """Record an ack; True if the committable position moved."""
        self.acked.add(offset)
        moved = False
        outstanding, acked = self.outstanding, self.acked
        while outstanding and outstanding[0] in acked:
            done = outstanding.popleft()
            acked.discard(done)
            self.committable = done + 1
            moved = True
        return moved


class KafkaMessage(Message):
    __slots__ = ("_partition", "_subscription", "offset")

    def __init__(
        self,
        topic: str,
        data: bytes,
        key: str | None,
        attributes: dict[str, str],
        offset: int,
        partition: _PartitionAcks,
        subscription: KafkaSubscription,
    ) -> None:
        super().__init__(topic, data, key, attributes)
        self.offset = offset
        self._partition = partition
        self._subscription = subscription

    def _settle(self, *, acked: bool) -> None:
        self._subscription._settle(self, acked=acked)


class _RebalanceHook(ConsumerRebalanceListener):
    def __init__(self, subscription: KafkaSubscription) -> None:
        self._subscription = subscription

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self._subscription._partitions_revoked(list(revoked))

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        await self._subscription._partitions_assigned(list(assigned))


class KafkaSubscription(Subscription):
    """One aiokafka consumer in a consumer group, with ack tracking and background commits."""

    def __init__(
        self,
        pubsub: KafkaPubSub,
        topic: str,
        *,
        group: str,
        start: StartPosition,
        max_in_flight: int,
    ) -> None:
        super().__init__(pubsub, topic, group=group, start=start, max_in_flight=max_in_flight)
        self._kafka = pubsub
        self._consumer: AIOKafkaConsumer | None = None
        self._partitions: dict[TopicPartition, _PartitionAcks] = {}
        self._ready: deque[KafkaMessage] = deque()  # fetched or nacked, not yet handed out
        self._in_flight = 0
        self._receiver: asyncio.Future[None] | None = None
        self._pump_room: asyncio.Future[None] | None = None
        self._pump_task: asyncio.Task[None] | None = None
        self._to_commit: set[_PartitionAcks] = set()
        self._commit_task: asyncio.Task[None] | None = None
        self._assigned = asyncio.Event()
        self._rejoining = False  # the link broke; healthy again once the group assigned us anew
        self._fetch_failing = False
        self._warned_idle = False

    @property
    def healthy(self) -> bool:
        return not self._closed and not self._rejoining

    async def _open(self) -> None:
        pubsub, options = self._kafka, self._kafka.options
        await pubsub._ensure_topic_once(self.topic)
        consumer = AIOKafkaConsumer(
            bootstrap_servers=pubsub.bootstrap,
            group_id=self.group,
            client_id=options.client_id,
            enable_auto_commit=False,
            auto_offset_reset=self.start_position
            if isinstance(self.start_position, str)
            else "latest",
            max_partition_fetch_bytes=options.max_message_bytes,
            fetch_max_bytes=max(options.max_message_bytes, 50 * 1024 * 1024),
            session_timeout_ms=options.session_timeout_ms,
            heartbeat_interval_ms=options.heartbeat_interval_ms,
            max_poll_interval_ms=options.max_poll_interval_ms,
            rebalance_timeout_ms=options.rebalance_timeout_ms or None,
            fetch_max_wait_ms=options.fetch_max_wait_ms,
            request_timeout_ms=options.request_timeout_ms,
            **options.security.client_kwargs(),
        )
        self._consumer = consumer
        pubsub._watch(consumer._client)
        try:
            await asyncio.wait_for(consumer.start(), pubsub.connect_timeout)
        except (KafkaError, OSError, TimeoutError) as exc:
            raise BrokerUnavailable(
                f"could not start a Kafka consumer on {pubsub.url}: {exc!r}"
            ) from exc
        consumer.subscribe([self.topic], listener=_RebalanceHook(self))
        # Wait until the group gave us partitions and their start positions are resolved, so that a
        # publish after `start()` is seen even with start="latest". A member beyond the partition
        # count gets none: it then stands by, as Kafka consumers do.
        try:
            await asyncio.wait_for(self._assigned.wait(), pubsub.connect_timeout)
        except TimeoutError:
            logger.info(
                "event=kafka_standby topic=%s group=%s waited_s=%s reason=%s",
                self.topic,
                self.group,
                pubsub.connect_timeout,
                "no partition assigned (more consumers than partitions?)",
            )
        for tp in list(consumer.assignment()):
            with contextlib.suppress(IllegalStateError):
                await consumer.position(tp)
        self._pump_task = asyncio.create_task(
            self._pump(), name=f"kafka-fetch-{self.topic}-{self.group}"
        )
        # A receiver waiting for messages must learn that the fetch loop ended.
        self._pump_task.add_done_callback(lambda _: self._wake_receiver())

    async def _partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        for tp in assigned:
            self._partitions[tp] = _PartitionAcks(tp)
        if assigned and isinstance(self.start_position, float):
            try:
                await self._seek_to_time(assigned, self.start_position)
            except KafkaError as exc:  # aiokafka would swallow it: say what it means
                logger.warning(
                    "event=kafka_seek_failed topic=%s group=%s error=%r effect=%s",
                    self.topic,
                    self.group,
                    exc,
                    "the partitions start at the group's committed offsets",
                )
        if assigned:
            self._assigned.set()
        elif not self._warned_idle:
            self._warned_idle = True
            self._warn_no_partition()
        self._rejoining = False
        logger.info(
            "event=kafka_assigned topic=%s group=%s partitions=%s",
            self.topic,
            self.group,
            sorted(tp.partition for tp in assigned),
        )

    def _warn_no_partition(self) -> None:
        consumer = self._consumer
        known = consumer.partitions_for_topic(self.topic) if consumer is not None else None
        count = len(known) if known else "unknown"
        logger.warning(
            "event=kafka_no_partition topic=%s group=%s topic_partitions=%s "
            'hint="this consumer got no partition of %s: its group has more members than the topic '
            "has partitions, so it stands by. FMNIST_KAFKA_PARTITIONS (kafka_partitions=%d here) only "
            "applies when a topic is created; add partitions to an existing topic with "
            'kafka-topics.sh --bootstrap-server HOST:PORT --alter --topic %s --partitions N"',
            self.topic,
            self.group,
            count,
            self.topic,
            self._kafka.partitions,
            self.topic,
        )

    async def _seek_to_time(self, assigned: list[TopicPartition], since: float) -> None:
        """Position each partition at its first record at or after `since` (unix seconds), else at its end."""
        consumer = self._consumer
        assert consumer is not None
        since_ms = int(since * 1000)
        found = await consumer.offsets_for_times({tp: since_ms for tp in assigned})
        at_end = []
        for tp in assigned:
            hit = found.get(tp)
            # Kafka answers "no such record" as None; Tansu as offset 0 with timestamp -1.
            if hit is None or hit.timestamp < since_ms:
                at_end.append(tp)
            else:
                consumer.seek(tp, hit.offset)
        if at_end:
            await consumer.seek_to_end(*at_end)
        logger.info(
            "event=kafka_seek_to_time topic=%s group=%s since=%.3f partitions=%s at_end=%s",
            self.topic,
            self.group,
            since,
            sorted(tp.partition for tp in assigned),
            sorted(tp.partition for tp in at_end),
        )

    async def _partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        gone = [self._partitions.pop(tp) for tp in revoked if tp in self._partitions]
        # A stale partition's messages stay queued here: the log that held them may be gone.
        lost = [partition for partition in gone if not partition.stale]
        for partition in lost:
            partition.revoked = True
        if lost:
            self._ready = deque(m for m in self._ready if not m._partition.revoked)
            await self._commit({p.tp: p.committable for p in lost if p.committable is not None})

    async def _pump(self) -> None:
        """Fetch records while the subscription has room for more unsettled messages."""
        consumer = self._consumer
        assert consumer is not None
        while not self._closed:
            room = self.max_in_flight - self._in_flight - len(self._ready)
            if room <= 0:
                self._pump_room = asyncio.get_running_loop().create_future()
                await self._pump_room
                continue
            try:
                batches = await consumer.getmany(timeout_ms=1000, max_records=room)
            except KafkaError as exc:
                if not self._fetch_failing:  # one line per outage, not one per retry
                    logger.warning(
                        "event=kafka_fetch_failed topic=%s group=%s error=%r",
                        self.topic,
                        self.group,
                        exc,
                    )
                self._fetch_failing = True
                await asyncio.sleep(0.5)
                continue
            self._fetch_failing = False
            for tp, records in batches.items():
                partition = self._partitions.get(tp)
                if partition is None:
                    continue  # revoked meanwhile: its new owner reads these records
                if partition.stale:
                    partition = self._partitions[tp] = _PartitionAcks(tp)
                for record in records:
                    partition.outstanding.append(record.offset)
                    self._ready.append(
                        KafkaMessage(
                            record.topic,
                            record.value if record.value is not None else b"",
                            record.key.decode("utf-8", "replace")
                            if record.key is not None
                            else None,
                            {
                                name: value.decode("utf-8", "replace")
                                for name, value in record.headers
                            },
                            record.offset,
                            partition,
                            self,
                        )
                    )
            if self._ready:
                self._wake_receiver()

    def _wake_receiver(self) -> None:
        receiver = self._receiver
        if receiver is not None and not receiver.done():
            receiver.set_result(None)

    def _wake_pump(self) -> None:
        room = self._pump_room
        if room is not None and not room.done():
            room.set_result(None)

    async def _wait_for_messages(self) -> None:
        pump = self._pump_task
        if pump is not None and pump.done() and not self._ready:
            reason = "cancelled" if pump.cancelled() else repr(pump.exception())
            raise BrokerUnavailable(
                f"the Kafka consumer for {self.topic}/{self.group} on {self._kafka.url} stopped: {reason}"
            )
        self._receiver = asyncio.get_running_loop().create_future()
        try:
            await self._receiver
        finally:
            self._receiver = None

    def _receive_ready(self) -> Message | None:
        while not self._closed and self._ready and self._in_flight < self.max_in_flight:
            message = self._ready.popleft()
            if message._partition.revoked:
                continue
            self._in_flight += 1
            return message
        return None

    def _settle(self, message: KafkaMessage, *, acked: bool) -> None:
        self._in_flight -= 1
        partition = message._partition
        if not acked:
            if not partition.revoked and not self._closed:
                message._settled = False
                self._ready.appendleft(message)
            self._wake_receiver()
            return
        if not partition.revoked and not partition.stale and partition.ack(message.offset):
            self._to_commit.add(partition)
            if self._commit_task is None or self._commit_task.done():
                self._commit_task = asyncio.create_task(self._commit_acked())
        self._wake_receiver()
        self._wake_pump()

    async def _commit_acked(self) -> None:
        """Commit acked prefixes until none is left; acks made during a commit join the next one."""
        while self._to_commit:
            partitions, self._to_commit = self._to_commit, set()
            await self._commit(
                {
                    p.tp: p.committable
                    for p in partitions
                    if not p.revoked and not p.stale and p.committable is not None
                }
            )

    async def _commit(self, offsets: dict[TopicPartition, int]) -> None:
        if not offsets or self._consumer is None:
            return
        try:
            # aiokafka retries a commit for a topic the broker no longer has without end: bound it.
            await asyncio.wait_for(self._consumer.commit(offsets), self._kafka.connect_timeout)
        except (CommitFailedError, IllegalStateError, KafkaError, TimeoutError) as exc:
            # The group moved on (rebalance): the new owner re-reads from the last commit; at-least-once.
            logger.warning(
                "event=kafka_commit_failed topic=%s group=%s error=%r", self.topic, self.group, exc
            )

    def _link_broken(self) -> None:
        """The connection to the broker broke: what was fetched so far must not be committed."""
        for partition in self._partitions.values():
            partition.stale = True
        self._rejoining = True

    def _link_restored(self) -> None:
        """The broker answers again with our topics in place: join the group anew (a broker that
        lost its memory no longer knows this member), so that partitions are assigned afresh."""
        consumer = self._consumer
        if consumer is None or self._closed:
            return
        consumer.unsubscribe()
        consumer.subscribe([self.topic], listener=_RebalanceHook(self))

    async def _shutdown(self) -> None:
        self._wake_receiver()
        self._wake_pump()
        for task in (self._pump_task,):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._commit_task is not None and not self._commit_task.done():
            with contextlib.suppress(Exception):
                await self._commit_task
        await self._commit_acked()
        self._ready.clear()
        if self._consumer is not None:
            try:
                await self._consumer.stop()  # leaves the group: unsettled messages go to the others
            except KafkaError as exc:
                logger.warning(
                    "event=kafka_consumer_stop_failed topic=%s error=%r", self.topic, exc
                )


class KafkaPubSub(PubSub):
    """`kafka://host:port[,host:port]` through aiokafka."""

    def __init__(
        self,
        url: BrokerURL,
        *,
        connect_timeout: float = 10.0,
        idempotence: bool = True,
        partitions: int = 4,
    ) -> None:
        super().__init__(url, connect_timeout=connect_timeout)
        if partitions < 1:
            raise ValueError(f"kafka_partitions must be >= 1, got {partitions}")
        self.bootstrap = _bootstrap(url)
        self.options = KafkaOptions.from_url(url)
        self.idempotence = idempotence
        self.partitions = partitions
        self._producer: AIOKafkaProducer | None = None
        self._admin: AIOKafkaAdminClient | None = None
        self._replication_factor = 1
        # Every topic this client created or checked: re-created when the broker comes back without them.
        self._wanted_topics: set[str] = set()
        self._link_ready = asyncio.Event()
        self._recovery: asyncio.Task[None] | None = None
        self._retiring: set[asyncio.Task[None]] = set()
        self._link_lost_at = 0.0

    @property
    def link_up(self) -> bool:
        return self.connected and self._link_ready.is_set()

    def _new_producer(self) -> AIOKafkaProducer:
        options = self.options
        producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap,
            client_id=options.client_id,
            acks="all",
            enable_idempotence=self.idempotence,
            linger_ms=options.linger_ms,
            max_batch_size=options.max_batch_bytes,
            max_request_size=options.max_message_bytes,
            request_timeout_ms=options.request_timeout_ms,
            **options.security.client_kwargs(),
        )
        self._watch(producer.client)
        return producer

    def _watch(self, client: Any) -> None:
        """Hear of every broken connection of an aiokafka client (before it connects anywhere)."""
        closed: Callable[[Any, Any], None] = client._on_connection_closed

        def on_connection_closed(conn: Any, reason: Any) -> None:
            closed(conn, reason)
            if reason not in (CloseReason.SHUTDOWN, CloseReason.IDLE_DROP):
                self._link_broken(reason)

        client._on_connection_closed = on_connection_closed

    def _link_broken(self, reason: object) -> None:
        """A connection broke: the broker may come back empty (a restart of an in-memory broker, a
        replaced cluster), so nothing may be published until our topics are checked on it again.

        The producer is replaced: the old one would retry its unacknowledged records into whatever
        answers next, where an emptied broker acknowledges records for a topic it does not have and
        loses them. Its pending publishes fail (`BrokerUnavailable`) instead.
        """
        if self._state != "connected":
            return
        if self._link_ready.is_set():
            self._link_lost_at = time.monotonic()
            logger.warning(
                "event=kafka_link_lost broker=%s reason=%s",
                self.url,
                getattr(reason, "name", reason),
            )
        self._link_ready.clear()
        self._known_topics.clear()
        for subscription in self._subscriptions:
            if isinstance(subscription, KafkaSubscription):
                subscription._link_broken()
        old, self._producer = self._producer, None
        if old is not None:
            task = asyncio.get_running_loop().create_task(_retire_producer(old))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
        if self._recovery is None or self._recovery.done():
            self._recovery = asyncio.get_running_loop().create_task(
                self._recover(), name=f"kafka-recover-{self.url}"
            )

    async def _recover(self) -> None:
        """Until the broker answers: re-create the topics it lost, start a fresh producer, rejoin the
        groups. Logs once when the broker is unreachable, once per re-creation, once when back."""
        backoff = 0.1
        unreachable = False
        while self._state == "connected":
            try:
                async with asyncio.timeout(self.connect_timeout):
                    created = await self._create_topics(sorted(self._wanted_topics))
                    if self._producer is None:
                        producer = self._new_producer()
                        try:
                            await producer.start()
                        except BaseException:
                            await _retire_producer(producer)
                            raise
                        self._producer = producer
            except (KafkaError, OSError, TimeoutError, MessagingError) as exc:
                if not unreachable:
                    unreachable = True
                    logger.warning(
                        "event=kafka_broker_down broker=%s error=%r retry=until_reachable",
                        self.url,
                        exc,
                    )
                await asyncio.sleep(backoff)
                backoff = min(2 * backoff, _RECOVERY_MAX_BACKOFF_S)
                continue
            if created:
                logger.warning(
                    "event=kafka_topics_recreated broker=%s topics=%s reason=%s",
                    self.url,
                    ",".join(created),
                    "the broker came back without them",
                )
            for subscription in list(self._subscriptions):
                if isinstance(subscription, KafkaSubscription):
                    subscription._link_restored()
            self._link_ready.set()
            logger.warning(
                "event=kafka_link_restored broker=%s down_s=%.1f",
                self.url,
                time.monotonic() - self._link_lost_at,
            )
            return

    async def _connect(self) -> None:
        options = self.options
        quiet_client_logs()
        self._producer = self._new_producer()
        self._admin = AIOKafkaAdminClient(
            bootstrap_servers=self.bootstrap,
            client_id=options.client_id,
            request_timeout_ms=options.request_timeout_ms,
            **options.security.client_kwargs(),
        )
        self._watch(self._admin._client)
        try:
            await self._admin.start()
            cluster = await self._admin.describe_cluster()
        except (
            Exception
        ) as exc:  # a failed SCRAM exchange surfaces as whatever aiokafka's parser raised
            if options.security.protocol == "PLAINTEXT" and isinstance(exc, (KafkaError, OSError)):
                raise BrokerUnavailable(
                    f"could not reach Kafka at {self.url}: {exc}; check the address and that the broker is running"
                ) from exc
            raise BrokerUnavailable(
                f"could not reach Kafka at {self.url}: {await self._diagnose(exc)}"
            ) from exc
        brokers = len(cluster.get("brokers", [])) or 1
        self._replication_factor = options.replication_factor or min(3, brokers)
        try:
            await self._producer.start()
        except KafkaConnectionError as exc:
            raise BrokerUnavailable(f"could not reach Kafka at {self.url}: {exc}") from exc
        except KafkaError as exc:
            if self.idempotence:
                raise BrokerUnavailable(
                    f"the Kafka broker at {self.url} refused the idempotent producer (InitProducerId: {exc!r}); "
                    "set FMNIST_KAFKA_IDEMPOTENCE=false (kafka_idempotence=False) for brokers without it, such as Tansu"
                ) from exc
            raise BrokerUnavailable(
                f"could not start a Kafka producer on {self.url}: {exc!r}"
            ) from exc
        self._link_ready.set()

    async def _diagnose(self, failure: BaseException) -> str:
        """Why a secured connection failed, from one direct connection to the first bootstrap server.

        aiokafka's bootstrap reports only "Unable to bootstrap", hiding a refused certificate or
        a failed login, which are what the user needs to act on.
        """
        security = self.options.security
        host, _, port = self.bootstrap[0].rpartition(":")
        try:
            conn = await create_conn(
                host,
                int(port),
                client_id=self.options.client_id,
                request_timeout_ms=self.options.request_timeout_ms,
                **security.client_kwargs(),
            )
        except ssl.SSLCertVerificationError as exc:
            return (
                f"TLS: the broker's certificate was refused ({exc.verify_message}); check ssl_cafile "
                "(the CA that signed the broker's certificate) and that the host name matches the "
                "certificate (ssl_check_hostname=false skips that check)"
            )
        except ssl.SSLError as exc:
            return (
                f"TLS handshake failed ({exc.reason or exc}); check that the port speaks TLS and, if "
                "the broker asks for a client certificate, ssl_certfile and ssl_keyfile"
            )
        except UnsupportedSaslMechanismError as exc:
            return f"the broker does not offer SASL {security.sasl_mechanism}: {exc}; set sasl_mechanism to one it offers"
        except (OSError, TimeoutError) as exc:
            return f"{exc!r}; check the address and that the broker is running"
        except Exception as exc:
            # Brokers refuse a login or a missing client certificate by closing the connection,
            # so the cause is one of those the configuration leaves possible.
            causes = []
            if security.uses_sasl:
                causes.append(
                    f"SASL {security.sasl_mechanism} login as {security.sasl_username!r} failed "
                    f"({exc!r}): check the user name, the password and the mechanism"
                )
            if security.uses_tls and security.ssl_certfile is None:
                causes.append(
                    f"the broker closed the connection after the TLS handshake ({exc!r}): if it "
                    "requires a client certificate, set ssl_certfile and ssl_keyfile"
                )
            return "; or ".join(causes) or repr(exc)
        conn.close()
        return f"{failure!r}"

    async def _close(self) -> None:
        self._link_ready.clear()
        for task in (self._recovery, *self._retiring):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self._producer is not None:
            with contextlib.suppress(Exception):
                await self._producer.stop()
        if self._admin is not None:
            with contextlib.suppress(Exception):
                await self._admin.close()

    async def _publish(
        self, topic: str, data: bytes, key: str | None, attributes: Mapping[str, str] | None
    ) -> None:
        if not self._link_ready.is_set():
            try:
                await asyncio.wait_for(self._link_ready.wait(), self.connect_timeout)
            except TimeoutError:
                raise BrokerUnavailable(
                    f"the link to {self.url} is down (reconnecting) after {self.connect_timeout:g} s"
                ) from None
        if topic not in self._known_topics:
            await self._ensure_topic_once(topic)
        producer = self._producer
        if producer is None:  # the link broke again meanwhile
            raise BrokerUnavailable(f"the link to {self.url} broke; retry once it is back")
        try:
            if producer.client.cluster.partitions_for_topic(topic) is None:
                # send() would wait for the topic's metadata up to request_timeout_ms, and for
                # ever once the link broke and this producer was retired.
                await asyncio.wait_for(producer.partitions_for(topic), self.connect_timeout)
            delivery = await producer.send(
                topic,
                data,
                key=key.encode() if key is not None else None,
                headers=[(name, value.encode()) for name, value in attributes.items()]
                if attributes
                else None,
            )
            await delivery
        except MessageSizeTooLargeError as exc:
            raise MessagingError(
                f"a message of {len(data)} bytes does not fit Kafka's limit on {self.url}: raise "
                f"?max_message_bytes= (now {self.options.max_message_bytes}) in the broker URL, and the broker's message.max.bytes"
            ) from exc
        except (KafkaError, TimeoutError) as exc:
            raise BrokerUnavailable(
                f"publishing to {topic!r} on {self.url} failed: {exc!r}"
            ) from exc

    def _subscription(
        self, topic: str, *, group: str, start: StartPosition, max_in_flight: int
    ) -> Subscription:
        return KafkaSubscription(self, topic, group=group, start=start, max_in_flight=max_in_flight)

    async def _ensure_topics(self, topics: tuple[str, ...]) -> None:
        await self._create_topics([t for t in topics if t not in self._known_topics])

    async def _create_topics(self, missing: list[str]) -> list[str]:
        """Create `missing` where absent; the names this call created (not those that existed)."""
        if not missing:
            return []
        admin = self._admin
        assert admin is not None
        new_topics = [
            NewTopic(
                topic,
                num_partitions=self.partitions,
                replication_factor=self._replication_factor,
                topic_configs={"max.message.bytes": str(self.options.max_message_bytes)},
            )
            for topic in missing
        ]
        try:
            response: Any = await admin.create_topics(new_topics)
        except KafkaError as exc:
            raise BrokerUnavailable(
                f"could not create topics {missing} on {self.url}: {exc!r}"
            ) from exc
        created: list[str] = []
        existing: list[str] = []
        for name, code, message in (tuple(error)[:3] for error in response.topic_errors):
            if code == _TOPIC_ALREADY_EXISTS:
                existing.append(name)
            elif code != 0:
                raise MessagingError(
                    f"Kafka at {self.url} refused to create topic {name!r}: error {code} {message}"
                )
            if code == 0:
                created.append(name)
        self._known_topics.update(missing)
        self._wanted_topics.update(missing)
        if existing:
            await self._warn_fewer_partitions(existing)
        return created

    async def _warn_fewer_partitions(self, topics: list[str]) -> None:
        """Warn about existing topics with fewer partitions than `kafka_partitions` asks for."""
        admin = self._admin
        assert admin is not None
        try:
            described = await admin.describe_topics(topics)
        except KafkaError as exc:
            logger.info("event=kafka_describe_topics_failed topics=%s error=%r", topics, exc)
            return
        for topic in described:
            count = len(topic.get("partitions") or ())
            if 0 < count < self.partitions:
                logger.warning(
                    "event=kafka_topic_has_fewer_partitions topic=%s topic_partitions=%d "
                    'kafka_partitions=%d hint="FMNIST_KAFKA_PARTITIONS does not change an existing '
                    "topic, so at most %d workers of a group get work; add partitions with "
                    'kafka-topics.sh --bootstrap-server HOST:PORT --alter --topic %s --partitions %d"',
                    topic.get("topic"),
                    count,
                    self.partitions,
                    count,
                    topic.get("topic"),
                    self.partitions,
                )

    async def _ping(self) -> None:
        admin = self._admin
        assert admin is not None
        await admin.describe_cluster()


async def _retire_producer(producer: AIOKafkaProducer) -> None:
    """Stop `producer` without letting it deliver what it still holds: its pending sends fail."""
    # aiokafka's stop() first flushes, which would retry into a broker that may have lost the topic;
    # so this reaches into the producer (aiokafka 0.14) and fails its batches itself.
    with contextlib.suppress(Exception):
        producer._closed = True
        sender = producer._sender
        if sender is not None and sender.sender_task is not None:
            await sender.close()
        accumulator = producer._message_accumulator
        batches = [*accumulator._pending_batches]
        for queued in accumulator._batches.values():
            batches.extend(queued)
        error = KafkaConnectionError(
            "the connection to the broker broke before the record was acknowledged"
        )
        for batch in batches:
            batch.failure(error)
            # Mark them seen: a publish that gave up waiting must not leave a warning behind.
            for future in (batch.future, batch._drain_waiter, *(f for f, _ in batch._msg_futures)):
                if future.done() and not future.cancelled():
                    future.exception()
        await producer.client.close()
