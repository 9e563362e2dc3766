"""predict_many(): images go in batch requests, answers keep input order, per-image errors stay per image."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from fmnist_client import AsyncClient, BadRequest, Client, FmnistError, Overloaded, Prediction

from tests.conftest import REPO_ROOT
from tests.sdk.conftest import ClientFactory, LiveServer

PNG = b"\x89PNG\r\n\x1a\n..."
EXAMPLES = REPO_ROOT / "clients" / "python" / "examples"


def file_bodies(request: httpx.Request) -> list[bytes]:
    """The bytes of each part of a multipart request, in order."""
    boundary = request.headers["content-type"].split("boundary=")[1].encode()
    parts = request.content.split(b"--" + boundary)[1:-1]
    return [part.split(b"\r\n\r\n", 1)[1].removesuffix(b"\r\n") for part in parts]


class BatchGateway:
    """A mock `POST /v1/predictions:batch`: answers per file, refusing files whose bytes say so."""

    def __init__(self, first_status: int | None = None) -> None:
        self.requests: list[httpx.Request] = []
        self.first_status = first_status

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        assert request.url.path == "/v1/predictions:batch"
        if self.first_status is not None and len(self.requests) == 1:
            return httpx.Response(self.first_status, headers={"Retry-After": "0"})
        bodies = file_bodies(request)
        items = []
        for index, body in enumerate(bodies):
            if body.startswith(b"refuse:"):
                code = body.removeprefix(b"refuse:").decode()
                items.append(
                    {"index": index, "error": {"code": code, "message": code, "request_id": None}}
                )
            else:
                items.append({"request_id": body.decode(), "status": "completed", "label": 1})
        return httpx.Response(200, json={"items": items})


def test_images_travel_batch_size_per_request_in_order() -> None:
    """10 images with batch_size=4 take 3 batch requests; the answers come back in input order."""
    gateway = BatchGateway()
    images = [f"img{i}".encode() for i in range(10)]
    with Client("http://fmnist.test", transport=httpx.MockTransport(gateway)) as client:
        predictions = client.predict_many(images, batch_size=4, concurrency=2)
    assert len(gateway.requests) == 3
    assert [p.request_id for p in predictions] == [f"img{i}" for i in range(10)]


def test_a_refused_image_yields_its_own_error() -> None:
    """Per-image refusals map by code (too_many_requests → Overloaded, others → BadRequest);
    the other images still get their predictions."""
    gateway = BatchGateway()
    images = [b"a", b"refuse:unsupported_media_type", b"b", b"refuse:too_many_requests"]
    with Client("http://fmnist.test", transport=httpx.MockTransport(gateway)) as client:
        outcomes = client.predict_many(images, return_exceptions=True)
    assert isinstance(outcomes[0], Prediction) and isinstance(outcomes[2], Prediction)
    assert isinstance(outcomes[1], BadRequest) and outcomes[1].code == "unsupported_media_type"
    assert isinstance(outcomes[3], Overloaded)


def test_without_return_exceptions_the_first_error_is_raised() -> None:
    """return_exceptions=False raises the first image's error (after the others were answered)."""
    gateway = BatchGateway()
    with (
        Client("http://fmnist.test", transport=httpx.MockTransport(gateway)) as client,
        pytest.raises(BadRequest),
    ):
        client.predict_many([b"a", b"refuse:invalid_image", b"refuse:unsupported_media_type"])


def test_a_429_batch_is_retried_whole_with_the_same_idempotency_key() -> None:
    """A 429 for the whole batch is retried; the multipart body and Idempotency-Key are resent as they were."""
    gateway = BatchGateway(first_status=429)
    with Client("http://fmnist.test", transport=httpx.MockTransport(gateway)) as client:
        client._sleep = lambda seconds: None
        predictions = client.predict_many([b"x", b"y"])
    first, second = gateway.requests
    assert first.headers["Idempotency-Key"] == second.headers["Idempotency-Key"]
    assert first.content == second.content
    assert [p.request_id for p in predictions] == ["x", "y"]


def test_a_refused_batch_marks_each_of_its_images() -> None:
    """A batch refused as a whole (413 here) gives each of its images that error."""
    body = {"error": {"code": "payload_too_large", "message": "too big", "request_id": None}}
    transport = httpx.MockTransport(lambda request: httpx.Response(413, json=body))
    with Client("http://fmnist.test", transport=transport) as client:
        outcomes = client.predict_many([b"a", b"b", b"c"], batch_size=2, return_exceptions=True)
    assert [type(o) for o in outcomes] == [BadRequest] * 3
    assert all(isinstance(o, FmnistError) and o.status_code == 413 for o in outcomes)


async def test_async_predict_many_batches_and_keeps_order() -> None:
    """The async client batches the same way and reports progress once per image."""
    gateway = BatchGateway()
    seen: list[int] = []
    images = [f"img{i}".encode() for i in range(7)]
    async with AsyncClient("http://fmnist.test", transport=httpx.MockTransport(gateway)) as client:
        predictions = await client.predict_many(
            images, batch_size=3, progress=lambda done, _: seen.append(done)
        )
    assert len(gateway.requests) == 3
    assert [p.request_id for p in predictions] == [f"img{i}" for i in range(7)]
    assert seen == list(range(1, 8))


@pytest.mark.parametrize(("batch_size", "concurrency"), [(0, 1), (1, 0)])
def test_bad_sizes_are_refused(batch_size: int, concurrency: int) -> None:
    """batch_size and concurrency below 1 are a ValueError before anything is sent."""
    client = Client("http://fmnist.test", transport=httpx.MockTransport(BatchGateway()))
    with client, pytest.raises(ValueError, match=">= 1"):
        client.predict_many([PNG], batch_size=batch_size, concurrency=concurrency)


def test_an_unreadable_file_takes_its_place_and_the_rest_are_classified(
    live_server: Callable[..., LiveServer], tmp_path: Path
) -> None:
    """A missing file among real images comes back in place as BadRequest(unreadable_image) with
    return_exceptions=True; the images around it, in the same batch, are classified."""
    server = live_server()
    missing = tmp_path / "no-such-image.png"
    images = [EXAMPLES / "sneaker.png", missing, EXAMPLES / "trouser.png"]
    with Client(server.url) as client:
        outcomes = client.predict_many(images, batch_size=8, return_exceptions=True)
    first, error, last = outcomes
    assert isinstance(first, Prediction) and first.status == "completed"
    assert isinstance(last, Prediction) and last.status == "completed"
    assert isinstance(error, BadRequest) and error.code == "unreadable_image"
    assert str(missing) in error.message and isinstance(error.__cause__, FileNotFoundError)


async def test_async_predict_many_returns_an_unreadable_file_in_place(
    asgi_client: ClientFactory, tmp_path: Path
) -> None:
    """The async client does the same: a missing file is its own error, the others are answered."""
    async with asgi_client() as client:
        outcomes = await client.predict_many(
            [tmp_path / "gone.png", EXAMPLES / "sandal.png"], return_exceptions=True
        )
    assert isinstance(outcomes[0], BadRequest) and outcomes[0].code == "unreadable_image"
    assert isinstance(outcomes[1], Prediction) and outcomes[1].status == "completed"


def test_without_return_exceptions_an_unreadable_file_is_raised(
    live_server: Callable[..., LiveServer], tmp_path: Path
) -> None:
    """return_exceptions=False raises the unreadable file's BadRequest (a FmnistError, one except)."""
    server = live_server()
    with (
        Client(server.url) as client,
        pytest.raises(BadRequest, match="image file not found"),
    ):
        client.predict_many([EXAMPLES / "sneaker.png", tmp_path / "gone.png"])
