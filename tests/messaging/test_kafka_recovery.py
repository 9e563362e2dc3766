"""kafka:// after its broker restarts with an empty log: topics come back, the same clients resume."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import messaging
from messaging import PubSub, Subscription
from tests.conftest import missing_service
from tests.e2e import processes

pytestmark = [pytest.mark.kafka, pytest.mark.slow, pytest.mark.timeout(90)]

OPTIONS = "fetch_max_wait_ms=20&session_timeout_ms=4000&heartbeat_interval_ms=500"
RECOVERY_TIMEOUT_S = 20.0


class RestartableTansu:
    """A memory-only Tansu on a fixed port that a test can SIGKILL and start again, empty."""

    def __init__(self, log_dir: Path) -> None:
        self.port = processes.free_port()
        self.log_dir = log_dir
        self.process: processes.ManagedProcess | None = None
        self.url = f"kafka://127.0.0.1:{self.port}?{OPTIONS}"

    def start(self) -> None:
        try:
            self.process = processes.tansu(self.port, self.log_dir).start()
            self.process.wait_for_port(self.port, timeout=20)
        except processes.ProcessFailed as error:
            missing_service(f"Tansu did not start: {error}")
            raise

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()


@pytest.fixture
def tansu(tmp_path: Path) -> Iterator[RestartableTansu]:
    broker = RestartableTansu(tmp_path)
    broker.start()
    try:
        yield broker
    finally:
        broker.kill()


async def _recovered(pubsub: PubSub, subscription: Subscription) -> float:
    started = time.monotonic()
    async with asyncio.timeout(RECOVERY_TIMEOUT_S):
        while not (pubsub.link_up and subscription.healthy):  # noqa: ASYNC110 - state of a client, no event
            await asyncio.sleep(0.05)
    return time.monotonic() - started


async def _restart_empty(tansu: RestartableTansu, pubsub: PubSub, down_s: float = 0.0) -> None:
    tansu.kill()
    async with asyncio.timeout(5):
        while pubsub.link_up:  # noqa: ASYNC110 - state of a client, no event
            await asyncio.sleep(0.02)
    await asyncio.sleep(down_s)
    tansu.start()


async def test_same_clients_publish_and_consume_after_the_broker_restarts_empty(
    tansu: RestartableTansu,
) -> None:
    """After an empty restart the topic is re-created and the same subscription receives a new publish."""
    async with (
        messaging.connect(tansu.url, connect_timeout=3, kafka_idempotence=False) as pubsub,
        pubsub.subscribe("requests", group="workers") as messages,
    ):
        await pubsub.publish("requests", b"before", key="a")
        first = await asyncio.wait_for(anext(messages), 10)
        await first.ack()
        await asyncio.sleep(0.5)  # let the commit of offset 1 reach the broker

        await _restart_empty(tansu, pubsub)
        await _recovered(pubsub, messages)
        await pubsub.publish("requests", b"after", key="b")
        received = await asyncio.wait_for(anext(messages), 10)
        assert received.data == b"after"
        await received.ack()


async def test_a_publish_during_the_outage_fails_instead_of_being_acknowledged_into_the_void(
    tansu: RestartableTansu,
) -> None:
    """A publish while the broker is away raises BrokerUnavailable; none is acknowledged and then lost."""
    async with (
        messaging.connect(tansu.url, connect_timeout=2, kafka_idempotence=False) as pubsub,
        pubsub.subscribe("requests", group="workers") as messages,
    ):
        tansu.kill()
        with pytest.raises(messaging.BrokerUnavailable):
            await pubsub.publish("requests", b"during", key="lost")
        tansu.start()
        await _recovered(pubsub, messages)
        await pubsub.publish("requests", b"after", key="b")
        received = await asyncio.wait_for(anext(messages), 10)
        assert (received.key, received.data) == ("b", b"after")


async def test_an_outage_logs_one_line_per_state_change_and_few_client_lines(
    tansu: RestartableTansu, caplog: pytest.LogCaptureFixture
) -> None:
    """One link_lost, one topics_recreated, one link_restored; aiokafka's retry lines are held back."""
    caplog.set_level(logging.INFO)
    async with (
        messaging.connect(tansu.url, connect_timeout=3, kafka_idempotence=False) as pubsub,
        pubsub.subscribe("requests", group="workers") as messages,
    ):
        # An outage of a few seconds, in which aiokafka retries every 100 ms per client.
        await _restart_empty(tansu, pubsub, down_s=3)
        await _recovered(pubsub, messages)
    text = [record.getMessage() for record in caplog.records]
    events = [line.split()[0] for line in text if line.startswith("event=kafka_")]
    assert events.count("event=kafka_topics_recreated") == 1, events
    assert events.count("event=kafka_link_restored") == 1, events
    assert events.count("event=kafka_link_lost") == 1, events
    client_errors = [r for r in caplog.records if r.name.startswith("aiokafka")]
    assert len(client_errors) < 30, [r.getMessage() for r in client_errors]
