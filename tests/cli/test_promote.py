"""`fmnist promote`'s HTTP loop against a CONTRACT DOUBLE: a minimal real HTTP server started here that
implements the rollout endpoints of docs/api.md (model with weights and live stats, shadow, weights, history)
from recorded state. It checks what the command sends and in what order; whether the decisions are
right is tests/rollout/test_promotion.py's, and the real gateway's part tests/e2e/test_promote_kafka.py's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from app.cli import main
from app.protocol import RolloutEvent

REPO_ROOT = Path(__file__).resolve().parents[2]
LIVE, CANDIDATE = "aaaa11112222", "bbbb33334444"
GOOD_SHADOW = {
    "version": CANDIDATE,
    "samples": 300,
    "agreement": 0.97,
    "labelled": 300,
    "live_accuracy": 0.92,
    "candidate_accuracy": 0.91,
    "dropped": 0,
}


def healthy(percent: int) -> dict[str, Any]:
    """Live stats of a candidate that answers as well and as fast as the live version."""
    return {"requests": percent, "failed": 0, "p99_ms": 10.0}


@dataclass
class GatewayState:
    """What the double serves and what it was sent."""

    shadow: list[dict[str, Any]] = field(default_factory=lambda: [dict(GOOD_SHADOW)])
    weights: dict[str, int] = field(default_factory=dict)
    candidate_live: Callable[[int], dict[str, Any]] = healthy
    admin_key: str | None = None
    puts: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)

    def model(self) -> dict[str, Any]:
        percent = self.weights.get(CANDIDATE, 0)
        window = {"window_s": 60.0, "error_rate": 0.0, "p50_ms": 5.0}
        return {
            "name": "fmnist",
            "weights": self.weights,
            "versions": [
                {
                    "version": LIVE,
                    "tag": "v1",
                    "role": "serving",
                    "ready": True,
                    "live": {**window, "requests": 100, "failed": 0, "p99_ms": 10.0},
                },
                {
                    "version": CANDIDATE,
                    "tag": "v2",
                    "role": "serving",
                    "ready": True,
                    "live": {**window, **self.candidate_live(percent)},
                },
            ],
        }


class ContractDouble(BaseHTTPRequestHandler):
    state: GatewayState

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the test reads the recorded state, not the access log."""

    def _answer(self, status: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, code: str, message: str) -> None:
        self._answer(status, {"error": {"code": code, "message": message}})

    def _admin(self) -> bool:
        key = self.state.admin_key
        given = self.headers.get("Authorization", "").removeprefix("Bearer ")
        if key is None or given == key:
            return True
        if given:
            self._error(403, "forbidden", "not an admin key")
        else:
            self._error(401, "unauthorized", "an API key is required")
        return False

    def _body(self) -> dict[str, Any]:
        body: dict[str, Any] = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        return body

    def do_GET(self) -> None:
        if self.path == "/v1/models/fmnist":
            self._answer(200, self.state.model())
        elif self.path == "/v1/models/fmnist/shadow":
            self._answer(200, {"model": "fmnist", "candidates": self.state.shadow})
        else:
            self._error(404, "model_not_found", f"no model at {self.path}")

    def do_PUT(self) -> None:
        if self.path != "/v1/models/fmnist/weights":
            return self._error(404, "model_not_found", self.path)
        if not self._admin():
            return None
        body = self._body()
        weights = body["weights"]
        if weights and (sum(weights.values()) != 100 or not set(weights) <= {LIVE, CANDIDATE}):
            return self._error(422, "invalid_weights", f"bad weights {weights}")
        self.state.puts.append(body)
        self.state.weights = dict(weights)
        return self._answer(200, {"model": "fmnist", "weights": weights, "set_at": time.time()})

    def do_POST(self) -> None:
        if self.path != "/v1/models/fmnist/history":
            return self._error(404, "model_not_found", self.path)
        if not self._admin():
            return None
        body = self._body()
        if "at" in body or "by" in body:
            return self._error(422, "invalid_event", "the gateway stamps at and by")
        event = RolloutEvent.model_validate({**body, "at": time.time(), "by": "admin"})
        self.state.events.append(event.model_dump())
        return self._answer(201, event.model_dump())


@pytest.fixture
def gateway() -> Iterator[tuple[str, GatewayState]]:
    """The contract double on a free port, with fresh state."""
    state = GatewayState()
    handler = type("Handler", (ContractDouble,), {"state": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", state
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def promote_argv(url: str, *extra: str) -> list[str]:
    return [
        "promote",
        "fmnist",
        "v2",
        "--url",
        url,
        "--min-agreement",
        "0.9",
        "--min-accuracy",
        "0.85",
        "--min-samples",
        "200",
        "--steps",
        "10,50,100",
        *extra,
    ]


def actions(state: GatewayState) -> list[str]:
    return [event["action"] for event in state.events]


def test_a_passing_candidate_is_stepped_to_100_and_recorded(
    gateway: tuple[str, GatewayState], capsys: pytest.CaptureFixture[str]
) -> None:
    """Gate passed, weights PUT at each step, every decision POSTed, exit 0, a line per step."""
    url, state = gateway
    status = main(promote_argv(url, "--step-s", "0.05"))
    assert status == 0
    assert [put["weights"] for put in state.puts] == [
        {CANDIDATE: 10, LIVE: 90},
        {CANDIDATE: 50, LIVE: 50},
        {CANDIDATE: 100},
    ]
    assert actions(state) == ["started", "gate_passed", "step", "step", "step", "promoted"]
    assert state.events[1]["figures"]["agreement"] == 0.97
    assert all(event["candidate"] == CANDIDATE for event in state.events)
    out = capsys.readouterr().out
    assert out.count("held ") == 3 and "step 2/3: bbbb33334444 at 50%" in out


def test_a_worse_candidate_is_refused_at_the_gate(
    gateway: tuple[str, GatewayState], capsys: pytest.CaptureFixture[str]
) -> None:
    """Agreement below the bound: no weights are set, gate_failed is recorded, exit 1."""
    url, state = gateway
    state.shadow = [{**GOOD_SHADOW, "agreement": 0.12, "candidate_accuracy": 0.1}]
    status = main(promote_argv(url, "--step-s", "0.05"))
    assert status == 1
    assert state.puts == []
    assert actions(state) == ["started", "gate_failed"]
    assert "agreement 12.00% below 90.00%" in state.events[1]["detail"]
    assert "refused at the gate" in capsys.readouterr().err


def test_a_regressing_candidate_is_rolled_back(
    gateway: tuple[str, GatewayState], capsys: pytest.CaptureFixture[str]
) -> None:
    """Errors at 50%: the live version is PUT back to 100, rolled_back is recorded, exit 3."""
    url, state = gateway

    def failing_at_half(percent: int) -> dict[str, Any]:
        return {"requests": 50, "failed": 10, "p99_ms": 10.0} if percent >= 50 else healthy(percent)

    state.candidate_live = failing_at_half
    status = main(promote_argv(url, "--step-s", "0.05"))
    assert status == 3
    assert [put["weights"] for put in state.puts][-1] == {LIVE: 100}
    assert actions(state) == ["started", "gate_passed", "step", "step", "rolled_back"]
    assert state.events[-1]["figures"]["candidate_error_rate"] == 0.2
    assert state.weights == {LIVE: 100}
    assert "rolled back, aaaa11112222 takes all live traffic again" in capsys.readouterr().err


def test_a_step_the_candidate_saw_too_little_traffic_in_stops_it(
    gateway: tuple[str, GatewayState], capsys: pytest.CaptureFixture[str]
) -> None:
    """--min-step-requests above the candidate's count: live back at 100, aborted, exit 1."""
    url, state = gateway
    status = main(promote_argv(url, "--step-s", "0.05", "--min-step-requests", "20"))
    assert status == 1
    assert [put["weights"] for put in state.puts] == [{CANDIDATE: 10, LIVE: 90}, {LIVE: 100}]
    assert actions(state)[-1] == "aborted"
    assert "fewer than 20" in capsys.readouterr().err


def test_no_shadow_of_the_candidate_refuses_with_what_to_start(
    gateway: tuple[str, GatewayState], capsys: pytest.CaptureFixture[str]
) -> None:
    """Without a shadow comparison of the candidate the command says how to get one, exit 1."""
    url, state = gateway
    state.shadow = []
    assert main(promote_argv(url)) == 1
    assert "--shadow" in capsys.readouterr().err and state.puts == []


def test_a_non_admin_key_is_told_which_setting_grants_it(
    gateway: tuple[str, GatewayState], capsys: pytest.CaptureFixture[str]
) -> None:
    """A 403 from the gateway names FMNIST_ADMIN_API_KEYS; the right key gets through."""
    url, state = gateway
    state.admin_key = "admin-secret"
    assert main(promote_argv(url, "--api-key", "plain-key")) == 1
    assert "FMNIST_ADMIN_API_KEYS" in capsys.readouterr().err
    status = main(promote_argv(url, "--api-key", "admin-secret", "--step-s", "0.05"))
    assert status == 0


def test_ctrl_c_during_a_step_puts_the_live_version_back(
    gateway: tuple[str, GatewayState],
) -> None:
    """SIGINT while the first step is watched: live at 100 again, aborted recorded, exit 130."""
    url, state = gateway
    argv = [sys.executable, "-m", "app", *promote_argv(url, "--step-s", "60")]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    with subprocess.Popen(argv, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True) as child:
        deadline = time.monotonic() + 20
        while not state.puts:
            assert time.monotonic() < deadline, "the first step was never set"
            time.sleep(0.05)
        child.send_signal(signal.SIGINT)
        assert child.wait(timeout=20) == 130
    assert [put["weights"] for put in state.puts] == [{CANDIDATE: 10, LIVE: 90}, {LIVE: 100}]
    assert actions(state)[-1] == "aborted"
    assert "interrupted" in state.events[-1]["detail"]


def test_a_replay_gate_on_the_embedded_broker_is_refused(
    gateway: tuple[str, GatewayState], capsys: pytest.CaptureFixture[str]
) -> None:
    """--replay-last with memory:// exits 1 saying which broker it needs; nothing is set."""
    url, state = gateway
    argv = promote_argv(url, "--replay-last", "10", "--broker", "memory://")
    argv[2] = "candidate.safetensors"
    assert main(argv) == 1
    assert "--replay-last needs a broker another process can read" in capsys.readouterr().err
    assert state.puts == [] and state.events == []


def test_steps_that_do_not_end_at_100_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    """`--steps 10,50` exits 2 before any call, saying the steps must end at 100."""
    with pytest.raises(SystemExit) as exit_info:
        main(promote_argv("http://127.0.0.1:1", "--steps", "10,50"))
    assert exit_info.value.code == 2
    assert "must end at 100" in capsys.readouterr().err
