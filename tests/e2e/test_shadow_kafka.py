"""Shadow traffic on Kafka (Tansu), each part its own process: a gateway, a serving worker of the
shipped model and `fmnist worker --shadow` of another checkpoint. Labelled test images sent to the
gateway are answered by the live version only, and GET /v1/models/fmnist/shadow compares the two."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ml import ImageClassifier
from tests.e2e import processes
from tests.e2e.conftest import (
    KAFKA_E2E_OPTIONS,
    PROCESS_START_TIMEOUT_S,
    WORKER_READY,
    Stack,
    _tansu_or_skip,
)

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.kafka,
    pytest.mark.data,
    pytest.mark.timeout(180),
]

SENT = 40
SHADOW_READY = r"event=shadow_worker_ready .*model_version=(\w+)"


@pytest.fixture(scope="module")
def shadow_stack(
    e2e_log_dir: Path, e2e_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Stack, str]]:
    """Tansu, a serving worker, a shadow worker of an untrained candidate and a gateway; yields the
    stack and the candidate's version."""
    candidate = tmp_path_factory.mktemp("shadow") / "candidate.safetensors"
    ImageClassifier(widths=(4, 8), convs_per_stage=(1, 1), seed=3).save(candidate)
    broker, port = _tansu_or_skip(e2e_log_dir, "shadow-tansu")
    broker_url = f"kafka://127.0.0.1:{port}?{KAFKA_E2E_OPTIONS}"
    stack = Stack(
        log_dir=e2e_log_dir,
        broker_url=broker_url,
        checkpoint=e2e_checkpoint,
        base_env=processes.broker_env(broker_url),
    )
    shadow = processes.fmnist(
        "shadow-worker",
        "worker",
        e2e_log_dir,
        {**stack.base_env, "FMNIST_WORKER_ID": "shadow-worker"},
        "--model",
        f"fmnist={candidate}",
        "--shadow",
    )
    try:
        # Both workers load torch at once; the gateway starts in a second.
        live = stack.start_worker("shadow-live-worker", wait_ready=False)
        shadow.start()
        live.wait_for_log(WORKER_READY, timeout=PROCESS_START_TIMEOUT_S)
        version = shadow.wait_for_log(SHADOW_READY, timeout=PROCESS_START_TIMEOUT_S).group(1)
        stack.start_gateway("shadow-gateway")
        yield stack, version
    finally:
        shadow.stop()
        stack.stop()
        broker.stop()


def _send_labelled(
    client: httpx.Client, pngs: list[bytes], labels: list[int]
) -> list[dict[str, Any]]:
    """POST `SENT` test images with their label in the metadata and wait for each answer."""
    answers = []
    for index in range(SENT):
        response = client.post(
            "/v1/predictions?wait=20",
            content=pngs[index],
            headers={
                "Content-Type": "image/png",
                "X-Fmnist-Metadata": json.dumps({"label": str(labels[index])}),
            },
        )
        assert response.status_code == 200, response.text
        answers.append(response.json())
    return answers


def test_the_shadow_endpoint_compares_a_candidate_on_live_traffic_that_clients_never_see(
    shadow_stack: tuple[Stack, str], test_pngs: tuple[list[bytes], list[int]]
) -> None:
    """Labelled images get live answers only; the endpoint reports every one of them joined with
    the candidate's, the live accuracy the clients saw, and the untrained candidate's disagreement."""
    stack, candidate = shadow_stack
    pngs, labels = test_pngs
    with httpx.Client(base_url=stack.gateway_url("shadow-gateway"), timeout=30) as client:
        processes.wait_until(
            lambda: any(
                v["role"] == "shadow" and v["shadow_workers"]
                for v in client.get("/v1/models/fmnist").json()["versions"]
            ),
            timeout=20,
            what="the gateway to learn the shadow version",
        )
        answers = _send_labelled(client, pngs, labels)
        report: dict[str, Any] = {}

        def joined() -> bool:
            report.update(client.get("/v1/models/fmnist/shadow").json())
            return bool(report["candidates"]) and report["candidates"][0]["samples"] >= SENT

        processes.wait_until(joined, timeout=30, what=f"{SENT} joined shadow samples")
        pinned = client.post(
            f"/v1/predictions?version={candidate}",
            content=pngs[0],
            headers={"Content-Type": "image/png"},
        )
    assert all(a["model_version"] != candidate for a in answers)
    (entry,) = report["candidates"]
    live_correct = sum(a["label"] == labels[i] for i, a in enumerate(answers)) / SENT
    assert (entry["version"], entry["samples"], entry["labelled"]) == (candidate, SENT, SENT)
    assert entry["live_accuracy"] == pytest.approx(live_correct)
    assert entry["candidate_accuracy"] < entry["live_accuracy"]
    assert entry["agreement"] < 0.5  # an untrained candidate
    assert entry["disagreement"]
    assert entry["candidate_latency_ms"]["p50"] is not None
    assert (pinned.status_code, pinned.json()["error"]["code"]) == (409, "version_is_shadow")
