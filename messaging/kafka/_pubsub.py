"""`KafkaPubSub`: producer, admin client, topics, and recovery after the broker comes back empty."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.conn import CloseReason, create_conn
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaError,
    MessageSizeTooLargeError,
    UnsupportedSaslMechanismError,
)

from messaging._base import (
    Outgoing,
    OutgoingItem,
    PubSub,
    StartPosition,
    Subscription,
    _outgoing,
)
from messaging._url import BrokerURL
from messaging.errors import BrokerUnavailable, MessagingError
from messaging.kafka._batches import BatchAppender, Delivery
from messaging.kafka._logs import quiet_client_logs
from messaging.kafka._options import KafkaOptions, _bootstrap
from messaging.kafka._partitioner import Murmur2Partitioner
from messaging.kafka._subscription import KafkaSubscription

logger = logging.getLogger("messaging.kafka")

_TOPIC_ALREADY_EXISTS = 36
_RECOVERY_MAX_BACKOFF_S = 1.0


class KafkaPubSub(BatchAppender, PubSub):
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
        # The URL's ?idempotence= and ?partitions= win over the arguments.
        self.idempotence = (
            idempotence if self.options.idempotence is None else self.options.idempotence
        )
        self.partitions = partitions if self.options.partitions is None else self.options.partitions
        self._partitioner = Murmur2Partitioner()
        self._sticky = {}
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
            partitioner=self._partitioner,
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
                    "add ?idempotence=false to the kafka:// URL (kafka_idempotence=False) for brokers without it, such as Tansu"
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
        producer = await self._producer_for(topic)
        try:
            await (
                await self._send(
                    producer, topic, data, key, attributes, self._keyless(producer, topic, key)
                )
            )
        except Exception as exc:
            raise self._send_error(exc, topic, len(data)) from exc

    async def publish_many(
        self, topic: str, items: Iterable[OutgoingItem], *, timeout_s: float | None = None
    ) -> list[Exception | None]:
        """`PubSub.publish_many`, with the records appended to the producer's batches directly
        and one acknowledgement awaited per batch: not a future, a coroutine and a partition lookup
        per record as `send` makes (the gateway's batch endpoint and the worker publish hundreds
        at a time). Each record goes to the partition `send` would choose (its keys hashed
        together); a record too big to share a batch is sent alone, through `send`."""
        if self._state != "connected":
            self._require_connected()
        self._check_topic(topic)
        if timeout_s is not None and not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s}")
        outcomes: list[Exception | None] = []
        checked: list[tuple[int, Outgoing]] = []
        for index, item in enumerate(items):
            try:
                checked.append((index, _outgoing(item)))
                outcomes.append(None)
            except TypeError as exc:
                outcomes.append(exc)
        if not checked:
            return outcomes
        deliveries: list[Delivery] = []
        try:
            async with asyncio.timeout(timeout_s):
                producer = await self._producer_for(topic)
                alone, by_partition = self._by_partition(producer, topic, checked)
                await self._send_alone(producer, topic, alone, deliveries, outcomes)
                for partition, records in by_partition.items():
                    before = len(deliveries)
                    try:
                        await self._send_batches(producer, topic, partition, records, deliveries)
                    except Exception as exc:  # no batch would take them (the producer closed)
                        refusal = self._send_error(exc, topic, 0)
                        taken = {i for delivery in deliveries[before:] for i in delivery.indexes}
                        for index, _ in records:
                            if index not in taken:
                                outcomes[index] = refusal
                if deliveries:
                    await asyncio.wait([delivery.acked for delivery in deliveries])
        except BrokerUnavailable as exc:  # before any send: the link is down
            for index, _ in checked:
                outcomes[index] = exc
            return outcomes
        except TimeoutError:
            assert timeout_s is not None  # only the deadline raises it here
            late = TimeoutError(f"not accepted by the broker within {timeout_s:g} s")
            handed = {index for delivery in deliveries for index in delivery.indexes}
            for index, _ in checked:
                if index not in handed and outcomes[index] is None:
                    outcomes[index] = late
            for delivery in deliveries:
                if not delivery.acked.done():
                    delivery.acked.cancel()
                    for index in delivery.indexes:
                        outcomes[index] = late
        self._failed_deliveries(topic, deliveries, outcomes)
        return outcomes

    async def _send_alone(
        self,
        producer: AIOKafkaProducer,
        topic: str,
        records: list[tuple[int, Outgoing]],
        deliveries: list[Delivery],
        outcomes: list[Exception | None],
    ) -> None:
        """Records too big to share a batch, each through `send`."""
        for index, message in records:
            try:
                key = message.key or None
                partition = self._keyless(producer, topic, key)
                acked = await self._send(
                    producer, topic, message.data, key, message.attributes, partition
                )
            except Exception as exc:
                outcomes[index] = self._send_error(exc, topic, len(message.data))
            else:
                deliveries.append(Delivery([index], len(message.data), acked))

    def _failed_deliveries(
        self, topic: str, deliveries: list[Delivery], outcomes: list[Exception | None]
    ) -> None:
        """Each record of an acknowledgement that failed gets that failure as its outcome."""
        for delivery in deliveries:
            if delivery.acked.cancelled():
                continue
            if (error := delivery.acked.exception()) is not None:
                failure = self._send_error(error, topic, delivery.size)
                for index in delivery.indexes:
                    outcomes[index] = failure

    async def _producer_for(self, topic: str) -> AIOKafkaProducer:
        """The producer, once the link is up and `topic` exists and its partitions are known."""
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
        if producer.client.cluster.partitions_for_topic(topic) is None:
            # send() would wait for the topic's metadata up to request_timeout_ms, and for
            # ever once the link broke and this producer was retired.
            try:
                await asyncio.wait_for(producer.partitions_for(topic), self.connect_timeout)
            except (KafkaError, TimeoutError) as exc:
                raise self._send_error(exc, topic, 0) from exc
        return producer

    def _keyless(self, producer: AIOKafkaProducer, topic: str, key: str | None) -> int | None:
        """The sticky partition for a record without a key; None (murmur2 of the key) for one with."""
        if key is not None:
            return None
        cluster = producer.client.cluster
        return self._sticky_partition(
            producer,
            topic,
            list(cluster.partitions_for_topic(topic) or ()),
            list(cluster.available_partitions_for_topic(topic) or ()),
        )

    @staticmethod
    async def _send(
        producer: AIOKafkaProducer,
        topic: str,
        data: bytes,
        key: str | None,
        attributes: Mapping[str, str] | None,
        partition: int | None = None,
    ) -> asyncio.Future[Any]:
        """Hand one record to the producer (to `partition`, else its key's); the future of its
        acknowledgement."""
        delivery: asyncio.Future[Any] = await producer.send(
            topic,
            data,
            partition=partition,
            key=key.encode() if key is not None else None,
            headers=[(name, value.encode()) for name, value in attributes.items()]
            if attributes
            else None,
        )
        return delivery

    def _send_error(self, exc: BaseException, topic: str, size: int) -> Exception:
        """What a failed send means to the caller."""
        if isinstance(exc, MessageSizeTooLargeError):
            return MessagingError(
                f"a message of {size} bytes does not fit Kafka's limit on {self.url}: raise "
                f"?max_message_bytes= (now {self.options.max_message_bytes}) in the broker URL, and the broker's message.max.bytes"
            )
        if isinstance(exc, KafkaError | TimeoutError):
            return BrokerUnavailable(f"publishing to {topic!r} on {self.url} failed: {exc!r}")
        return exc if isinstance(exc, Exception) else MessagingError(repr(exc))

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
                    'kafka_partitions=%d hint="?partitions= does not change an existing '
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
