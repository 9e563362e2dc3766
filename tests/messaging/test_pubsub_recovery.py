"""gcp:// after the emulator restarts empty: topics and subscriptions come back, the same clients resume."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

import messaging
from messaging import PubSub, Subscription
from tests.brokers import GCP_TEST_PROJECT
from tests.conftest import missing_service
from tests.e2e import processes

pytestmark = [pytest.mark.gcp, pytest.mark.slow, pytest.mark.timeout(120)]

RECOVERY_TIMEOUT_S = 30.0


class RestartableEmulator:
    """Google's Pub/Sub emulator on a fixed port that a test can SIGKILL and start again, empty."""

    def __init__(self, log_dir: Path) -> None:
        self.port = processes.free_port()
        self.log_dir = log_dir
        self.process: processes.ManagedProcess | None = None
        self.url = f"gcp://{GCP_TEST_PROJECT}?emulator=127.0.0.1:{self.port}&ack_deadline_s=10"

    def start(self) -> None:
        try:
            self.process = processes.pubsub_emulator(self.port, self.log_dir).start()
            self.process.wait_for_port(self.port, timeout=60)
        except processes.ProcessFailed as error:
            missing_service(f"the Pub/Sub emulator did not start: {error}")
            raise

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()


@pytest.fixture
def emulator(tmp_path: Path) -> Iterator[RestartableEmulator]:
    broker = RestartableEmulator(tmp_path)
    broker.start()
    try:
        yield broker
    finally:
        broker.kill()


@contextlib.asynccontextmanager
async def _workers(
    emulator: RestartableEmulator, connect_timeout: float = 3.0
) -> AsyncIterator[tuple[PubSub, Subscription]]:
    """A PubSub on the emulator and the "workers" group's subscription to "requests", started."""
    async with (
        messaging.connect(emulator.url, connect_timeout=connect_timeout) as pubsub,
        pubsub.subscribe("requests", group="workers") as messages,
    ):
        yield pubsub, messages


async def _recovered(pubsub: PubSub, subscription: Subscription) -> None:
    async with asyncio.timeout(RECOVERY_TIMEOUT_S):
        while not (pubsub.link_up and subscription.healthy):  # noqa: ASYNC110 - state of a client, no event
            await asyncio.sleep(0.05)


async def _restart_empty(emulator: RestartableEmulator, pubsub: PubSub) -> None:
    emulator.kill()
    async with asyncio.timeout(10):
        while pubsub.link_up:  # noqa: ASYNC110 - state of a client, no event
            await asyncio.sleep(0.02)
    await asyncio.to_thread(emulator.start)


async def test_same_clients_publish_and_consume_after_the_emulator_restarts_empty(
    emulator: RestartableEmulator,
) -> None:
    """After an empty restart the topic and subscription are re-created and the same subscription receives a new publish."""
    async with _workers(emulator) as (pubsub, messages):
        await pubsub.publish("requests", b"before", key="a")
        first = await asyncio.wait_for(anext(messages), 10)
        await first.ack()

        await _restart_empty(emulator, pubsub)
        await _recovered(pubsub, messages)
        await pubsub.publish("requests", b"after", key="b")
        received = await asyncio.wait_for(anext(messages), 10)
        assert (received.key, received.data) == ("b", b"after")
        await received.ack()


async def test_a_deleted_subscription_is_noticed_by_its_stream_and_re_created(
    emulator: RestartableEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    """A streaming pull ended by NotFound starts the recovery; the re-created subscription receives."""
    caplog.set_level(logging.INFO, logger="messaging")
    async with _workers(emulator) as (pubsub, messages):
        subscriber = pubsub.subscriber  # type: ignore[attr-defined]
        path = subscriber.subscription_path(GCP_TEST_PROJECT, "requests.workers")
        await asyncio.to_thread(subscriber.delete_subscription, subscription=path)
        # Too quick to catch `healthy` False by polling: wait for the recovery's last line.
        async with asyncio.timeout(RECOVERY_TIMEOUT_S):
            while "event=pubsub_link_restored" not in caplog.text:  # noqa: ASYNC110 - a log line, no event
                await asyncio.sleep(0.05)
        assert "subscriptions=requests.workers " in caplog.text
        await pubsub.publish("requests", b"after", key="b")
        received = await asyncio.wait_for(anext(messages), 10)
        assert (received.key, received.data) == ("b", b"after")


async def test_a_publish_during_the_outage_fails_within_the_connect_timeout(
    emulator: RestartableEmulator,
) -> None:
    """A publish while the emulator is away raises BrokerUnavailable within the connect timeout."""
    async with _workers(emulator, connect_timeout=2) as (pubsub, _):
        await pubsub.publish("requests", b"before", key="a")
        emulator.kill()
        started = time.monotonic()
        with pytest.raises(messaging.BrokerUnavailable):
            await pubsub.publish("requests", b"during", key="b")
        assert time.monotonic() - started < 2.5


async def test_an_outage_logs_one_line_per_state_change(
    emulator: RestartableEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    """One link_lost, one recreated (naming the topic and the subscription), one link_restored."""
    caplog.set_level(logging.INFO, logger="messaging")
    async with _workers(emulator) as (pubsub, messages):
        await _restart_empty(emulator, pubsub)
        await _recovered(pubsub, messages)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("event=pubsub_")]
    events = [line.split()[0] for line in lines]
    assert events.count("event=pubsub_link_lost") == 1, lines
    assert events.count("event=pubsub_link_restored") == 1, lines
    recreated = [line for line in lines if line.startswith("event=pubsub_recreated")]
    assert len(recreated) == 1, lines
    assert "topics=requests " in recreated[0] and "subscriptions=requests.workers " in recreated[0]


async def test_link_and_subscription_report_unhealthy_during_the_outage(
    emulator: RestartableEmulator,
) -> None:
    """While the emulator is away, link_up and the subscription's healthy are False (readiness reads them)."""
    async with _workers(emulator) as (pubsub, messages):
        assert pubsub.link_up and messages.healthy
        emulator.kill()
        async with asyncio.timeout(10):
            while pubsub.link_up:  # noqa: ASYNC110 - state of a client, no event
                await asyncio.sleep(0.02)
        assert not messages.healthy
