"""`fmnist replay` as a process on Kafka (Tansu): the retained requests of a live gateway and worker
re-run through a candidate, joined with the live results, and reported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ml import ImageClassifier
from tests.e2e import processes
from tests.e2e.conftest import Stack, tansu_stack

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.kafka,
    pytest.mark.data,
    pytest.mark.timeout(180),
]

SENT = 200
REPLAY_TIMEOUT_S = 90.0


@pytest.fixture(scope="module")
def replay_stack(
    e2e_log_dir: Path, e2e_checkpoint: Path, test_pngs: tuple[list[bytes], list[int]]
) -> Iterator[Stack]:
    """Tansu, one worker of the shipped model and a gateway, after 200 labelled test images were
    sent and answered."""
    with tansu_stack(e2e_log_dir, e2e_checkpoint, "replay-tansu") as stack:
        stack.ensure_workers("replay-worker")
        stack.start_gateway("replay-gateway")
        _send_labelled(stack.gateway_url("replay-gateway"), *test_pngs)
        yield stack


def _send_labelled(url: str, pngs: list[bytes], labels: list[int]) -> None:
    """POST the first `SENT` images with their label in the metadata, as `fmnist send-images` does,
    and wait until every one is answered."""
    with httpx.Client(base_url=url, timeout=30) as client:
        ids = []
        for index in range(SENT):
            answer = client.post(
                "/v1/predictions",
                content=pngs[index],
                headers={
                    "Content-Type": "image/png",
                    "X-Fmnist-Metadata": json.dumps({"label": str(labels[index])}),
                },
            )
            assert answer.status_code == 202, answer.text
            ids.append(answer.json()["request_id"])
        deadline = time.monotonic() + 60
        for request_id in ids:
            while client.get(f"/v1/predictions/{request_id}").json()["status"] == "pending":
                assert time.monotonic() < deadline, f"{request_id} still pending"
                time.sleep(0.05)


def _replay(
    stack: Stack, candidate: Path, out: Path, *extra: str
) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "app", "replay", "--model", "fmnist", "--version", str(candidate)]
    argv += ["--last", str(SENT), "--out", str(out), "--no-progress", "--quiet", "2", *extra]
    return subprocess.run(
        argv,
        env={**os.environ, **stack.base_env},
        cwd=processes.REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=REPLAY_TIMEOUT_S,
        check=False,
    )


def _summary(out: Path) -> dict[str, object]:
    summary: dict[str, object] = json.loads((out / "summary.json").read_text())
    return summary


def test_replay_of_the_live_model_agrees_with_it(replay_stack: Stack, tmp_path: Path) -> None:
    """Replaying the shipped model against itself: a report, agreement 1.0, the live accuracy."""
    out = tmp_path / "same"
    done = _replay(replay_stack, replay_stack.checkpoint, out)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = _summary(out)
    assert (out / "report.md").is_file() and (out / "confusion.png").is_file()
    assert summary["pairs"] == SENT and summary["labelled"] == SENT
    assert summary["agreement"] == 1.0
    assert summary["candidate_accuracy"] == summary["live_accuracy"]
    assert "agreement      100.00%" in done.stdout


def test_replay_of_an_untrained_candidate_disagrees(replay_stack: Stack, tmp_path: Path) -> None:
    """An untrained candidate agrees with the live model on fewer than half the requests."""
    candidate = tmp_path / "untrained.safetensors"
    ImageClassifier(widths=(4, 8), convs_per_stage=(1, 1), seed=3).save(candidate)
    out = tmp_path / "untrained"
    done = _replay(replay_stack, candidate, out, "--runtime", "eager")
    assert done.returncode == 0, done.stdout + done.stderr
    summary = _summary(out)
    assert summary["pairs"] == SENT
    assert isinstance(summary["agreement"], float) and summary["agreement"] < 0.5
    assert isinstance(summary["live_accuracy"], float) and summary["live_accuracy"] > 0.8
