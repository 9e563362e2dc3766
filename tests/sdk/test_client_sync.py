"""`Client` (sync) against the real app and worker served by uvicorn on a free port."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from fmnist_client import Client, NotFound, Prediction, Unavailable
from PIL import Image

from tests.conftest import REPO_ROOT
from tests.e2e.processes import free_port
from tests.sdk.conftest import LiveServer

pytestmark = pytest.mark.timeout(60)

EXAMPLES = REPO_ROOT / "clients" / "python" / "examples"


@pytest.fixture
def server(live_server: Callable[..., LiveServer]) -> LiveServer:
    return live_server()


def test_every_input_kind_is_classified(server: LiveServer, tmp_path: Path) -> None:
    """A path, bytes, a file object, a PIL image and an array of the same picture get the same answer."""
    path = EXAMPLES / "ankle-boot.png"
    with Image.open(path) as opened:
        picture = opened.copy()
    with Client(server.url) as client, path.open("rb") as handle:
        answers = [
            client.predict(path),
            client.predict(str(path)),
            client.predict(path.read_bytes()),
            client.predict(handle),
            client.predict(picture),
            client.predict(np.asarray(picture)),
        ]
    assert all(isinstance(a, Prediction) and a.status == "completed" for a in answers)
    assert len({a.label for a in answers}) == 1
    assert np.allclose([a.probabilities for a in answers], answers[0].probabilities, atol=1e-5)


def test_submit_get_and_result(server: LiveServer) -> None:
    """submit() then handle.result() completes; get() of a made-up id raises NotFound."""
    with Client(server.url) as client:
        handle = client.submit(EXAMPLES / "sneaker.png", metadata={"source": "test"})
        prediction = handle.result(timeout=30)
        with pytest.raises(NotFound):
            client.get("feedfacefeedface")
    assert prediction.request_id == handle.request_id and prediction.metadata == {"source": "test"}


def test_predict_many_from_threads(server: LiveServer) -> None:
    """predict_many() with 4 threads returns one prediction per image, in order, with progress."""
    paths = sorted(EXAMPLES.glob("*.png"))
    seen: list[int] = []
    with Client(server.url) as client:
        predictions = client.predict_many(
            paths * 2, concurrency=4, progress=lambda done, _: seen.append(done)
        )
    assert len(predictions) == 2 * len(paths)
    assert [p.label for p in predictions[: len(paths)]] == [
        p.label for p in predictions[len(paths) :]
    ]
    assert sorted(seen) == list(range(1, 2 * len(paths) + 1))


def test_unreachable_gateway_raises_unavailable_after_retries() -> None:
    """A port nobody listens on: connection refused, retried, then Unavailable telling what to check."""
    client = Client(f"http://127.0.0.1:{free_port()}", retries=1, backoff=0.01)
    with client, pytest.raises(Unavailable, match="fmnist serve") as caught:
        client.get("x")
    assert caught.value.code == "connection_error" and caught.value.status_code is None
