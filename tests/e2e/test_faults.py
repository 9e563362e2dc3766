"""Faults with real processes: a Kafka broker SIGKILLed and restarted empty, a worker SIGKILLed, under load."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import missing_service
from tests.e2e import processes
from tests.e2e.conftest import KAFKA_E2E_OPTIONS, Stack

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.kafka,
    pytest.mark.data,
    pytest.mark.timeout(180),
]

PUBLISH_TIMEOUT_S = 2.0
DEADLINE_S = 12.0  # requests lost with the broker's memory fail at their deadline, inside the test


@dataclass(frozen=True)
class Sent:
    """One submit of the load loop: when it was sent, what came back, how long it took."""

    at: float
    status: int
    retry_after: str | None
    request_id: str | None
    elapsed_s: float


class SteadyLoad:
    """One client posting images back to back in a thread until stopped."""

    def __init__(self, url: str, image: bytes) -> None:
        self.url, self.image = url, image
        self.sent: list[Sent] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> SteadyLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                answer = client.post(
                    f"{self.url}/v1/predictions",
                    content=self.image,
                    headers={"Content-Type": "image/png"},
                )
                request_id = answer.json().get("request_id") if answer.status_code == 202 else None
                self.sent.append(
                    Sent(
                        started,
                        answer.status_code,
                        answer.headers.get("retry-after"),
                        request_id,
                        time.monotonic() - started,
                    )
                )
                time.sleep(0.05)


@dataclass
class FaultStack:
    """A gateway and a worker on a Tansu broker that a test may kill and restart empty."""

    stack: Stack
    port: int
    broker: processes.ManagedProcess

    def restart_broker_empty(self) -> None:
        """A new Tansu on the same port: its log is in memory, so every topic and offset is gone."""
        self.broker = processes.tansu(self.port, self.stack.log_dir, name="fault-tansu").start()
        self.broker.wait_for_port(self.port, timeout=20)


def _outcomes(url: str, ids: list[str], timeout_s: float) -> dict[str, dict[str, object]]:
    """Poll every id until none is pending (or `timeout_s`); the last answer of each."""
    final: dict[str, dict[str, object]] = {}
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=10) as client:
        while time.monotonic() < deadline:
            for request_id in ids:
                if request_id not in final or final[request_id].get("status") == "pending":
                    answer = client.get(f"{url}/v1/predictions/{request_id}")
                    final[request_id] = (
                        answer.json()
                        if answer.status_code == 200
                        else {"status": answer.status_code}
                    )
            if all(outcome.get("status") != "pending" for outcome in final.values()):
                break
            time.sleep(0.5)
    return final


@pytest.fixture
def fault_stack(e2e_log_dir: Path, e2e_checkpoint: Path) -> Iterator[FaultStack]:
    """A Tansu of its own (the test kills it), one gateway and one worker."""
    port = processes.free_port()
    broker_url = f"kafka://127.0.0.1:{port}?{KAFKA_E2E_OPTIONS}"
    stack = Stack(
        log_dir=e2e_log_dir,
        broker_url=broker_url,
        checkpoint=e2e_checkpoint,
        base_env={
            **processes.broker_env(broker_url),
            "FMNIST_BROKER_CONNECT_TIMEOUT_S": "3",
            "FMNIST_PUBLISH_TIMEOUT_S": str(PUBLISH_TIMEOUT_S),
            "FMNIST_REQUEST_DEADLINE_S": str(DEADLINE_S),
        },
    )
    tansu = processes.tansu(port, e2e_log_dir, name="fault-tansu")
    try:
        tansu.start().wait_for_port(port, timeout=20)
    except processes.ProcessFailed as error:
        missing_service(f"Tansu did not start: {error}")
        raise
    faults = FaultStack(stack, port, tansu)
    try:
        stack.start_worker("fault-worker-1")
        stack.start_gateway("fault-gateway")
        yield faults
    finally:
        stack.stop()
        faults.broker.stop()


def test_broker_restarted_empty_under_load_recovers_and_loses_no_accepted_request(
    fault_stack: FaultStack, test_pngs: tuple[list[bytes], list[int]]
) -> None:
    """Tansu SIGKILLed and restarted empty: 503s within the bound, then 200 again; every 202 gets an outcome."""
    stack = fault_stack.stack
    url = stack.gateway_url("fault-gateway")
    gateway, worker = stack.gateways["fault-gateway"], stack.workers["fault-worker-1"]
    with SteadyLoad(url, test_pngs[0][0]) as load:
        time.sleep(3)
        killed_at = time.monotonic()
        fault_stack.broker.kill()
        gateway.wait_for_http(f"{url}/readyz", timeout=15, status=503)
        time.sleep(2)
        fault_stack.restart_broker_empty()
        gateway.wait_for_http(f"{url}/readyz", timeout=30)
        ready_at = time.monotonic()
        time.sleep(4)
    sent = load.sent
    assert {s.status for s in sent} <= {202, 503}, sorted({s.status for s in sent})
    refused = [s for s in sent if s.status == 503]
    assert refused, "no submit met the outage"
    assert all(s.retry_after for s in refused)
    assert max(s.elapsed_s for s in refused) < PUBLISH_TIMEOUT_S + 1.5
    accepted = [s for s in sent if s.status == 202 and s.request_id]
    after = [s.request_id for s in accepted if s.at > ready_at]
    assert len(after) >= 5, "too few submits after recovery to judge"

    outcomes = _outcomes(url, [s.request_id for s in accepted if s.request_id], DEADLINE_S + 15)
    statuses = {request_id: str(o.get("status")) for request_id, o in outcomes.items()}
    assert set(statuses.values()) <= {"completed", "failed"}, statuses
    assert all(statuses[request_id] == "completed" for request_id in after if request_id)
    # What a broker that lost its memory can lose: requests accepted (published into the wiped log)
    # and not yet taken by the worker when it died; those fail at their deadline, explicitly.
    failed = [s for s in accepted if statuses[s.request_id or ""] == "failed"]
    for s in failed:
        assert s.at < killed_at
        error = outcomes[s.request_id or ""]["error"]
        assert isinstance(error, dict) and error["code"] == "deadline_exceeded"
    assert len(failed) <= 2, f"{len(failed)} accepted requests were lost with the broker's log"

    for process in (gateway, worker):
        log = process.log_text()
        assert log.count("event=kafka_link_lost") == 1, process.name
        assert log.count("event=kafka_link_restored") == 1, process.name
        assert log.count("OffsetCommit failed") < 5, process.name


def test_worker_killed_under_load_and_replaced_loses_no_accepted_request(
    fault_stack: FaultStack, test_pngs: tuple[list[bytes], list[int]]
) -> None:
    """A worker SIGKILLed mid-load and replaced: every accepted request completes."""
    stack = fault_stack.stack
    url = stack.gateway_url("fault-gateway")
    with SteadyLoad(url, test_pngs[0][1]) as load:
        time.sleep(2)
        stack.workers["fault-worker-1"].kill()
        time.sleep(1)
        stack.start_worker("fault-worker-2")
        time.sleep(2)
    accepted = [s.request_id for s in load.sent if s.status == 202 and s.request_id]
    assert {s.status for s in load.sent} <= {202, 503}
    outcomes = _outcomes(url, accepted, DEADLINE_S + 15)
    assert {str(o.get("status")) for o in outcomes.values()} == {"completed"}
