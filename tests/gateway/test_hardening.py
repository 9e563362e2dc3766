"""The edge refuses bad input with the right 4xx JSON error and survives overload and a broker outage."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator, Mapping

import numpy as np
import pytest
from PIL import Image
from websockets.asyncio.client import connect

import messaging
from app.settings import Settings
from messaging import BrokerUnavailable, PubSub
from tests.gateway.helpers import (
    announce_model,
    encode,
    fashion_like,
    gateway_settings,
    png_bytes,
    running_gateway,
    serving,
)

pytestmark = pytest.mark.timeout(30)

PNG = {"Content-Type": "image/png"}


def assert_error(response: object, status: int, code: str) -> dict[str, object]:
    """The response has `status` and our error body with `code`."""
    assert response.status_code == status, response.text  # type: ignore[attr-defined]
    body = response.json()  # type: ignore[attr-defined]
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


# --- size limits ----------------------------------------------------------------------------


async def test_upload_over_the_limit_by_content_length_is_413() -> None:
    """A Content-Length above FMNIST_MAX_UPLOAD_BYTES is refused before the body is read."""
    async with running_gateway(gateway_settings(max_upload_bytes=1000)) as (_, client):
        response = await client.post(
            "/v1/predictions", content=b"\x89PNG" + b"0" * 2000, headers=PNG
        )
    error = assert_error(response, 413, "payload_too_large")
    assert "FMNIST_MAX_UPLOAD_BYTES" in str(error["message"])


async def test_streamed_upload_over_the_limit_is_413() -> None:
    """A chunked body without Content-Length is cut off once it passes the limit."""

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(100):
            yield b"0" * 100

    async with running_gateway(gateway_settings(max_upload_bytes=1000)) as (_, client):
        response = await client.post("/v1/predictions", content=chunks(), headers=PNG)
    assert "content-length" not in response.request.headers
    assert_error(response, 413, "payload_too_large")


async def test_image_over_the_pixel_limit_is_413() -> None:
    """An image whose header declares more pixels than FMNIST_MAX_IMAGE_PIXELS is refused undecoded."""
    bomb = encode(Image.new("L", (300, 300)), "PNG")  # a few hundred bytes, 90,000 pixels
    async with running_gateway(gateway_settings(max_image_pixels=200 * 200)) as (_, client):
        response = await client.post("/v1/predictions", content=bomb, headers=PNG)
    error = assert_error(response, 413, "image_too_large")
    assert "FMNIST_MAX_IMAGE_PIXELS" in str(error["message"])


async def test_decompression_bomb_png_is_413() -> None:
    """A 10,000×10,000 PNG of zeros (tiny upload) is refused by the default pixel limit."""
    bomb = encode(Image.new("1", (10_000, 10_000)), "PNG")
    assert len(bomb) < 100_000
    async with running_gateway(gateway_settings()) as (_, client):
        response = await client.post("/v1/predictions", content=bomb, headers=PNG)
    assert_error(response, 413, "image_too_large")


async def test_too_many_files_in_a_batch_is_413() -> None:
    """More files than FMNIST_MAX_BATCH_IMAGES is refused as a whole."""
    files = [("files", (f"{i}.png", png_bytes(fashion_like(i)), "image/png")) for i in range(4)]
    async with running_gateway(gateway_settings(max_batch_images=3)) as (_, client):
        response = await client.post("/v1/predictions:batch", files=files)
    error = assert_error(response, 413, "too_many_images")
    assert "FMNIST_MAX_BATCH_IMAGES" in str(error["message"])


# --- formats --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("text/plain", b"hello"),
        ("image/svg+xml", b"<svg xmlns='http://www.w3.org/2000/svg'/>"),
        ("application/octet-stream", b"definitely not an image"),
        ("image/tiff", b"II*\x00"),
    ],
)
async def test_unsupported_formats_are_415(content_type: str, body: bytes) -> None:
    """Content types and bytes that are not a supported image are 415."""
    async with running_gateway(gateway_settings()) as (_, client):
        response = await client.post(
            "/v1/predictions", content=body, headers={"Content-Type": content_type}
        )
    assert_error(response, 415, "unsupported_media_type")


async def test_lying_content_type_is_415() -> None:
    """JPEG bytes declared as image/png are refused, naming what the bytes really are."""
    jpeg = encode(Image.fromarray(fashion_like()), "JPEG")
    async with running_gateway(gateway_settings()) as (_, client):
        response = await client.post("/v1/predictions", content=jpeg, headers=PNG)
    error = assert_error(response, 415, "unsupported_media_type")
    assert "JPEG" in str(error["message"])


async def test_truncated_image_is_422() -> None:
    """A PNG cut in half is a client error (422), not a server error."""
    truncated = encode(
        Image.fromarray(np.arange(784, dtype=np.uint16).reshape(28, 28).astype(np.uint8)), "PNG"
    )[:60]
    async with running_gateway(gateway_settings()) as (_, client):
        response = await client.post("/v1/predictions", content=truncated, headers=PNG)
    assert_error(response, 422, "invalid_image")


async def test_empty_body_is_422() -> None:
    """An empty upload is refused with a message saying so."""
    async with running_gateway(gateway_settings()) as (_, client):
        response = await client.post("/v1/predictions", content=b"", headers=PNG)
    assert_error(response, 422, "empty_image")


# --- malformed requests ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    ["multipart/form-data", "multipart/form-data; boundary=xyz"],
    ids=["no-boundary", "garbage-body"],
)
async def test_malformed_multipart_is_422(content_type: str) -> None:
    """A multipart body without a boundary, or that does not follow it, is 422."""
    async with running_gateway(gateway_settings()) as (_, client):
        response = await client.post(
            "/v1/predictions", content=b"garbage", headers={"Content-Type": content_type}
        )
    assert_error(response, 422, "invalid_multipart")


async def test_multipart_without_the_file_field_is_422() -> None:
    """A form without field `file` says which field is missing."""
    async with running_gateway(gateway_settings()) as (_, client):
        response = await client.post(
            "/v1/predictions", files={"image": ("a.png", png_bytes(fashion_like()), "image/png")}
        )
    error = assert_error(response, 422, "invalid_multipart")
    assert "`file`" in str(error["message"])


@pytest.mark.parametrize("wait", ["-1", "abc", "nan", "inf", "0", "31"])
async def test_bad_wait_is_422(wait: str) -> None:
    """`wait` must be a finite number in (0, FMNIST_MAX_SYNC_WAIT_S]."""
    async with running_gateway(gateway_settings()) as (_, client):
        response = await client.post(
            f"/v1/predictions?wait={wait}", content=png_bytes(fashion_like()), headers=PNG
        )
    assert_error(response, 422, "validation_error")


@pytest.mark.parametrize("metadata", ["not json", '["a"]', '{"label": 3}', "[" * 1000])
async def test_malformed_metadata_is_422(metadata: str) -> None:
    """X-Fmnist-Metadata must be a JSON object of strings."""
    async with running_gateway(gateway_settings()) as (_, client):
        response = await client.post(
            "/v1/predictions",
            content=png_bytes(fashion_like()),
            headers={**PNG, "X-Fmnist-Metadata": metadata},
        )
    assert_error(response, 422, "invalid_metadata")


async def test_oversized_metadata_header_is_431() -> None:
    """X-Fmnist-Metadata over 1 KiB is 431."""
    metadata = '{"note": "' + "x" * 2000 + '"}'
    async with running_gateway(gateway_settings()) as (_, client):
        response = await client.post(
            "/v1/predictions",
            content=png_bytes(fashion_like()),
            headers={**PNG, "X-Fmnist-Metadata": metadata},
        )
    assert_error(response, 431, "header_too_large")


async def test_compact_metadata_just_under_1_kib_is_accepted() -> None:
    """The 1 KiB limit is measured on compact JSON, as the header (and the SDK) send it."""
    metadata = json.dumps({f"k{i:02d}": "v" for i in range(90)}, separators=(",", ":"))
    assert 800 < len(metadata) <= 1024
    async with running_gateway(gateway_settings()) as (_, client):
        response = await client.post(
            "/v1/predictions",
            content=png_bytes(fashion_like()),
            headers={**PNG, "X-Fmnist-Metadata": metadata},
        )
    assert response.status_code == 202, response.text


async def test_two_files_on_the_single_image_route_is_422() -> None:
    """POST /v1/predictions takes exactly one `file`; the error points at the batch route."""
    png = png_bytes(fashion_like())
    files = [("file", ("a.png", png, "image/png")), ("file", ("b.png", png, "image/png"))]
    async with running_gateway(gateway_settings()) as (_, client):
        response = await client.post("/v1/predictions", files=files)
    error = assert_error(response, 422, "invalid_multipart")
    assert ":batch" in str(error["message"])


async def test_oversized_request_headers_are_431() -> None:
    """Request headers over 16 KiB in total are refused on any route."""
    headers = {f"X-Padding-{i}": "p" * 4000 for i in range(5)}
    async with running_gateway(gateway_settings()) as (_, client):
        response = await client.get("/healthz", headers=headers)
    assert_error(response, 431, "header_too_large")


@pytest.mark.parametrize("key", ["k" * 256, "naïve-key", "tab\tkey"])
async def test_invalid_idempotency_key_is_400(key: str) -> None:
    """Idempotency-Key must be 1-255 printable ASCII characters."""
    async with running_gateway(gateway_settings()) as (_, client):
        response = await client.post(
            "/v1/predictions",
            content=png_bytes(fashion_like()),
            headers=[("Content-Type", "image/png"), ("Idempotency-Key", key.encode("utf-8"))],
        )
    assert_error(response, 400, "invalid_idempotency_key")


async def test_unknown_id_is_404() -> None:
    """GET of an id nobody submitted is 404 in our error shape, echoing the id."""
    async with running_gateway(gateway_settings()) as (_, client):
        response = await client.get("/v1/predictions/0123456789abcdef")
    assert assert_error(response, 404, "not_found")["request_id"] == "0123456789abcdef"


async def test_unknown_route_and_wrong_method_use_the_error_shape() -> None:
    """Routing errors (404, 405) are JSON errors like every other."""
    async with running_gateway(gateway_settings()) as (_, client):
        missing = await client.get("/v2/nothing")
        wrong_method = await client.delete("/v1/predictions")
    assert_error(missing, 404, "not_found")
    assert_error(wrong_method, 405, "method_not_allowed")


# --- overload and broker outages ------------------------------------------------------------


async def test_in_flight_cap_answers_429_with_retry_after() -> None:
    """Past FMNIST_MAX_PENDING_REQUESTS unanswered requests the gateway answers 429 + Retry-After."""
    async with running_gateway(gateway_settings(max_pending_requests=2)) as (_, client):
        for _ in range(2):
            accepted = await client.post(
                "/v1/predictions", content=png_bytes(fashion_like()), headers=PNG
            )
            assert accepted.status_code == 202
        refused = await client.post(
            "/v1/predictions", content=png_bytes(fashion_like()), headers=PNG
        )
    error = assert_error(refused, 429, "too_many_requests")
    assert int(refused.headers["retry-after"]) >= 1
    assert "FMNIST_MAX_PENDING_REQUESTS" in str(error["message"])


class FlakyBroker:
    """A `pubsub_factory` whose broker is down until `up` is set; then the real memory broker."""

    def __init__(self) -> None:
        self.up = False
        self.attempts = 0

    def __call__(self, settings: Settings) -> PubSub:
        self.attempts += 1
        pubsub = messaging.connect(settings.broker_url)
        if not self.up:

            async def refuse() -> None:
                raise BrokerUnavailable(
                    f"could not reach the broker at {settings.broker_url} (test outage)"
                )

            pubsub.connect = refuse  # type: ignore[method-assign]
        return pubsub


async def test_broker_down_at_start_answers_503_then_recovers() -> None:
    """Broker down at start: 503 + Retry-After and readyz 503; once it is up, the same app serves."""
    broker = FlakyBroker()
    async with running_gateway(
        gateway_settings(broker_connect_timeout_s=0.5), pubsub_factory=broker
    ) as (app, client):
        refused = await client.post(
            "/v1/predictions", content=png_bytes(fashion_like()), headers=PNG
        )
        not_ready = await client.get("/readyz")
        alive = await client.get("/healthz")
        broker.up = True
        for _ in range(100):
            if app.state.gateway.ready:
                break
            await asyncio.sleep(0.05)
        ready = await client.get("/readyz")
        await announce_model(app.state.settings)
        accepted = await client.post(
            "/v1/predictions", content=png_bytes(fashion_like()), headers=PNG
        )
    assert_error(refused, 503, "broker_unavailable")
    assert int(refused.headers["retry-after"]) >= 1
    assert not_ready.status_code == 503 and not_ready.json()["status"] == "unavailable"
    assert alive.status_code == 200
    assert ready.status_code == 200
    assert accepted.status_code == 202
    assert broker.attempts >= 2


async def test_publish_failure_answers_503_and_forgets_the_request() -> None:
    """When the broker refuses a publish, the client gets 503 + Retry-After and nothing stays in flight."""

    def factory(settings: Settings) -> PubSub:
        pubsub = messaging.connect(settings.broker_url)

        async def refuse(
            topic: str,
            data: bytes,
            *,
            key: str | None = None,
            attributes: Mapping[str, str] | None = None,
        ) -> None:
            raise BrokerUnavailable("the broker went away (test outage)")

        pubsub.publish = refuse  # type: ignore[method-assign]
        return pubsub

    async with running_gateway(gateway_settings(), pubsub_factory=factory) as (app, client):
        response = await client.post(
            "/v1/predictions", content=png_bytes(fashion_like()), headers=PNG
        )
        in_flight = app.state.gateway.store.pending_count
    assert_error(response, 503, "broker_unavailable")
    assert "retry-after" in response.headers
    assert in_flight == 0


@pytest.mark.parametrize("failure", [RuntimeError("client stopped"), AssertionError("no producer")])
async def test_an_undocumented_publish_failure_is_503_for_every_image_of_a_batch(
    failure: Exception,
) -> None:
    """A client library failing in an undocumented way is a 503 per image, never a 500, and nothing stays in flight."""

    def factory(settings: Settings) -> PubSub:
        pubsub = messaging.connect(settings.broker_url)

        async def crash(
            topic: str,
            data: bytes,
            *,
            key: str | None = None,
            attributes: Mapping[str, str] | None = None,
        ) -> None:
            raise failure

        pubsub.publish = crash  # type: ignore[method-assign]
        return pubsub

    png = png_bytes(fashion_like())
    files = [("files", (f"{i}.png", png, "image/png")) for i in range(3)]
    async with running_gateway(gateway_settings(), pubsub_factory=factory) as (app, client):
        single = await client.post("/v1/predictions", content=png, headers=PNG)
        batch = await client.post("/v1/predictions:batch", files=files)
        in_flight = app.state.gateway.store.pending_count
    assert_error(single, 503, "broker_unavailable")
    assert batch.status_code == 503, batch.text
    assert in_flight == 0


# --- hostile uploads ------------------------------------------------------------------------


async def test_lone_surrogate_in_metadata_header_is_422() -> None:
    """`{"a":"\\ud800"}` parses to a string UTF-8 cannot encode: 422, not a 500."""
    async with running_gateway(gateway_settings()) as (_, client):
        response = await client.post(
            "/v1/predictions",
            content=png_bytes(fashion_like()),
            headers={**PNG, "X-Fmnist-Metadata": '{"a":"\\ud800"}'},
        )
    assert_error(response, 422, "invalid_metadata")


async def test_lone_surrogate_in_websocket_metadata_is_an_error_frame() -> None:
    """A websocket submit whose metadata holds a lone surrogate gets an error; the socket stays open."""
    submit = {
        "type": "submit",
        "image": base64.b64encode(png_bytes(fashion_like())).decode(),
        "metadata": {"a": "\ud800"},
        "client_ref": "s",
    }
    async with (
        serving(gateway_settings()) as (_, base),
        connect(f"ws://{base}/v1/predictions/stream") as socket,
    ):
        await socket.send(json.dumps(submit))  # ASCII JSON: the surrogate travels as \ud800
        refused = json.loads(await asyncio.wait_for(socket.recv(), 5))
        await socket.send(json.dumps({"type": "dance"}))
        still_open = json.loads(await asyncio.wait_for(socket.recv(), 5))
    assert refused["error"]["code"] == "invalid_metadata" and refused["client_ref"] == "s"
    assert still_open["error"]["code"] == "invalid_message"


async def test_lone_surrogate_in_websocket_client_ref_is_an_error_frame() -> None:
    """A client_ref holding a lone surrogate (echoed in every answer) gets an error; the socket stays open."""
    submit = {
        "type": "submit",
        "image": base64.b64encode(png_bytes(fashion_like())).decode(),
        "client_ref": "\ud800",
    }
    async with (
        serving(gateway_settings()) as (_, base),
        connect(f"ws://{base}/v1/predictions/stream") as socket,
    ):
        await socket.send(json.dumps(submit))  # ASCII JSON: the surrogate travels as \ud800
        refused = json.loads(await asyncio.wait_for(socket.recv(), 5))
        await socket.send(json.dumps({"type": "dance"}))
        still_open = json.loads(await asyncio.wait_for(socket.recv(), 5))
    assert refused["error"]["code"] == "invalid_message"
    assert "client_ref" in refused["error"]["message"]
    assert still_open["error"]["code"] == "invalid_message"


async def test_field_name_inside_a_quoted_filename_is_not_the_field_name() -> None:
    """`filename="x; name=file; .txt"` does not make a part the `file` field: only the real one counts."""
    boundary = "b0undary"
    decoy = (
        f"--{boundary}\r\n"
        'Content-Disposition: form-data; filename="x; name=file; .txt"; name="note"\r\n\r\n'
        "not an image\r\n"
    ).encode()
    real = (
        f"--{boundary}\r\n"
        'Content-Disposition: form-data; name="file"; filename="a.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode() + png_bytes(fashion_like())
    body = decoy + real + f"\r\n--{boundary}--\r\n".encode()
    async with running_gateway(gateway_settings()) as (_, client):
        response = await client.post(
            "/v1/predictions",
            content=body,
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )
    assert response.status_code == 202, response.text


async def test_extreme_aspect_ratio_upload_is_422() -> None:
    """A 1×4096 PNG (a few dozen bytes) is refused, naming FMNIST_MAX_IMAGE_ASPECT_RATIO."""
    async with running_gateway(gateway_settings()) as (_, client):
        response = await client.post(
            "/v1/predictions", content=encode(Image.new("L", (1, 4096)), "PNG"), headers=PNG
        )
    error = assert_error(response, 422, "unsupported_aspect_ratio")
    assert "FMNIST_MAX_IMAGE_ASPECT_RATIO" in str(error["message"])


@pytest.mark.timeout(90)
async def test_healthz_answers_while_many_pixel_uploads_are_decoded() -> None:
    """Small files with many pixels (1×16,777,216 and 4096×4096) never hold /healthz past 1 s."""
    photo = Image.new("RGB", (4096, 4096), (250, 250, 250))
    photo.paste((10, 20, 30), (1000, 500, 3000, 3500))  # a dark object: inverted, trimmed, fitted
    heavy = encode(photo, "PNG")
    sliver = encode(Image.new("L", (1, 16_777_216)), "PNG")
    assert len(heavy) < 64 * 1024 and len(sliver) < 64 * 1024
    async with running_gateway(gateway_settings()) as (_, client):
        uploads = [
            asyncio.create_task(client.post("/v1/predictions", content=body, headers=PNG))
            for body in [sliver] * 4 + [heavy] * 4
        ]
        while not all(upload.done() for upload in uploads):  # probe while they are handled
            started = time.monotonic()
            health = await client.get("/healthz")
            latency = time.monotonic() - started
            assert health.status_code == 200 and latency < 1.0, f"/healthz took {latency:.2f} s"
            await asyncio.sleep(0.01)
        answers = await asyncio.gather(*uploads)
    assert [answer.status_code for answer in answers] == [422] * 4 + [202] * 4
