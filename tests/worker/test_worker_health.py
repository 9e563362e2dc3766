"""`fmnist worker` with FMNIST_WORKER_HEALTH_PORT: probes see it alive while loading, ready once consuming."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from app.settings import Settings
from tests.e2e import processes
from tests.worker.helpers import worker_settings
from tests.worker.test_worker_process import (
    WORKER_READY,
    start_worker_process,
    untrained_checkpoint,
)

pytestmark = [pytest.mark.kafka, pytest.mark.e2e, pytest.mark.timeout(120)]


def test_worker_health_endpoint_reports_ready_once_consuming_and_stops_with_the_worker(
    kafka_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/healthz answers; /readyz turns 200 by the time the worker logs worker_ready; SIGTERM ends both."""
    port = processes.free_port()
    monkeypatch.setenv("FMNIST_WORKER_HEALTH_PORT", str(port))
    settings: Settings = worker_settings(kafka_url)
    worker = start_worker_process(
        "health-worker", settings, untrained_checkpoint(tmp_path), tmp_path
    )
    try:
        worker.wait_for_http(f"http://127.0.0.1:{port}/healthz", timeout=60)
        worker.wait_for_log(WORKER_READY, 90.0)
        ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
        assert ready.status_code == 200, ready.text
        assert worker.stop() == 0
        assert not processes.port_open(port)
    finally:
        worker.stop()
