"""`fmnist worker` as a real process on Tansu: SIGTERM drains and exits 0; SIGKILL loses nothing."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest

import messaging
from app.protocol import ResultMessage
from app.settings import Settings
from app.worker.consumer import Worker
from ml import ImageClassifier
from tests.brokers import connect_options
from tests.e2e import processes
from tests.ml.models import TinyClassifier, image
from tests.worker.helpers import MODEL, publish_request, take_results, worker_settings

pytestmark = [pytest.mark.kafka, pytest.mark.e2e, pytest.mark.timeout(120)]

WORKER_READY = r"event=worker_ready"
TOTAL = 200
PUBLISH_PER_SECOND = 80.0


def untrained_checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "untrained.safetensors"
    ImageClassifier(device="cpu").save(path)
    return path


def start_worker_process(
    name: str, settings: Settings, checkpoint: Path, log_dir: Path
) -> processes.ManagedProcess:
    """`fmnist worker` with topics/group from the environment and the rest given as flags."""
    env = {
        "FMNIST_REQUESTS_TOPIC": settings.requests_topic,
        "FMNIST_RESULTS_TOPIC": settings.results_topic,
        "FMNIST_DEADLETTER_TOPIC": settings.deadletter_topic,
        "FMNIST_WORKER_GROUP": settings.worker_group,
        "FMNIST_CONTROL_TOPIC": settings.control_topic,
        "FMNIST_BATCH_FILL_WHEN_IDLE": str(settings.batch_fill_when_idle).lower(),
    }
    flags = [
        "--broker", settings.broker_url,
        "--model", f"{MODEL}={checkpoint}",
        "--max-batch-size", str(settings.max_batch_size),
        "--batch-fill-wait-ms", str(settings.batch_fill_wait_ms),
        "--worker-id", name,
    ]  # fmt: skip
    return processes.fmnist(name, "worker", log_dir, env, *flags).start()


async def publish_paced(pubsub: messaging.PubSub, settings: Settings, count: int) -> None:
    """Publish `count` requests at a steady rate, like clients arriving over a few seconds."""
    started = time.monotonic()
    for i in range(count):
        await asyncio.sleep(max(0.0, started + i / PUBLISH_PER_SECOND - time.monotonic()))
        await publish_request(pubsub, settings, f"r{i}", image(seed=i))


async def wait_until_ready(process: processes.ManagedProcess) -> None:
    await asyncio.to_thread(process.wait_for_log, WORKER_READY, 90.0)


async def test_sigterm_answers_in_flight_requests_then_exits_0(
    kafka_url: str, tmp_path: Path
) -> None:
    """SIGTERM mid-stream: the worker answers what it holds, exits 0, and a successor answers the rest, none twice."""
    settings = worker_settings(
        kafka_url, max_batch_size=64, batch_fill_wait_ms=500.0, batch_fill_when_idle=True
    )
    first = start_worker_process("first", settings, untrained_checkpoint(tmp_path), tmp_path)
    with processes.stopping(first):
        await wait_until_ready(first)
        async with (
            messaging.connect(kafka_url, **connect_options(kafka_url)) as pubsub,
            pubsub.subscribe(settings.results_topic, group="observer") as results,
        ):
            publisher = asyncio.create_task(publish_paced(pubsub, settings, TOTAL))
            collected = await take_results(results, 40)
            # Results arrive just after a batch closes; half a timer later the next batch holds ~20.
            await asyncio.sleep(0.25)
            terminated_at = time.time()
            first.signal(signal.SIGTERM)
            assert first.popen is not None
            exit_code = await asyncio.to_thread(first.popen.wait, 30)
            await publisher
            async with Worker(settings, pubsub, TinyClassifier(), worker_id="second"):
                collected += await take_results(results, TOTAL - len(collected), within=60)
    assert exit_code == 0, first.log_text()
    assert "event=worker_drained" in first.log_text()
    # Every request answered, none twice: drained requests were committed, the rest were not taken.
    ids = sorted(r.request_id for r in collected)
    assert ids == sorted(f"r{i}" for i in range(TOTAL))
    answered_while_draining = [
        r for r in collected if r.worker_id == "first" and r.completed_at > terminated_at
    ]
    assert len(answered_while_draining) >= 5, "too little was in flight at SIGTERM to prove a drain"


async def test_sigkill_mid_stream_loses_nothing(kafka_url: str, tmp_path: Path) -> None:
    """A worker killed with SIGKILL leaves its unacked requests to the group; a second worker answers every one."""
    # The test broker's URL carries short session timeouts, so the group notices the kill in seconds.
    url = kafka_url
    settings = worker_settings(url, max_batch_size=8, batch_fill_wait_ms=50.0)
    checkpoint = untrained_checkpoint(tmp_path)
    first = start_worker_process("first", settings, checkpoint, tmp_path)
    with processes.stopping(first):
        await wait_until_ready(first)
        async with (
            messaging.connect(url, **connect_options(url)) as pubsub,
            pubsub.subscribe(settings.results_topic, group="observer") as results,
        ):
            publisher = asyncio.create_task(publish_paced(pubsub, settings, TOTAL))
            collected: list[ResultMessage] = await take_results(results, 40)
            first.kill()
            classifier = ImageClassifier.load(checkpoint, device="cpu")
            async with Worker(settings, pubsub, classifier, worker_id="second"):
                await publisher
                deadline = time.monotonic() + 60
                while {r.request_id for r in collected} != {f"r{i}" for i in range(TOTAL)}:
                    assert time.monotonic() < deadline, (
                        f"{len({r.request_id for r in collected})} of {TOTAL} answered"
                    )
                    collected += await take_results(results, 1, within=60)
    assert {r.worker_id for r in collected} == {"first", "second"}
    assert all(r.status == "completed" for r in collected)
