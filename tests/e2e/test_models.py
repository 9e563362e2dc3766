"""Models end to end: your own checkpoint (RGB 32×32, 4 classes) and an exported torchvision model, each
served by `fmnist serve --model` with no other setting; two models side by side on the embedded broker
and on Kafka (separate gateway and worker processes); version pinning and model errors through HTTP
and the SDK."""

from __future__ import annotations

import io
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from fmnist_client import Client, NotFound, Unavailable

from app.cli import main
from tests.e2e import processes
from tests.e2e.conftest import KAFKA_E2E_OPTIONS, PROCESS_START_TIMEOUT_S, WORKER_READY
from tests.ml.shapes import SHAPE_NAMES, shape_image, write_shape_folder

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

MOBILENET = (
    Path(__file__).resolve().parents[2] / "examples" / "torchvision" / "mobilenet_v3_small.pt2"
)
UPLOADS_PER_CLASS = 4


@pytest.fixture(scope="session")
def colours_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny checkpoint trained by `fmnist train --data` on a generated RGB 32×32, 4-class folder."""
    root = tmp_path_factory.mktemp("colours")
    data = write_shape_folder(root / "shapes", per_class=60, seed=0)
    out = root / "colours.safetensors"
    flags = ["--epochs", "6", "--widths", "8,16", "--convs", "1,1", "--no-progress", "--no-report"]
    assert main(["train", "--data", str(data), *flags, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def shape_uploads() -> list[tuple[bytes, str]]:
    """Fresh shape images (not the training ones) as PNG uploads, with their class."""
    rng = np.random.default_rng(99)
    uploads = []
    for name in SHAPE_NAMES:
        for _ in range(UPLOADS_PER_CLASS):
            buffer = io.BytesIO()
            shape_image(name, rng).save(buffer, "PNG")
            uploads.append((buffer.getvalue(), name))
    return uploads


def correct(url: str, uploads: list[tuple[bytes, str]], model: str | None) -> tuple[int, set[str]]:
    """How many uploads the model (None: the default) classifies right, and the model names answering."""
    path = "/v1/predictions" if model is None else f"/v1/models/{model}/predictions"
    hits, models = 0, set()
    with httpx.Client(base_url=url, timeout=30) as client:
        for data, expected in uploads:
            response = client.post(
                f"{path}?wait=20", content=data, headers={"Content-Type": "image/png"}
            )
            assert response.status_code == 200, response.text
            body = response.json()
            hits += body["class_name"] == expected
            models.add(body["model"])
    return hits, models


def fashion_uploads(
    test_pngs: tuple[list[bytes], list[int]], count: int
) -> list[tuple[bytes, str]]:
    from ml import CLASS_NAMES

    pngs, labels = test_pngs
    return [(pngs[i], CLASS_NAMES[labels[i]]) for i in range(count)]


def serve(log_dir: Path, name: str, *models: str) -> tuple[processes.ManagedProcess, str]:
    """`fmnist serve --model ... --model ...` on a free port (no other setting)."""
    port = processes.free_port()
    env = {"FMNIST_HOST": "127.0.0.1", "FMNIST_PORT": str(port)}
    flags = [word for model in models for word in ("--model", model)]
    process = processes.fmnist(name, "serve", log_dir, env, *flags)
    return process, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def two_models(e2e_log_dir: Path, e2e_checkpoint: Path, colours_checkpoint: Path) -> Iterator[str]:
    """`fmnist serve --model fmnist=<shipped> --model colours=<trained>`; yields its URL."""
    process, url = serve(
        e2e_log_dir, "serve-two-models", f"fmnist={e2e_checkpoint}", f"colours={colours_checkpoint}"
    )
    with processes.stopping(process.start()):
        process.wait_for_http(f"{url}/readyz", timeout=PROCESS_START_TIMEOUT_S)
        yield url


def test_two_models_side_by_side_classify_their_own_uploads(
    two_models: str,
    shape_uploads: list[tuple[bytes, str]],
    test_pngs: tuple[list[bytes], list[int]],
) -> None:
    """On the embedded broker, colours classifies RGB shapes and the default fmnist real test images."""
    listed = httpx.get(f"{two_models}/v1/models").json()
    shapes = {m["name"]: m["input_shape"] for m in listed["models"]}
    assert (
        shapes == {"fmnist": [1, 28, 28], "colours": [3, 32, 32]} and listed["default"] == "fmnist"
    )
    colour_hits, colour_models = correct(two_models, shape_uploads, "colours")
    fashion_hits, fashion_models = correct(two_models, fashion_uploads(test_pngs, 20), None)
    assert (colour_models, fashion_models) == ({"colours"}, {"fmnist"})
    assert colour_hits >= 0.8 * len(shape_uploads)  # chance is a quarter
    assert fashion_hits >= 16  # the shipped model scores ~93 %


def test_the_sdk_pins_versions_and_reports_model_errors(
    two_models: str, shape_uploads: list[tuple[bytes, str]]
) -> None:
    """Through the SDK: a pinned version answers with that version; unknown model or version: NotFound."""
    data, _ = shape_uploads[0]
    with Client(two_models, retries=0) as client:
        colours = client.model("colours")
        version = colours.versions[0].version
        pinned = client.predict(data, model="colours", version=version)
        with pytest.raises(NotFound) as no_model:
            client.predict(data, model="nope")
        with pytest.raises(NotFound) as no_version:
            client.predict(data, model="colours", version="nope")
    assert (pinned.model, pinned.model_version) == ("colours", version)
    assert no_model.value.code == "model_not_found" and "colours" in no_model.value.message
    assert no_version.value.code == "version_not_found" and version in no_version.value.message


@pytest.mark.data
def test_an_exported_torchvision_model_is_served_by_its_path_alone(
    e2e_log_dir: Path, test_pngs: tuple[list[bytes], list[int]]
) -> None:
    """`fmnist serve --model mobilenet_v3_small.pt2` (spec beside it) classifies real uploads."""
    process, url = serve(e2e_log_dir, "serve-mobilenet", str(MOBILENET))
    with processes.stopping(process.start()):
        process.wait_for_http(f"{url}/readyz", timeout=240)
        model = httpx.get(f"{url}/v1/models/mobilenet-fmnist").json()
        hits, models = correct(url, fashion_uploads(test_pngs, 40), None)
    assert model["versions"][0]["tag"] == "v1" and model["ready"]
    assert models == {"mobilenet-fmnist"}
    assert hits >= 24  # chance is 4 of 40; the export reports 77 % on the whole test set


@pytest.mark.kafka
def test_two_models_on_kafka_scale_and_fail_on_their_own(
    e2e_log_dir: Path,
    e2e_checkpoint: Path,
    colours_checkpoint: Path,
    shape_uploads: list[tuple[bytes, str]],
) -> None:
    """On Kafka, one worker process per model and a gateway process; a drained worker's model answers
    503 + Retry-After while the other model keeps answering."""
    port = processes.free_port()
    try:
        broker = processes.tansu(port, e2e_log_dir, name="tansu-models").start()
        broker.wait_for_port(port, timeout=20)
    except processes.ProcessFailed as error:
        from tests.conftest import missing_service

        missing_service(f"Tansu did not start: {error}")
        raise
    env = processes.broker_env(f"kafka://127.0.0.1:{port}?{KAFKA_E2E_OPTIONS}")
    fashion = processes.fmnist(
        "worker-fmnist", "worker", e2e_log_dir, env, "--model", f"fmnist={e2e_checkpoint}"
    )
    colours = processes.fmnist(
        "worker-colours", "worker", e2e_log_dir, env, "--model", f"colours={colours_checkpoint}"
    )
    gateway_port = processes.free_port()
    gateway = processes.fmnist(
        "gateway-models", "gateway", e2e_log_dir,
        {**env, "FMNIST_HOST": "127.0.0.1", "FMNIST_PORT": str(gateway_port)},
    )  # fmt: skip
    url = f"http://127.0.0.1:{gateway_port}"
    with processes.stopping(broker, fashion.start(), colours.start(), gateway.start()):
        for worker in (fashion, colours):
            worker.wait_for_log(WORKER_READY, timeout=PROCESS_START_TIMEOUT_S)
        gateway.wait_for_http(f"{url}/readyz", timeout=PROCESS_START_TIMEOUT_S)
        hits, models = correct(url, shape_uploads, "colours")
        colours.signal(signal.SIGTERM)
        colours.wait_for_log(r"event=worker_drained", timeout=30)
        gone = httpx.post(
            f"{url}/v1/models/colours/predictions",
            content=shape_uploads[0][0],
            headers={"Content-Type": "image/png"},
        )
        with Client(url, retries=0) as client, pytest.raises(Unavailable) as unavailable:
            client.predict(shape_uploads[0][0], model="colours")
        _, still_answering = correct(url, shape_uploads[:2], "fmnist")
    assert models == {"colours"} and hits >= 0.8 * len(shape_uploads)
    assert gone.status_code == 503 and gone.json()["error"]["code"] == "model_unavailable"
    assert int(gone.headers["retry-after"]) >= 1
    assert unavailable.value.code == "model_unavailable"
    assert still_answering == {"fmnist"}  # the other model still answers 200
