"""`AsyncClient` against the real gateway app and an in-process worker, through `httpx.ASGITransport`."""

from __future__ import annotations

import io

import numpy as np
import pytest
from fmnist_client import BadRequest, NotFound, Prediction, Timeout, Unauthorized
from PIL import Image

from tests.sdk.conftest import ClientFactory

pytestmark = pytest.mark.timeout(60)

IMAGE = (np.arange(28 * 28) % 256).astype(np.uint8).reshape(28, 28)


def noise_png(size: int) -> bytes:
    """A PNG that barely compresses: random pixels, `size`×`size`."""
    pixels = np.random.default_rng(0).integers(0, 256, size=(size, size), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


async def test_predict_returns_a_completed_prediction(asgi_client: ClientFactory) -> None:
    """predict() of a numpy image comes back completed with every documented field filled in."""
    async with asgi_client() as client:
        prediction = await client.predict(IMAGE, metadata={"label": "3"})
    assert isinstance(prediction, Prediction) and prediction.status == "completed"
    assert prediction.label is not None and prediction.probabilities is not None
    assert len(prediction.probabilities) == 10 and prediction.class_name is not None
    assert max(prediction.probabilities) == prediction.probabilities[prediction.label]
    assert prediction.batch_size is not None and prediction.batch_size >= 1
    assert prediction.model_version and prediction.batch_id and prediction.worker_id
    assert prediction.queue_ms is not None and prediction.inference_ms is not None
    assert prediction.metadata == {"label": "3"}


async def test_submit_then_get_and_result(asgi_client: ClientFactory) -> None:
    """submit() returns at once with an id; get() shows it; handle.result() waits for completion."""
    async with asgi_client() as client:
        handle = await client.submit(IMAGE, metadata={"k": "v"})
        first = await client.get(handle.request_id)
        done = await handle.result(timeout=30)
    assert first.request_id == handle.request_id and first.status in ("pending", "completed")
    assert done.status == "completed" and done.request_id == handle.request_id
    assert done.metadata == {"k": "v"}


async def test_predict_many_keeps_order_and_reports_progress(asgi_client: ClientFactory) -> None:
    """predict_many() answers in input order and calls progress(done, total) once per image."""
    images = [np.full((28, 28), value, dtype=np.uint8) for value in (0, 80, 160, 240)]
    seen: list[tuple[int, int]] = []
    async with asgi_client() as client:
        predictions = await client.predict_many(
            images, concurrency=4, progress=lambda d, t: seen.append((d, t))
        )
        singles = [await client.predict(image) for image in images]
    many = np.array([p.probabilities for p in predictions])
    one_by_one = np.array([p.probabilities for p in singles])
    # The four images' outputs differ by far more than batching's float noise, so order shows.
    assert (
        np.abs(one_by_one[:, None] - one_by_one[None]).max(axis=2)[~np.eye(4, dtype=bool)].min()
        > 1e-4
    )
    assert np.allclose(many, one_by_one, atol=1e-5)
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]


async def test_predict_many_can_return_errors_in_place(asgi_client: ClientFactory) -> None:
    """With return_exceptions=True a bad image yields its error at its index; the others still complete."""
    async with asgi_client() as client:
        outcomes = await client.predict_many([IMAGE, b"junk", IMAGE], return_exceptions=True)
    assert isinstance(outcomes[0], Prediction) and isinstance(outcomes[2], Prediction)
    assert isinstance(outcomes[1], BadRequest)


async def test_unknown_id_raises_not_found(asgi_client: ClientFactory) -> None:
    """GET of an id never submitted raises NotFound with the server's code and the id."""
    async with asgi_client() as client:
        with pytest.raises(NotFound) as caught:
            await client.get("0123456789abcdef")
    assert (caught.value.status_code, caught.value.code, caught.value.request_id) == (
        404,
        "not_found",
        "0123456789abcdef",
    )


async def test_bytes_that_are_no_image_raise_bad_request_415(asgi_client: ClientFactory) -> None:
    """Bytes of no supported image format are refused: BadRequest, 415, code unsupported_media_type."""
    async with asgi_client() as client:
        with pytest.raises(BadRequest) as caught:
            await client.predict(b"these bytes are not an image")
    assert (caught.value.status_code, caught.value.code) == (415, "unsupported_media_type")


async def test_oversized_upload_raises_bad_request_413(asgi_client: ClientFactory) -> None:
    """An upload above FMNIST_MAX_UPLOAD_BYTES is refused: BadRequest, 413, with the limit in the message."""
    async with asgi_client(max_upload_bytes=2048) as client:
        with pytest.raises(BadRequest) as caught:
            await client.predict(noise_png(64))
    assert (caught.value.status_code, caught.value.code) == (413, "payload_too_large")
    assert "FMNIST_MAX_UPLOAD_BYTES" in str(caught.value)


async def test_corrupt_image_raises_bad_request_422(asgi_client: ClientFactory) -> None:
    """A truncated PNG is refused: BadRequest, 422, code invalid_image."""
    async with asgi_client() as client:
        with pytest.raises(BadRequest) as caught:
            await client.predict(noise_png(28)[:100])
    assert (caught.value.status_code, caught.value.code) == (422, "invalid_image")


@pytest.mark.parametrize(("api_key", "status"), [(None, 401), ("wrong", 403)])
async def test_missing_or_wrong_key_raises_unauthorized(
    asgi_client: ClientFactory, api_key: str | None, status: int
) -> None:
    """With auth on, no key is 401 and a wrong key 403, both Unauthorized."""
    async with asgi_client(api_key=api_key, api_keys="right") as client:
        with pytest.raises(Unauthorized) as caught:
            await client.submit(IMAGE)
    assert caught.value.status_code == status


async def test_right_key_is_sent_as_bearer(asgi_client: ClientFactory) -> None:
    """The client's api_key is accepted by a gateway with auth on."""
    async with asgi_client(api_key="right", api_keys="right") as client:
        prediction = await client.predict(IMAGE)
    assert prediction.status == "completed"


async def test_no_result_in_time_raises_timeout_with_the_id(asgi_client: ClientFactory) -> None:
    """Without a worker, predict(wait=…) raises Timeout naming the request id to fetch later."""
    async with asgi_client(worker=False) as client:
        with pytest.raises(Timeout) as caught:
            await client.predict(IMAGE, wait=0.2)
        assert caught.value.request_id is not None
        assert (await client.get(caught.value.request_id)).status == "pending"
