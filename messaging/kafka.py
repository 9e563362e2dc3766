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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
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
    from aiokafka.errors import (
        CommitFailedError,
        IllegalStateError,
        KafkaConnectionError,
        KafkaError,
        MessageSizeTooLargeError,
    )
except ImportError as missing:  # pragma: no cover - exercised by a test that hides aiokafka
    raise MissingDependency(
        f"kafka:// needs aiokafka ({missing}); install it with: pip install 'fmnist-service[kafka]'"
    ) from missing

logger = logging.getLogger(__name__)

_TOPIC_ALREADY_EXISTS = 36


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

    __slots__ = ("acked", "committable", "outstanding", "revoked", "tp")

    def __init__(self, tp: TopicPartition) -> None:
        self.tp = tp
        self.outstanding: deque[int] = deque()  # delivered offsets, ascending, not yet committable
        self.acked: set[int] = set()
        self.committable: int | None = None  # next offset to commit
        self.revoked = False

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
        )
        self._consumer = consumer
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
        logger.info(
            "event=kafka_assigned topic=%s group=%s partitions=%s",
            self.topic,
            self.group,
            sorted(tp.partition for tp in assigned),
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
        lost = [self._partitions.pop(tp) for tp in revoked if tp in self._partitions]
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
                logger.warning(
                    "event=kafka_fetch_failed topic=%s group=%s error=%r",
                    self.topic,
                    self.group,
                    exc,
                )
                await asyncio.sleep(0.5)
                continue
            for tp, records in batches.items():
                partition = self._partitions.get(tp)
                if partition is None:
                    continue  # revoked meanwhile: its new owner reads these records
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
        if not partition.revoked and partition.ack(message.offset):
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
                    if not p.revoked and p.committable is not None
                }
            )

    async def _commit(self, offsets: dict[TopicPartition, int]) -> None:
        if not offsets or self._consumer is None:
            return
        try:
            await self._consumer.commit(offsets)
        except (CommitFailedError, IllegalStateError, KafkaError) as exc:
            # The group moved on (rebalance): the new owner re-reads from the last commit; at-least-once.
            logger.warning(
                "event=kafka_commit_failed topic=%s group=%s error=%r", self.topic, self.group, exc
            )

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

    async def _connect(self) -> None:
        options = self.options
        self._producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap,
            client_id=options.client_id,
            acks="all",
            enable_idempotence=self.idempotence,
            linger_ms=options.linger_ms,
            max_batch_size=options.max_batch_bytes,
            max_request_size=options.max_message_bytes,
            request_timeout_ms=options.request_timeout_ms,
        )
        self._admin = AIOKafkaAdminClient(
            bootstrap_servers=self.bootstrap,
            client_id=options.client_id,
            request_timeout_ms=options.request_timeout_ms,
        )
        try:
            await self._admin.start()
            cluster = await self._admin.describe_cluster()
        except (KafkaError, OSError) as exc:
            raise BrokerUnavailable(
                f"could not reach Kafka at {self.url}: {exc}; check the address and that the broker is running"
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

    async def _close(self) -> None:
        if self._producer is not None:
            with contextlib.suppress(Exception):
                await self._producer.stop()
        if self._admin is not None:
            with contextlib.suppress(Exception):
                await self._admin.close()

    async def _publish(
        self, topic: str, data: bytes, key: str | None, attributes: Mapping[str, str] | None
    ) -> None:
        if topic not in self._known_topics:
            await self._ensure_topic_once(topic)
        producer = self._producer
        assert producer is not None
        try:
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
        except KafkaError as exc:
            raise BrokerUnavailable(
                f"publishing to {topic!r} on {self.url} failed: {exc!r}"
            ) from exc

    def _subscription(
        self, topic: str, *, group: str, start: StartPosition, max_in_flight: int
    ) -> Subscription:
        return KafkaSubscription(self, topic, group=group, start=start, max_in_flight=max_in_flight)

    async def _ensure_topics(self, topics: tuple[str, ...]) -> None:
        missing = [t for t in topics if t not in self._known_topics]
        if not missing:
            return
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
        for name, code, message in (tuple(error)[:3] for error in response.topic_errors):
            if code not in (0, _TOPIC_ALREADY_EXISTS):
                raise MessagingError(
                    f"Kafka at {self.url} refused to create topic {name!r}: error {code} {message}"
                )
        self._known_topics.update(missing)

    async def _ping(self) -> None:
        admin = self._admin
        assert admin is not None
        await admin.describe_cluster()
