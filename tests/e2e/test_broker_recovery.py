"""A gateway started while its broker is unreachable refuses politely, then recovers without a restart."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from tests.e2e import processes
from tests.e2e.conftest import Stack

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.kafka,
    pytest.mark.data,
    pytest.mark.timeout(120),
]


def test_gateway_answers_503_until_the_broker_appears_then_serves_without_restart(
    e2e_log_dir: Path, e2e_checkpoint: Path, test_pngs: tuple[list[bytes], list[int]]
) -> None:
    """Broker down at start: /readyz and POST answer 503 + Retry-After; once it is up, a request completes."""
    port = processes.free_port()
    broker_url = f"kafka://127.0.0.1:{port}"
    stack = Stack(
        log_dir=e2e_log_dir,
        broker_url=broker_url,
        checkpoint=e2e_checkpoint,
        base_env={**processes.broker_env(broker_url), "FMNIST_BROKER_CONNECT_TIMEOUT_S": "2"},
    )
    broker = processes.tansu(port, e2e_log_dir, name="late-tansu")
    image, label = test_pngs[0][0], test_pngs[1][0]
    try:
        gateway = stack.start_gateway("late-gateway", wait_ready=False)
        url = stack.gateway_url("late-gateway")
        gateway.wait_for_http(f"{url}/healthz", timeout=60)

        ready = httpx.get(f"{url}/readyz", timeout=5)
        assert ready.status_code == 503
        refused = httpx.post(
            f"{url}/v1/predictions",
            content=image,
            headers={"Content-Type": "image/png"},
            timeout=10,
        )
        assert refused.status_code == 503
        assert "retry-after" in refused.headers
        assert refused.json()["error"]["code"]
        assert gateway.running()

        broker.start().wait_for_port(port, timeout=20)
        gateway.wait_for_http(f"{url}/readyz", timeout=60)
        stack.start_worker("late-worker")
        # A worker is ready once consuming; the gateway learns its model from the control topic a moment later.
        deadline = time.monotonic() + 30
        while not httpx.get(f"{url}/v1/models", timeout=5).json().get("models"):
            assert time.monotonic() < deadline, "the gateway never learned the late worker's model"
            time.sleep(0.1)
        served = httpx.post(
            f"{url}/v1/predictions?wait=20",
            content=image,
            headers={"Content-Type": "image/png"},
            timeout=30,
        )
        assert served.status_code == 200, served.text
        assert served.json()["status"] == "completed"
        assert served.json()["label"] == label
    finally:
        stack.stop()
        broker.stop()
