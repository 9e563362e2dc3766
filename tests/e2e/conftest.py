"""Fixtures for end-to-end tests: a real broker, `fmnist gateway` and `fmnist worker` processes."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from tests.conftest import missing_service
from tests.e2e import processes
from tests.e2e.images import load_test_pngs
from tests.e2e.processes import (
    KAFKA_E2E_OPTIONS,
    PROCESS_START_TIMEOUT_S,
    WORKER_READY,
    ManagedProcess,
    Stack,
)

# Defined beside the processes (so `bench/` can use them); imported from here by the tests.
__all__ = ["KAFKA_E2E_OPTIONS", "PROCESS_START_TIMEOUT_S", "WORKER_READY", "Stack", "tansu_stack"]


@pytest.fixture(scope="session")
def e2e_log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where every e2e process writes its log (kept by pytest for the last three runs)."""
    return tmp_path_factory.mktemp("e2e-logs")


@pytest.fixture(scope="session")
def e2e_checkpoint(request: pytest.FixtureRequest) -> Path:
    """The checkpoint the workers serve: the shipped one, or `FMNIST_E2E_CHECKPOINT` while developing."""
    override = os.environ.get("FMNIST_E2E_CHECKPOINT")
    return Path(override) if override else Path(request.getfixturevalue("shipped_checkpoint"))


@pytest.fixture(scope="session")
def test_pngs(fashion_mnist_dir: Path) -> tuple[list[bytes], list[int]]:
    """The first 2000 Fashion-MNIST test images as PNG bytes, with their labels."""
    return load_test_pngs(fashion_mnist_dir, 2000)


def _tansu_or_skip(log_dir: Path, name: str) -> tuple[ManagedProcess, int]:
    port = processes.free_port()
    try:
        broker = processes.tansu(port, log_dir, name=name).start()
        broker.wait_for_port(port, timeout=20)
    except processes.ProcessFailed as error:
        missing_service(f"Tansu did not start: {error}")
        raise
    return broker, port


@contextlib.contextmanager
def tansu_stack(
    log_dir: Path,
    checkpoint: Path,
    broker_name: str,
    *,
    url_options: str = "",
    env: Mapping[str, str] | None = None,
) -> Iterator[Stack]:
    """`processes.kafka_stack` (a Tansu and a `Stack` on it), skipped (failed in CI) without Tansu."""
    with contextlib.ExitStack() as on_exit:
        try:
            stack = on_exit.enter_context(
                processes.kafka_stack(
                    log_dir, checkpoint, broker_name, url_options=url_options, env=env
                )
            )
        except processes.ProcessFailed as error:
            missing_service(f"Tansu did not start: {error}")
            raise
        yield stack


@pytest.fixture(scope="module")
def kafka_stack(e2e_log_dir: Path, e2e_checkpoint: Path) -> Iterator[Stack]:
    """Tansu, one gateway and two workers, shared by the tests of one module."""
    with tansu_stack(e2e_log_dir, e2e_checkpoint, "tansu") as stack:
        # Workers first: each needs seconds of CPU for torch, the gateway starts in one.
        stack.ensure_workers("worker-1", "worker-2")
        stack.start_gateway()
        yield stack


@pytest.fixture(scope="module")
def pubsub_stack(e2e_log_dir: Path, e2e_checkpoint: Path) -> Iterator[Stack]:
    """Google's Pub/Sub emulator, one gateway and two workers."""
    port = processes.free_port()
    try:
        emulator = processes.pubsub_emulator(port, e2e_log_dir).start()
        emulator.wait_for_log(r"Server started", timeout=60)
    except processes.ProcessFailed as error:
        missing_service(f"Pub/Sub emulator did not start: {error}")
        raise
    project = "fmnist-e2e"
    stack = Stack(
        log_dir=e2e_log_dir,
        broker_url=f"gcp://{project}",
        checkpoint=e2e_checkpoint,
        base_env=processes.broker_env(f"gcp://{project}", emulator_port=port),
    )
    try:
        stack.ensure_workers("pubsub-worker-1", "pubsub-worker-2")
        stack.start_gateway("pubsub-gateway")
        yield stack
    finally:
        stack.stop()
        emulator.stop()
