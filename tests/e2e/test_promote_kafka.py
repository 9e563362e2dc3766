"""`fmnist promote` end to end on Kafka (Tansu), every part a real process: a gateway, a serving worker
of the live version, and for each candidate a shadow worker (plus, for the one that can pass, a serving
worker to take the traffic it is promoted to). A candidate that answers as the live version does passes
its gate and reaches 100%; an untrained one is refused at the gate and never takes traffic."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.cli import main
from ml import ImageClassifier
from tests.e2e import processes
from tests.e2e.conftest import (
    KAFKA_E2E_OPTIONS,
    PROCESS_START_TIMEOUT_S,
    Stack,
    _tansu_or_skip,
)

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.kafka,
    pytest.mark.data,
    pytest.mark.timeout(240),
]

SAMPLES = 50  # labelled images both shadows compare before any promotion starts
GATE = ["--min-agreement", "0.9", "--min-accuracy", "0.7", "--min-samples", str(SAMPLES)]
SHADOW_READY = r"event=shadow_worker_ready"
SERVING_READY = r"event=worker_ready"


@dataclass(frozen=True)
class Candidates:
    good: Path
    bad: Path


@pytest.fixture(scope="module")
def candidates(tmp_path_factory: pytest.TempPathFactory, e2e_checkpoint: Path) -> Candidates:
    """The live weights under a temperature nudged by a negligible amount (the served version covers
    the temperature, and scaling logits keeps every top-1 class: a new version that answers the
    same), and an untrained network; each saved as `fmnist.safetensors` so it serves model fmnist.
    Both are deterministic, so their compiled programs are cached from one run to the next."""
    root = tmp_path_factory.mktemp("promote-candidates")
    good = ImageClassifier.load(e2e_checkpoint, device="cpu")
    good.temperature *= 1.001
    (root / "good").mkdir()
    good.save(root / "good" / "fmnist.safetensors")
    (root / "bad").mkdir()
    bad = ImageClassifier(widths=(4, 8), convs_per_stage=(1, 1), seed=3)
    bad.save(root / "bad" / "fmnist.safetensors")
    return Candidates(root / "good" / "fmnist.safetensors", root / "bad" / "fmnist.safetensors")


@dataclass(frozen=True)
class PromoteStack:
    stack: Stack
    url: str
    live: str
    good: str
    bad: str


@pytest.fixture(scope="module")
def promote_stack(
    e2e_log_dir: Path,
    e2e_checkpoint: Path,
    candidates: Candidates,
    test_pngs: tuple[list[bytes], list[int]],
) -> Iterator[PromoteStack]:
    """The live version serving alone under a split that holds it at 100, both candidates shadowing
    it, the good one also serving (it takes nothing while the split holds), and `SAMPLES` labelled
    images answered and compared."""
    broker, port = _tansu_or_skip(e2e_log_dir, "promote-tansu")
    broker_url = f"kafka://127.0.0.1:{port}?{KAFKA_E2E_OPTIONS}"
    stack = Stack(
        log_dir=e2e_log_dir,
        broker_url=broker_url,
        checkpoint=e2e_checkpoint,
        base_env=processes.broker_env(broker_url),
    )
    try:
        # Every process starts at once: no traffic is sent before the split holds the live version
        # at 100, so the good candidate's serving worker takes none before its promotion.
        workers = {
            "promote-live": ({}, SERVING_READY),
            "promote-good": ({"FMNIST_MODEL_PATH": str(candidates.good)}, SERVING_READY),
            "promote-good-shadow": (
                {"FMNIST_MODEL_PATH": str(candidates.good), "FMNIST_WORKER_ROLE": "shadow"},
                SHADOW_READY,
            ),
            "promote-bad-shadow": (
                {"FMNIST_MODEL_PATH": str(candidates.bad), "FMNIST_WORKER_ROLE": "shadow"},
                SHADOW_READY,
            ),
        }
        for name, (env, _) in workers.items():
            stack.start_worker(name, wait_ready=False, **env)
        stack.start_gateway("promote-gateway")
        url = stack.gateway_url("promote-gateway")
        for name, (_, ready) in workers.items():
            stack.workers[name].wait_for_log(ready, timeout=PROCESS_START_TIMEOUT_S)
        live, good, bad = _wait_for_roles(url)
        with httpx.Client(base_url=url, timeout=30) as client:
            held = client.put(
                "/v1/models/fmnist/weights", json={"weights": {live: 100}, "reason": "hold v1"}
            )
            assert held.status_code == 200, held.text
        for shadow in ("promote-good-shadow", "promote-bad-shadow"):
            stack.workers[shadow].wait_for_log(
                rf"event=shadow_topic_joined .*topic=fmnist\.requests\.fmnist\.v-{live}",
                timeout=PROCESS_START_TIMEOUT_S,
            )
        pngs, labels = test_pngs
        _send(url, pngs[:SAMPLES], labels[:SAMPLES])
        _wait_for_shadow_samples(url, {good, bad}, SAMPLES)
        yield PromoteStack(stack, url, live, good, bad)
    finally:
        for process in [*stack.gateways.values(), *stack.workers.values()]:
            process.signal(signal.SIGTERM)  # all drain at once; stop() then waits for each
        stack.stop()
        broker.stop()


def _wait_for_roles(url: str, timeout: float = 30.0) -> tuple[str, str, str]:
    """The live version (serving, no shadow), the good candidate (serving and shadowing) and the
    bad one (shadow only), once the gateway knows all three."""
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=url, timeout=10) as client:
        while True:
            answer = client.get("/v1/models/fmnist")
            if answer.status_code == 200:
                versions = answer.json()["versions"]
                live = [v["version"] for v in versions if v["ready"] and not v["shadow_workers"]]
                good = [v["version"] for v in versions if v["ready"] and v["shadow_workers"]]
                bad = [v["version"] for v in versions if v["role"] == "shadow"]
                if len(live) == len(good) == len(bad) == 1:
                    return live[0], good[0], bad[0]
            assert time.monotonic() < deadline, f"versions not all known: {answer.text}"
            time.sleep(0.1)


def _send(url: str, pngs: list[bytes], labels: list[int]) -> list[dict[str, Any]]:
    """POST each image with its label in the metadata and wait for its result."""
    results = []
    with httpx.Client(base_url=url, timeout=30) as client:
        for png, label in zip(pngs, labels, strict=True):
            answer = client.post(
                "/v1/predictions?wait=20",
                content=png,
                headers={
                    "Content-Type": "image/png",
                    "X-Fmnist-Metadata": json.dumps({"label": str(label)}),
                },
            )
            assert answer.status_code == 200, answer.text
            results.append(answer.json())
    return results


def _wait_for_shadow_samples(url: str, versions: set[str], samples: int) -> None:
    deadline = time.monotonic() + 30
    with httpx.Client(base_url=url, timeout=10) as client:
        while True:
            candidates = client.get("/v1/models/fmnist/shadow").json()["candidates"]
            counts = {c["version"]: c["samples"] for c in candidates}
            if all(counts.get(v, 0) >= samples for v in versions):
                return
            assert time.monotonic() < deadline, f"shadow samples {counts}, wanted {samples} each"
            time.sleep(0.2)


def _promote(url: str, candidate: str, *extra: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "app", "promote", "fmnist", candidate, "--url", url, *GATE]
    return subprocess.run(
        [*argv, *extra],
        cwd=processes.REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _history(url: str, candidate: str) -> list[str]:
    with httpx.Client(base_url=url, timeout=10) as client:
        events = client.get("/v1/models/fmnist/history").json()["events"]
    return [e["action"] for e in events if e["kind"] == "event" and e["candidate"] == candidate]


def test_an_untrained_candidate_is_refused_at_the_gate(
    promote_stack: PromoteStack, capsys: pytest.CaptureFixture[str]
) -> None:
    """Its shadow disagrees: exit 1, gate_failed recorded and shown, the live version keeps 100%."""
    done = _promote(promote_stack.url, promote_stack.bad, "--step-s", "1")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "refused at the gate" in done.stderr and "agreement" in done.stderr
    assert _history(promote_stack.url, promote_stack.bad) == ["started", "gate_failed"]
    model = httpx.get(f"{promote_stack.url}/v1/models/fmnist", timeout=10).json()
    assert model["weights"] == {promote_stack.live: 100}
    assert main(["models", "history", "fmnist", "--url", promote_stack.url]) == 0
    assert "gate_failed" in capsys.readouterr().out


def test_a_candidate_that_answers_alike_is_promoted_to_all_traffic(
    promote_stack: PromoteStack, test_pngs: tuple[list[bytes], list[int]]
) -> None:
    """Gate passed, 50% then 100% under live traffic without regression, then every answer is its."""
    url, good = promote_stack.url, promote_stack.good
    pngs, labels = test_pngs
    stop = threading.Event()
    failures: list[BaseException] = []

    def traffic() -> None:  # live traffic while the steps are watched
        index = SAMPLES
        try:
            while not stop.is_set():
                _send(url, pngs[index : index + 5], labels[index : index + 5])
                index = index + 5 if index < 900 else SAMPLES
        except BaseException as exc:  # reported by the test, not lost in the thread
            failures.append(exc)

    sender = threading.Thread(target=traffic, daemon=True)
    sender.start()
    try:
        # A loose p99 bound: the steps' p99s on a shared 2-core machine are noise, not the candidate.
        done = _promote(
            url, good[:8], "--steps", "50,100", "--step-s", "2", "--max-p99-ratio", "20"
        )
    finally:
        stop.set()
        sender.join(timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
    assert not failures, failures
    assert _history(url, good) == ["started", "gate_passed", "step", "step", "promoted"]
    model = httpx.get(f"{url}/v1/models/fmnist", timeout=10).json()
    assert model["weights"] == {good: 100}
    (candidate,) = [v for v in model["versions"] if v["version"] == good]
    assert candidate["live"]["requests"] > 0
    after = _send(url, pngs[1000:1010], labels[1000:1010])
    assert {result["model_version"] for result in after} == {good}
