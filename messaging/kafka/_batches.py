"""Records appended straight into an aiokafka producer's batches, one acknowledgement per batch: what
`KafkaPubSub.publish_many` hands the producer instead of a `send` per record (aiokafka 0.14's
accumulator, `_batches` and `_append_batch`, as its own `send_batch` uses them)."""

from __future__ import annotations

import asyncio
import copy
import random
import time
from typing import Any, NamedTuple

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaTimeoutError, ProducerClosed
from aiokafka.structs import TopicPartition

from messaging._base import Outgoing
from messaging.kafka._options import KafkaOptions
from messaging.kafka._partitioner import Murmur2Partitioner

# One publish_many's keyless records move to another partition after this many payload bytes
# (KIP-794: the Java client moves after batch.size, 16 KiB by default), so that a big burst still
# spreads over the partitions, and over the workers reading them, in runs of a few passes' worth.
STICKY_RUN_BYTES = 64 * 1024


class Delivery(NamedTuple):
    """Records handed to the producer together: their positions in the call, their payload bytes
    (for the error of a record too big) and the acknowledgement they share."""

    indexes: list[int]
    size: int
    acked: asyncio.Future[Any]


class BatchAppender:
    """The batching half of `KafkaPubSub.publish_many`: records by partition, appended to the
    partition's open batch, each batch's acknowledgement collected as a `Delivery`."""

    options: KafkaOptions
    _partitioner: Murmur2Partitioner
    _sticky: dict[str, int]  # topic -> the partition its keyless records go to now

    def _by_partition(
        self, producer: AIOKafkaProducer, topic: str, checked: list[tuple[int, Outgoing]]
    ) -> tuple[list[tuple[int, Outgoing]], dict[int, list[tuple[int, Outgoing]]]]:
        """The records to send alone (too big to share a batch), and the others by partition:
        murmur2 of the key over the topic's partitions as `send` chooses, and the topic's sticky
        partition for records without a key (`_sticky_partition`)."""
        cluster = producer.client.cluster
        all_partitions = list(cluster.partitions_for_topic(topic) or ())
        available = list(cluster.available_partitions_for_topic(topic) or ())
        # Room for the record's framing and headers under the batch's size bound.
        shared_limit = self.options.max_batch_bytes // 2
        alone = [record for record in checked if len(record[1].data) > shared_limit]
        shared = [record for record in checked if len(record[1].data) <= shared_limit]
        keys = [message.key.encode() if message.key else None for _, message in shared]
        keyed = any(key is not None for key in keys)
        # Keyless positions are filled below; only keyed records need the partitioner.
        partitions = (
            self._partitioner.partitions(keys, all_partitions, available)
            if keyed
            else [0] * len(keys)
        )
        if None in keys:
            sticky = self._sticky_partition(producer, topic, all_partitions, available)
            run = 0  # payload bytes of this call given to the sticky partition so far
            for position, (key, (_, message)) in enumerate(zip(keys, shared, strict=True)):
                if key is not None:
                    continue
                if run and run + len(message.data) > STICKY_RUN_BYTES:
                    sticky, run = self._move_sticky(topic, available or all_partitions), 0
                partitions[position] = sticky
                run += len(message.data)
        by_partition: dict[int, list[tuple[int, Outgoing]]] = {}
        for record, partition in zip(shared, partitions, strict=True):
            by_partition.setdefault(partition, []).append(record)
        return alone, by_partition

    def _sticky_partition(
        self,
        producer: AIOKafkaProducer,
        topic: str,
        all_partitions: list[int],
        available: list[int],
    ) -> int:
        """The partition for `topic`'s records without a key, as the Java client chooses it since
        Kafka 2.4 (KIP-480, the sticky partitioner): the same one while its batch waits for the
        sender, so that keyless records published meanwhile share one batch and one request rather
        than one batch per partition; another one at random once that batch went out."""
        current = self._sticky.get(topic)
        pool = available or all_partitions
        if current in pool:
            queued = producer._message_accumulator._batches.get(TopicPartition(topic, current))
            if queued:
                return current
        return self._move_sticky(topic, pool)

    def _move_sticky(self, topic: str, pool: list[int]) -> int:
        """Another partition of `pool` at random becomes `topic`'s sticky one."""
        current = self._sticky.get(topic)
        others = [partition for partition in pool if partition != current] or pool
        chosen = random.choice(others)
        self._sticky[topic] = chosen
        return chosen

    async def _send_batches(
        self,
        producer: AIOKafkaProducer,
        topic: str,
        partition: int,
        records: list[tuple[int, Outgoing]],
        deliveries: list[Delivery],
    ) -> None:
        """Append `records` to the partition's open batch in the producer, as `send` does (so that
        concurrent publishes share batches and requests), opening the next batch when one is full;
        each batch's acknowledgement joins `deliveries` with the positions of its records here.

        Records go into the batch itself, without the future, coroutine and metadata `send` makes
        for each (aiokafka 0.14's accumulator: `_batches`, `_append_batch`, as `send_batch` uses)."""
        accumulator = producer._message_accumulator
        if accumulator._exception is not None:
            raise copy.copy(accumulator._exception)
        tp = TopicPartition(topic, partition)
        queued = None if producer._closed else accumulator._batches.get(tp)
        batch = queued[-1] if queued else None
        indexes: list[int] = []
        size = 0
        for index, message in records:
            key = message.key.encode() if message.key else None
            attributes = message.attributes
            headers = (
                [(name, value.encode()) for name, value in attributes.items()] if attributes else []
            )
            while (
                batch is None
                or batch._builder.append(
                    timestamp=None, key=key, value=message.data, headers=headers
                )
                is None
            ):
                if batch is not None:  # full: its records are handed over, the next batch opens
                    if indexes:
                        deliveries.append(Delivery(indexes, size, asyncio.shield(batch.future)))
                        indexes, size = [], 0
                    # At most one batch per partition waits for the sender, as with `send`.
                    await self._drained(batch)
                batch = self._open_batch(producer, tp)
            indexes.append(index)
            size += len(message.data)
        if indexes and batch is not None:
            deliveries.append(Delivery(indexes, size, asyncio.shield(batch.future)))

    @staticmethod
    def _open_batch(producer: AIOKafkaProducer, tp: TopicPartition) -> Any:
        """A new batch queued for `tp` in the producer (the sender takes it when it is ready);
        ProducerClosed once the producer is closed or retired, whose sender would never take it."""
        accumulator = producer._message_accumulator
        if accumulator._closed or producer._closed:
            raise ProducerClosed()
        return accumulator._append_batch(producer.create_batch(), tp)

    async def _drained(self, batch: Any) -> None:
        """Wait until the sender took `batch`; KafkaTimeoutError after `request_timeout_ms`."""
        deadline = time.monotonic() + self.options.request_timeout_ms / 1000
        while not batch._drain_waiter.done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise KafkaTimeoutError()
            await batch.wait_drain(remaining)
