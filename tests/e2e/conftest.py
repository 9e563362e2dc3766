"""Fixtures for end-to-end tests: a real broker, `fmnist gateway` and `fmnist worker` processes."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import missing_service
from tests.e2e import processes
from tests.e2e.images import load_test_pngs
from tests.e2e.processes import ManagedProcess

# A worker logs this once it has loaded the model and joined the consumer group.
WORKER_READY = r"event=worker_ready"
PROCESS_START_TIMEOUT_S = 60.0  # torch import + model load on a busy 2-core machine
# Tansu answers a long-polling fetch late (p50 137 ms per hop with the default fetch_max_wait_ms=500,
# 5 ms with 20); a short session timeout lets the group notice a SIGKILLed worker in 4 s, not 10 s.
KAFKA_E2E_OPTIONS = "fetch_max_wait_ms=20&session_timeout_ms=4000&heartbeat_interval_ms=500"


@dataclass
class Stack:
    """One broker with gateways and workers as real processes; restart or kill any of them."""

    log_dir: Path
    broker_url: str
    checkpoint: Path
    base_env: dict[str, str]
    gateways: dict[str, ManagedProcess] = field(default_factory=dict)
    gateway_ports: dict[str, int] = field(default_factory=dict)
    workers: dict[str, ManagedProcess] = field(default_factory=dict)

    def gateway_url(self, name: str = "gateway") -> str:
        return f"http://127.0.0.1:{self.gateway_ports[name]}"

    def start_gateway(
        self, name: str = "gateway", *, wait_ready: bool = True, **env: str
    ) -> ManagedProcess:
        """Start (or restart, on the same port and gateway id) the gateway called `name`."""
        port = self.gateway_ports.setdefault(name, processes.free_port())
        settings = {
            **self.base_env,
            "FMNIST_GATEWAY_ID": f"e2e-{name}",
            "FMNIST_HOST": "127.0.0.1",
            "FMNIST_PORT": str(port),
            **env,
        }
        gateway = processes.fmnist(name, "gateway", self.log_dir, settings).start()
        self.gateways[name] = gateway
        if wait_ready:
            gateway.wait_for_http(
                f"{self.gateway_url(name)}/readyz", timeout=PROCESS_START_TIMEOUT_S
            )
        return gateway

    def start_worker(self, name: str, *, wait_ready: bool = True, **env: str) -> ManagedProcess:
        settings = {
            **self.base_env,
            "FMNIST_MODEL_PATH": str(self.checkpoint),
            "FMNIST_WORKER_ID": name,
            **env,
        }
        worker = processes.fmnist(name, "worker", self.log_dir, settings).start()
        self.workers[name] = worker
        if wait_ready:
            worker.wait_for_log(WORKER_READY, timeout=PROCESS_START_TIMEOUT_S)
        return worker

    def ensure_workers(self, *names: str) -> None:
        """Make sure each named worker runs and is not paused (tests kill and pause them)."""
        started = []
        for name in names:
            worker = self.workers.get(name)
            if worker is not None and worker.running():
                worker.signal(signal.SIGCONT)
            else:
                started.append(self.start_worker(name, wait_ready=False))
        for worker in started:
            worker.wait_for_log(WORKER_READY, timeout=PROCESS_START_TIMEOUT_S)

    def ensure_some_worker(self) -> None:
        """Resume every paused worker; start one only if none is running (restarts cost seconds of CPU)."""
        running = [name for name, worker in self.workers.items() if worker.running()]
        self.ensure_workers(*(running or ["worker-1"]))

    def stop(self) -> None:
        for process in [*self.gateways.values(), *self.workers.values()]:
            process.stop()


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


@pytest.fixture(scope="module")
def kafka_stack(e2e_log_dir: Path, e2e_checkpoint: Path) -> Iterator[Stack]:
    """Tansu, one gateway and two workers, shared by the tests of one module."""
    broker, port = _tansu_or_skip(e2e_log_dir, "tansu")
    broker_url = f"kafka://127.0.0.1:{port}?{KAFKA_E2E_OPTIONS}"
    stack = Stack(
        log_dir=e2e_log_dir,
        broker_url=broker_url,
        checkpoint=e2e_checkpoint,
        base_env=processes.broker_env(broker_url),
    )
    try:
        # Workers first: each needs seconds of CPU for torch, the gateway starts in one.
        stack.ensure_workers("worker-1", "worker-2")
        stack.start_gateway()
        yield stack
    finally:
        stack.stop()
        broker.stop()


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
