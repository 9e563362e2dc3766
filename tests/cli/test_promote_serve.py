"""`fmnist promote` against a real `fmnist serve --model fmnist=A --model fmnist=B --shadow B`: one
process serves both versions and shadows the candidate, and the promotion moves all traffic to it."""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
import pytest

from app.cli import main
from tests.cli.test_serve_and_gateway import fmnist
from tests.cli.test_serve_replay import send_labelled, shadow_samples
from tests.e2e.images import load_test_pngs
from tests.gateway.helpers import fashion_like, png_bytes

pytestmark = [pytest.mark.e2e, pytest.mark.data, pytest.mark.timeout(120)]

SAMPLES = 12  # labelled images the candidate's shadow compares before the promotion


def wait_for_log(log: Path, pattern: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while re.search(pattern, log.read_text()) is None:
        assert time.monotonic() < deadline, f"{pattern!r} not logged:\n{log.read_text()}"
        time.sleep(0.05)


def test_promote_moves_serve_to_the_candidate_it_serves_and_shadows(
    tmp_path: Path, shipped_checkpoint: Path, fashion_mnist_dir: Path
) -> None:
    """With the live version held at 100 and labelled traffic compared by the shadow, `fmnist
    promote` passes the gate, steps to 100%, records each decision, and unpinned requests then
    reach the candidate."""
    from ml import ImageClassifier

    # The untrained checkpoint the other serve tests load too, so that no test compiles it again.
    candidate_path = tmp_path / "model.safetensors"
    ImageClassifier(seed=3).save(candidate_path)
    models = ["--model", f"fmnist={shipped_checkpoint}", "--model", f"fmnist={candidate_path}"]
    log = tmp_path / "serve.log"
    args = ["--port", "0", "--grpc-port", "0", *models, "--shadow", str(candidate_path)]
    with fmnist("serve", *args, log=log) as (_, url):
        versions = httpx.get(f"{url}/v1/models/fmnist").json()["versions"]
        live = next(v["version"] for v in versions if v["ready"] and not v["shadow_workers"])
        candidate = next(v["version"] for v in versions if v["ready"] and v["shadow_workers"])
        held = httpx.put(f"{url}/v1/models/fmnist/weights", json={"weights": {live: 100}})
        assert held.status_code == 200, held.text
        wait_for_log(log, rf"event=shadow_topic_joined .*topic=fmnist\.requests\.fmnist\.v-{live}")
        pngs, labels = load_test_pngs(fashion_mnist_dir, SAMPLES)
        answered = {a["model_version"] for a in send_labelled(url, pngs, labels)}
        shadow_samples(url, candidate, SAMPLES)
        status = main(
            [
                *("promote", "fmnist", candidate[:8], "--url", url),
                *("--min-agreement", "0", "--min-accuracy", "0", "--min-samples", str(SAMPLES)),
                *("--steps", "50,100", "--step-s", "0.2"),
            ]
        )
        model = httpx.get(f"{url}/v1/models/fmnist").json()
        history = httpx.get(f"{url}/v1/models/fmnist/history").json()["events"]
        after = httpx.post(
            f"{url}/v1/predictions?wait=20",
            content=png_bytes(fashion_like()),
            headers={"Content-Type": "image/png"},
            timeout=30,
        ).json()
    assert answered == {live}
    assert status == 0
    assert model["weights"] == {candidate: 100}
    actions = [e["action"] for e in history if e["kind"] == "event"]
    splits = [e["weights"].get(candidate, 0) for e in history if e["kind"] == "weights"]
    assert actions == ["started", "gate_passed", "step", "step", "promoted"], actions
    assert splits == [0, 50, 100]
    assert after["model_version"] == candidate
