"""One consumer of a group: fetching, acks, commits of the acked prefix, rebalances and seeks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError

from messaging._base import Message, StartPosition, Subscription
from messaging.errors import BrokerUnavailable

if TYPE_CHECKING:
    from messaging.kafka._pubsub import KafkaPubSub

logger = logging.getLogger("messaging.kafka")


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
        self._fetch_busy = False

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
            "has partitions, so it stands by. ?partitions= (%d here) only "
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
            self._pace_fetches(busy=bool(batches))
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

    def _pace_fetches(self, *, busy: bool) -> None:
        """Fetch with the short wait while records flow, with `fetch_max_wait_ms` once a fetch
        round came back empty for a whole `getmany` (a second): prompt hops under traffic on
        brokers that answer a waiting fetch late, few polls when idle."""
        options = self._kafka.options
        if (
            busy == self._fetch_busy
            or not 0 < options.fetch_busy_wait_ms < options.fetch_max_wait_ms
        ):
            return
        fetcher = getattr(self._consumer, "_fetcher", None)
        if fetcher is None or not hasattr(fetcher, "_fetch_max_wait_ms"):
            return  # an aiokafka without this attribute: keep its one wait
        self._fetch_busy = busy
        # aiokafka reads it for every fetch request it builds (0.14: Fetcher._fetch_max_wait_ms).
        fetcher._fetch_max_wait_ms = (
            options.fetch_busy_wait_ms if busy else options.fetch_max_wait_ms
        )

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
