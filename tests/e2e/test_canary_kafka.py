"""A 90/10 canary split end to end on Kafka (Tansu), every part a real process: two gateways, one
serving worker of version 1 and one of version 2 (two checkpoints of model fmnist). The split is set
with `fmnist models weights`, as a user would, and read back with `fmnist models history`."""

from __future__ import annotations

import io
import signal
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from app.cli import main
from ml import ImageClassifier
from tests.e2e import processes
from tests.e2e.conftest import (
    KAFKA_E2E_OPTIONS,
    PROCESS_START_TIMEOUT_S,
    WORKER_READY,
    Stack,
    _tansu_or_skip,
)
from tests.e2e.images import load_test_images

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.kafka,
    pytest.mark.data,
    pytest.mark.timeout(180),
]

IMAGES = 2000
PER_REQUEST = 250  # images per `POST /v1/predictions:batch` (FMNIST_MAX_BATCH_IMAGES allows 256)
CANARY_PERCENT = 10
TOLERANCE_PP = 2.0  # the share by request-id hash over IMAGES requests is within this of the weight
KEYS = 40  # Idempotency-Keys repeated on the second gateway


@dataclass(frozen=True)
class CanaryStack:
    stack: Stack
    url: str  # the gateway the split is set on
    other_url: str  # a second gateway, which learns the split from the rollout topic
    stable: str  # version 1: the shipped weights
    canary: str  # version 2


def _canary_checkpoint(root: Path, live: Path) -> Path:
    """Version 2: the live weights under a temperature nudged by a negligible amount (a new served
    version that answers alike), saved as `fmnist.safetensors` so that it serves model fmnist; the
    same bytes as the promote test's good candidate, so its compiled program is cached."""
    canary = ImageClassifier.load(live, device="cpu")
    canary.temperature *= 1.001
    path = root / "fmnist.safetensors"
    canary.save(path)
    return path


@pytest.fixture(scope="module")
def canary_stack(
    tmp_path_factory: pytest.TempPathFactory, e2e_log_dir: Path, e2e_checkpoint: Path
) -> Iterator[CanaryStack]:
    """Tansu, a worker per version and two gateways, all started at once; no split yet."""
    canary_path = _canary_checkpoint(tmp_path_factory.mktemp("canary"), e2e_checkpoint)
    broker, port = _tansu_or_skip(e2e_log_dir, "canary-tansu")
    broker_url = f"kafka://127.0.0.1:{port}?{KAFKA_E2E_OPTIONS}"
    stack = Stack(
        log_dir=e2e_log_dir,
        broker_url=broker_url,
        checkpoint=e2e_checkpoint,
        base_env=processes.broker_env(broker_url),
    )
    try:
        stack.start_worker("canary-v1", wait_ready=False)
        stack.start_worker("canary-v2", wait_ready=False, FMNIST_MODEL_PATH=str(canary_path))
        stack.start_gateway("canary-gateway-a", wait_ready=False)
        stack.start_gateway("canary-gateway-b")
        stack.gateways["canary-gateway-a"].wait_for_http(
            f"{stack.gateway_url('canary-gateway-a')}/readyz", timeout=PROCESS_START_TIMEOUT_S
        )
        stable, canary = (
            stack.workers[name]
            .wait_for_log(WORKER_READY + r" .*model_version=(\w+)", timeout=PROCESS_START_TIMEOUT_S)
            .group(1)
            for name in ("canary-v1", "canary-v2")
        )
        assert stable != canary, "the two checkpoints announce one version"
        url, other_url = (stack.gateway_url(g) for g in ("canary-gateway-a", "canary-gateway-b"))
        for gateway in (url, other_url):
            processes.wait_until(
                lambda gateway=gateway: _ready_versions(gateway) == {stable, canary},
                timeout=30,
                what=f"both versions ready on {gateway}",
            )
        yield CanaryStack(stack, url, other_url, stable, canary)
    finally:
        for process in [*stack.gateways.values(), *stack.workers.values()]:
            process.signal(signal.SIGTERM)  # all drain at once; stop() then waits for each
        stack.stop()
        broker.stop()


def _ready_versions(url: str) -> set[str]:
    answer = httpx.get(f"{url}/v1/models/fmnist", timeout=10)
    if answer.status_code != 200:
        return set()
    return {v["version"] for v in answer.json()["versions"] if v["ready"]}


def _weights(url: str) -> dict[str, int]:
    return dict(httpx.get(f"{url}/v1/models/fmnist", timeout=10).json()["weights"])


@pytest.fixture(scope="module")
def split(canary_stack: CanaryStack) -> CanaryStack:
    """90/10 set on the first gateway with `fmnist models weights` (by version prefixes), and in
    force on the second."""
    stable, canary = canary_stack.stable, canary_stack.canary
    status = main(
        [
            "models",
            "weights",
            "fmnist",
            f"{stable[:8]}={100 - CANARY_PERCENT}",
            f"{canary[:8]}={CANARY_PERCENT}",
            "--reason",
            "canary v2",
            "--url",
            canary_stack.url,
        ]
    )
    assert status == 0
    wanted = {stable: 100 - CANARY_PERCENT, canary: CANARY_PERCENT}
    assert _weights(canary_stack.url) == wanted
    processes.wait_until(
        lambda: _weights(canary_stack.other_url) == wanted,
        timeout=10,
        what="the split in force on the second gateway",
    )
    return canary_stack


def _npy(images: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, images)
    return buffer.getvalue()


def _batch(url: str, body: bytes) -> list[dict[str, Any]]:
    answer = httpx.post(
        f"{url}/v1/predictions:batch?wait=30",
        content=body,
        headers={"Content-Type": "application/x-npy"},
        timeout=60,
    )
    assert answer.status_code == 200, answer.text[:500]
    return list(answer.json()["items"])


def test_a_90_10_split_sends_a_tenth_of_the_traffic_to_the_canary(
    split: CanaryStack, fashion_mnist_dir: Path
) -> None:
    """Of 2,000 unpinned requests, version 2 answers 10% ± 2 pp and version 1 the rest."""
    images, _ = load_test_images(fashion_mnist_dir, IMAGES)
    bodies = [_npy(images[i : i + PER_REQUEST]) for i in range(0, IMAGES, PER_REQUEST)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        items = [
            item for chunk in pool.map(lambda b: _batch(split.url, b), bodies) for item in chunk
        ]
    assert len(items) == IMAGES and all(item["status"] == "completed" for item in items)
    answered = Counter(item["model_version"] for item in items)
    assert set(answered) == {split.stable, split.canary}, answered
    share_pp = 100 * answered[split.canary] / IMAGES
    assert abs(share_pp - CANARY_PERCENT) <= TOLERANCE_PP, f"canary share {share_pp:.1f}%"


def test_a_repeated_idempotency_key_lands_on_the_same_version_on_any_gateway(
    split: CanaryStack, fashion_mnist_dir: Path
) -> None:
    """Each key sent to one gateway and again to the other is answered by one version both times."""
    images, _ = load_test_images(fashion_mnist_dir, KEYS)
    chosen: dict[str, list[str]] = {}
    for url in (split.url, split.other_url):
        with httpx.Client(base_url=url, timeout=30) as client:
            for index in range(KEYS):
                answer = client.post(
                    "/v1/predictions?wait=20",
                    content=_npy(images[index]),
                    headers={
                        "Content-Type": "application/x-npy",
                        "Idempotency-Key": f"canary-key-{index}",
                    },
                )
                assert answer.status_code == 200, answer.text
                chosen.setdefault(f"canary-key-{index}", []).append(answer.json()["model_version"])
    mismatched = {key: versions for key, versions in chosen.items() if len(set(versions)) > 1}
    assert mismatched == {}
    assert {versions[0] for versions in chosen.values()} == {split.stable, split.canary}


def test_models_history_lists_the_split(
    split: CanaryStack, capsys: pytest.CaptureFixture[str]
) -> None:
    """`fmnist models history` on the other gateway shows the weights change, percents and reason."""
    assert main(["models", "history", "fmnist", "--url", split.other_url]) == 0
    out = capsys.readouterr().out
    (line,) = [line for line in out.splitlines() if "canary v2" in line]
    assert line.split()[1] == "weights", out
    assert f"{split.stable}={100 - CANARY_PERCENT}%, {split.canary}={CANARY_PERCENT}%" in line, out
