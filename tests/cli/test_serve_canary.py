"""`fmnist serve` with two versions of one model: a canary split on the embedded broker."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import httpx
import pytest

from tests.cli.test_serve_and_gateway import fmnist
from tests.gateway.helpers import fashion_like, png_bytes

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


def test_serve_splits_one_model_between_two_versions(
    tmp_path: Path, shipped_checkpoint: Path
) -> None:
    """`--model fmnist=A --model fmnist=B` serves two versions; under 50/50 both answer, as counted live."""
    from ml import ImageClassifier

    # The two checkpoints the other serve tests load too, so that no test compiles a model again.
    candidate = tmp_path / "model.safetensors"
    ImageClassifier(seed=3).save(candidate)
    models = [
        arg for source in (shipped_checkpoint, candidate) for arg in ("--model", f"fmnist={source}")
    ]
    with fmnist("serve", "--port", "0", *models, log=tmp_path / "serve.log") as (_, url):
        versions = [v["version"] for v in httpx.get(f"{url}/v1/models/fmnist").json()["versions"]]
        put = httpx.put(
            f"{url}/v1/models/fmnist/weights", json={"weights": dict.fromkeys(versions, 50)}
        )
        answered = Counter(
            httpx.post(
                f"{url}/v1/predictions?wait=20",
                content=png_bytes(fashion_like(i)),
                headers={"Content-Type": "image/png", "Idempotency-Key": f"canary-{i}"},
                timeout=30,
            ).json()["model_version"]
            for i in range(20)
        )
        model = httpx.get(f"{url}/v1/models/fmnist").json()
    assert len(versions) == 2 and put.status_code == 200, put.text
    assert set(answered) == set(versions), answered
    assert {v["version"]: v["live"]["requests"] for v in model["versions"]} == answered
