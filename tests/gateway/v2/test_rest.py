"""The v2 REST API through the real app on the memory broker, with a stand-in worker answering."""

from __future__ import annotations

import base64
import struct

import numpy as np
import orjson
import pytest

from tests.gateway.helpers import (
    fashion_like,
    gateway_settings,
    png_bytes,
    running_gateway,
    worker_running,
)

pytestmark = pytest.mark.timeout(30)

INFER = "/v2/models/fmnist/infer"


def images(*seeds: int) -> np.ndarray:
    """N×1×28×28 uint8 images whose stand-in label is `seed % 10`."""
    return np.stack([fashion_like(seed)[None] for seed in seeds])


def binary_request(
    pixels: np.ndarray, outputs: list[dict[str, object]] | None = None
) -> tuple[bytes, dict[str, str]]:
    """An infer body in the binary tensor data extension, as tritonclient.http sends it."""
    raw = pixels.tobytes()
    header: dict[str, object] = {
        "inputs": [
            {
                "name": "input",
                "datatype": "UINT8",
                "shape": list(pixels.shape),
                "parameters": {"binary_data_size": len(raw)},
            }
        ],
    }
    if outputs is not None:
        header["outputs"] = outputs
    else:
        header["parameters"] = {"binary_data_output": True}
    head = orjson.dumps(header)
    return head + raw, {"Inference-Header-Content-Length": str(len(head))}


def split_response(body: bytes, header_length: int) -> tuple[dict[str, object], bytes]:
    return orjson.loads(body[:header_length]), body[header_length:]


async def test_model_metadata_names_the_input_and_outputs() -> None:
    """GET /v2/models/fmnist describes the UINT8 N×1×28×28 input and the three outputs."""
    async with running_gateway(gateway_settings()) as (_, client):
        response = await client.get("/v2/models/fmnist")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["inputs"] == [{"name": "input", "datatype": "UINT8", "shape": [-1, 1, 28, 28]}]
    assert [(o["name"], o["datatype"], o["shape"]) for o in body["outputs"]] == [
        ("probabilities", "FP32", [-1, 10]),
        ("label", "INT64", [-1]),
        ("class_name", "BYTES", [-1]),
    ]


async def test_unknown_model_is_404_in_the_protocol_error_body() -> None:
    """An unknown model answers 404 with `{"error": ...}` naming the known models."""
    async with running_gateway(gateway_settings()) as (_, client):
        response = await client.post("/v2/models/mnist/infer", content=b"{}")
    assert response.status_code == 404
    assert set(response.json()) == {"error"}
    assert "fmnist" in response.json()["error"]


async def test_unknown_version_is_404() -> None:
    """A version the model does not have answers 404 naming the live versions."""
    async with running_gateway(gateway_settings()) as (_, client):
        response = await client.get("/v2/models/fmnist/versions/nope")
    assert response.status_code == 404
    assert "nope" in response.json()["error"]


async def test_json_uint8_infer_goes_through_the_workers() -> None:
    """A JSON UINT8 tensor of 3 images comes back with the worker's labels and class names."""
    settings = gateway_settings()
    pixels = images(3, 5, 8)
    body = {
        "id": "req-1",
        "inputs": [
            {"name": "input", "datatype": "UINT8", "shape": [3, 1, 28, 28], "data": pixels.tolist()}
        ],
    }
    async with running_gateway(settings) as (_, client), worker_running(settings):
        response = await client.post(INFER, json=body)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["id"] == "req-1"
    outputs = {o["name"]: o for o in result["outputs"]}
    assert outputs["label"]["data"] == [3, 5, 8]
    assert outputs["class_name"]["data"] == ["class-3", "class-5", "class-8"]
    assert outputs["probabilities"]["shape"] == [3, 10]


async def test_binary_tensors_in_and_out() -> None:
    """Binary request data and `binary_data_output` give binary outputs after the JSON header."""
    settings = gateway_settings()
    content, headers = binary_request(images(1, 2))
    async with running_gateway(settings) as (_, client), worker_running(settings):
        response = await client.post(INFER, content=content, headers=headers)
    assert response.status_code == 200, response.text
    header, binary = split_response(
        response.content, int(response.headers["inference-header-content-length"])
    )
    outputs = header["outputs"]
    assert isinstance(outputs, list)
    sizes = [o["parameters"]["binary_data_size"] for o in outputs]
    probabilities = np.frombuffer(binary[: sizes[0]], "<f4").reshape(2, 10)
    labels = np.frombuffer(binary[sizes[0] : sizes[0] + sizes[1]], "<i8")
    assert labels.tolist() == [1, 2]
    assert probabilities.argmax(axis=1).tolist() == [1, 2]
    names = binary[sizes[0] + sizes[1] :]
    (length,) = struct.unpack_from("<I", names)
    assert names[4 : 4 + length] == b"class-1"


async def test_outputs_selection_is_honoured_per_output() -> None:
    """Only the outputs asked for come back, each binary or JSON as its `binary_data` says."""
    settings = gateway_settings()
    outputs = [
        {"name": "class_name", "parameters": {"binary_data": False}},
        {"name": "label", "parameters": {"binary_data": True}},
    ]
    content, headers = binary_request(images(4), outputs)
    async with running_gateway(settings) as (_, client), worker_running(settings):
        response = await client.post(INFER, content=content, headers=headers)
    assert response.status_code == 200, response.text
    header, binary = split_response(
        response.content, int(response.headers["inference-header-content-length"])
    )
    assert [o["name"] for o in header["outputs"]] == ["class_name", "label"]  # type: ignore[index]
    assert header["outputs"][0]["data"] == ["class-4"]  # type: ignore[index]
    assert np.frombuffer(binary, "<i8").tolist() == [4]


async def test_bytes_images_go_through_the_image_policy() -> None:
    """BYTES inputs holding PNGs (base64 in JSON) are decoded like /v1 uploads."""
    settings = gateway_settings()
    pngs = [base64.b64encode(png_bytes(fashion_like(seed))).decode() for seed in (6, 7)]
    body = {"inputs": [{"name": "input", "datatype": "BYTES", "shape": [2], "data": pngs}]}
    async with running_gateway(settings) as (_, client), worker_running(settings):
        response = await client.post(INFER, json=body)
    assert response.status_code == 200, response.text
    labels = next(o for o in response.json()["outputs"] if o["name"] == "label")
    assert labels["data"] == [6, 7]


async def test_a_bad_image_fails_the_request_naming_its_index() -> None:
    """One undecodable BYTES image fails the whole request with 400 naming item 1."""
    settings = gateway_settings()
    pngs = [base64.b64encode(data).decode() for data in (png_bytes(fashion_like(1)), b"junk")]
    body = {"inputs": [{"name": "input", "datatype": "BYTES", "shape": [2], "data": pngs}]}
    async with running_gateway(settings) as (_, client):
        response = await client.post(INFER, json=body)
    assert response.status_code in (400, 415), response.text
    assert "item 1" in response.json()["error"]


async def test_fp32_is_scaled_back_to_uint8() -> None:
    """FP32 pixels in [0, 1] reach the worker as round(value × 255)."""
    settings = gateway_settings()
    pixels = images(0)
    pixels[0, 0, 0, 0] = 243  # the stand-in answers 243 % 10 = 3
    scaled = (pixels.astype(np.float32) / 255.0).tolist()
    body = {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 28, 28], "data": scaled}]
    }
    async with running_gateway(settings) as (_, client), worker_running(settings):
        response = await client.post(INFER, json=body)
    assert response.status_code == 200, response.text
    assert next(o for o in response.json()["outputs"] if o["name"] == "label")["data"] == [3]


async def test_fp32_outside_zero_one_is_400() -> None:
    """FP32 pixels above 1 are refused with 400, not guessed at."""
    body = {
        "inputs": [
            {"name": "input", "datatype": "FP32", "shape": [1, 1, 28, 28], "data": [2.0] * 784}
        ]
    }
    async with running_gateway(gateway_settings()) as (_, client):
        response = await client.post(INFER, json=body)
    assert response.status_code == 400
    assert "[0, 1]" in response.json()["error"]


async def test_wrong_shape_is_400() -> None:
    """A tensor that is not N×1×28×28 is refused with 400 naming the model's shape."""
    body = {
        "inputs": [{"name": "input", "datatype": "UINT8", "shape": [1, 28, 28], "data": [0] * 784}]
    }
    async with running_gateway(gateway_settings()) as (_, client):
        response = await client.post(INFER, json=body)
    assert response.status_code == 400
    assert "[N, 1, 28, 28]" in response.json()["error"]


async def test_too_many_images_is_413() -> None:
    """More images than FMNIST_MAX_BATCH_IMAGES are refused as /v1 refuses them."""
    content, headers = binary_request(images(*range(5)))
    async with running_gateway(gateway_settings(max_batch_images=4)) as (_, client):
        response = await client.post(INFER, content=content, headers=headers)
    assert response.status_code == 413
    assert "FMNIST_MAX_BATCH_IMAGES" in response.json()["error"]


async def test_in_flight_cap_is_429_with_retry_after() -> None:
    """A request that would pass FMNIST_MAX_PENDING_REQUESTS answers 429 + Retry-After."""
    content, headers = binary_request(images(*range(3)))
    async with running_gateway(gateway_settings(max_pending_requests=2)) as (_, client):
        response = await client.post(INFER, content=content, headers=headers)
    assert response.status_code == 429
    assert "retry-after" in response.headers
    assert "FMNIST_MAX_PENDING_REQUESTS" in response.json()["error"]


async def test_api_key_is_required_when_configured() -> None:
    """With API keys on, infer needs one (401), and `X-API-Key` is accepted."""
    settings = gateway_settings(api_keys=["k1"])
    content, headers = binary_request(images(2))
    async with running_gateway(settings) as (_, client), worker_running(settings):
        refused = await client.post(INFER, content=content, headers=headers)
        accepted = await client.post(INFER, content=content, headers={**headers, "X-API-Key": "k1"})
    assert refused.status_code == 401
    assert set(refused.json()) == {"error"}
    assert accepted.status_code == 200, accepted.text


async def test_server_not_ready_without_a_broker() -> None:
    """/v2/health/ready answers 503 `{"ready": false}` while the broker is unreachable; live stays 200."""
    settings = gateway_settings("kafka://127.0.0.1:1", broker_connect_timeout_s=0.2)
    async with running_gateway(settings) as (_, client):
        ready = await client.get("/v2/health/ready")
        live = await client.get("/v2/health/live")
    assert ready.status_code == 503
    assert ready.json()["ready"] is False
    assert live.json() == {"live": True}
