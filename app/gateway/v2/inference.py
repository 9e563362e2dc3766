"""The one path of a v2 infer request, for REST and gRPC alike: tensor → images → `Gateway.submit` → results.

A request with N images becomes N requests to the workers, batched with everyone else's, and is
awaited through the result store as `?wait=` is. The protocol has no per-item status: the whole
request fails with the first failing item's error, its message naming the item's index.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from app.gateway.errors import ApiError
from app.gateway.intake import Upload, decode_uploads
from app.gateway.registry import ModelVersion
from app.gateway.results import EXPIRY_GRACE_S
from app.gateway.service import Gateway
from app.gateway.submission import Accepted
from app.gateway.v2.tensors import (
    NUMPY_TYPES,
    InputTensor,
    OutputTensor,
    RequestedOutput,
    bad_request,
    element_count,
)

INPUT_NAME = "input"
PROBABILITIES, LABEL, CLASS_NAME = "probabilities", "label", "class_name"
OUTPUT_NAMES = (PROBABILITIES, LABEL, CLASS_NAME)
PLATFORM = "fmnist-service"
SERVER_NAME = "fmnist-service"
EXTENSIONS = ("binary_tensor_data",)
# The result of a request whose deadline passed is `failed` once the gateway's sweeper sees it.
_WAIT_MARGIN_S = EXPIRY_GRACE_S + 2.0


@dataclass(frozen=True, slots=True)
class TensorMetadata:
    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ModelMetadata:
    """What `GET /v2/models/{name}` and gRPC `ModelMetadata` answer."""

    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


def model_metadata(gateway: Gateway, name: str, version: str | None) -> ModelMetadata:
    """A model's metadata (at `version`, or its newest); 404 for an unknown model or version."""
    versions = gateway.registry.versions(name)
    if not versions:
        gateway.registry.resolve(
            name, version
        )  # raises the registry's 404, naming the known models
    if version is not None:
        versions = [v for v in versions if version in (v.version, v.tag)]
        if not versions:
            gateway.registry.resolve(name, version)  # raises 404 version_not_found
    model = versions[0]
    channels, height, width = model.input_shape
    classes = len(model.class_names)
    return ModelMetadata(
        name=model.name,
        versions=[v.version for v in versions],
        platform=PLATFORM,
        inputs=[TensorMetadata(INPUT_NAME, "UINT8", (-1, channels, height, width))],
        outputs=[
            TensorMetadata(PROBABILITIES, "FP32", (-1, classes)),
            TensorMetadata(LABEL, "INT64", (-1,)),
            TensorMetadata(CLASS_NAME, "BYTES", (-1,)),
        ],
    )


def model_ready(gateway: Gateway, name: str, version: str | None) -> bool:
    """Whether the model (at `version`) has a live worker; 404 for an unknown model or version."""
    try:
        gateway.registry.resolve(name, version)
    except ApiError as exc:
        if exc.status == 503:
            return False
        raise
    return True


def check_outputs(requested: Sequence[RequestedOutput]) -> None:
    for output in requested:
        if output.name not in OUTPUT_NAMES:
            raise bad_request(
                f"unknown output {output.name!r}; the model's outputs are {', '.join(OUTPUT_NAMES)}"
            )


async def infer(
    gateway: Gateway,
    owner: str,
    model: ModelVersion,
    inputs: Sequence[InputTensor],
    requested: Sequence[RequestedOutput],
    *,
    pinned: bool = False,
) -> list[OutputTensor]:
    """Classify the images of `inputs` through the workers; the outputs asked for (all when none)."""
    check_outputs(requested)
    if len(inputs) != 1 or inputs[0].name != INPUT_NAME:
        names = ", ".join(repr(tensor.name) for tensor in inputs) or "none"
        raise bad_request(f"the model takes one input named {INPUT_NAME!r}; got {names}")
    payloads = await images_of(gateway, model, inputs[0])
    outcomes = await gateway.submit(owner, payloads, model=model, pinned=pinned)
    request_ids = [_accepted(outcomes, index) for index in range(len(outcomes))]
    wait_s = gateway.settings.request_deadline_s + _WAIT_MARGIN_S
    await gateway.store.wait_for_all(request_ids, wait_s)
    probabilities: list[list[float]] = []
    labels: list[int] = []
    class_names: list[bytes] = []
    for index, request_id in enumerate(request_ids):
        stored = gateway.store.get_result(request_id)
        if stored is None:
            raise ApiError(
                504,
                "timeout",
                f"item {index}: no result within {wait_s:g} s (FMNIST_REQUEST_DEADLINE_S)",
                request_id=request_id,
            )
        result = stored.result
        if result.status != "completed" or result.probabilities is None or result.label is None:
            error = result.error
            code = error.code if error is not None else "inference_failed"
            message = error.message if error is not None else "the worker returned no prediction"
            status = 504 if code == "deadline_exceeded" else 500
            raise ApiError(status, code, f"item {index}: {message}", request_id=request_id)
        probabilities.append(result.probabilities)
        labels.append(result.label)
        class_names.append((result.class_name or "").encode())
    outputs = {
        PROBABILITIES: OutputTensor(
            PROBABILITIES,
            "FP32",
            (len(labels), len(model.class_names)),
            array=np.asarray(probabilities, dtype="<f4").reshape(len(labels), -1),
        ),
        LABEL: OutputTensor(LABEL, "INT64", (len(labels),), array=np.asarray(labels, dtype="<i8")),
        CLASS_NAME: OutputTensor(CLASS_NAME, "BYTES", (len(labels),), elements=class_names),
    }
    chosen = [output.name for output in requested] or list(OUTPUT_NAMES)
    return [outputs[output] for output in chosen]


def _accepted(outcomes: Sequence[Accepted | ApiError], index: int) -> str:
    outcome = outcomes[index]
    if isinstance(outcome, ApiError):
        refused = [item for item in outcomes if isinstance(item, ApiError)]
        raise ApiError(
            outcome.status,
            outcome.code,
            f"item {index}: {outcome.message}"
            + (f" ({len(refused)} of {len(outcomes)} items refused)" if len(outcomes) > 1 else ""),
            headers=outcome.headers,
        )
    return outcome.request_id


async def images_of(gateway: Gateway, model: ModelVersion, tensor: InputTensor) -> list[bytes]:
    """The model inputs (uint8 C×H×W bytes) of the input tensor; 400 naming the first bad item."""
    if tensor.datatype == "BYTES":
        return await _decode_images(gateway, model, tensor)
    if tensor.datatype not in ("UINT8", "FP32"):
        raise bad_request(
            f"input {tensor.name!r}: datatype {tensor.datatype} is not accepted; send UINT8 or FP32 "
            "pixels N×C×H×W, or BYTES holding encoded images"
        )
    channels, height, width = model.input_shape
    count = tensor.shape[0] if len(tensor.shape) == 4 else -1
    if tuple(tensor.shape[1:]) != (channels, height, width) or count < 1:
        raise bad_request(
            f"input {tensor.name!r}: shape {list(tensor.shape)} does not fit the model's "
            f"[N, {channels}, {height}, {width}] with N ≥ 1"
        )
    _check_count(gateway, count)
    pixels = _array_of(tensor)
    if tensor.datatype == "FP32":
        pixels = _scaled_to_uint8(tensor.name, pixels)
    size = channels * height * width
    data = pixels.tobytes()
    return [data[index * size : (index + 1) * size] for index in range(count)]


def _check_count(gateway: Gateway, count: int) -> None:
    limit = gateway.settings.max_batch_images
    if count > limit:
        raise ApiError(
            413,
            "too_many_images",
            f"{count} images in one request; the limit is {limit} (FMNIST_MAX_BATCH_IMAGES): split it",
        )


def _array_of(tensor: InputTensor) -> np.ndarray:
    """The tensor's elements as a flat numpy array of its datatype; 400 when the data do not fit the shape."""
    dtype = NUMPY_TYPES[tensor.datatype]
    expected = element_count(tensor.shape)
    if tensor.raw is not None:
        if len(tensor.raw) != expected * dtype.itemsize:
            raise bad_request(
                f"input {tensor.name!r}: {len(tensor.raw)} bytes of data; shape {list(tensor.shape)} "
                f"of {tensor.datatype} needs {expected * dtype.itemsize}"
            )
        return np.frombuffer(tensor.raw, dtype=dtype)
    try:
        array = np.asarray(tensor.values, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise bad_request(
            f"input {tensor.name!r}: data must be numbers (flat or nested lists)"
        ) from None
    if array.size != expected:
        raise bad_request(
            f"input {tensor.name!r}: {array.size} values; shape {list(tensor.shape)} needs {expected}"
        )
    if tensor.datatype == "UINT8":
        if not np.all((array >= 0) & (array <= 255) & (array == np.floor(array))):
            raise bad_request(f"input {tensor.name!r}: UINT8 values must be integers 0-255")
        return array.astype(np.uint8)
    return array.astype(np.float32)


def _scaled_to_uint8(name: str, pixels: np.ndarray) -> np.ndarray:
    """FP32 pixels in [0, 1] to uint8: round(value × 255), the inverse of the model's scaling."""
    if pixels.size and not (
        np.isfinite(pixels).all() and pixels.min() >= 0.0 and pixels.max() <= 1.0
    ):
        raise bad_request(
            f"input {name!r}: FP32 pixels must be in [0, 1] (they are scaled by 255 to uint8); "
            "send UINT8 for 0-255 values"
        )
    scaled: np.ndarray = np.rint(pixels * np.float32(255.0)).astype(np.uint8)
    return scaled


async def _decode_images(gateway: Gateway, model: ModelVersion, tensor: InputTensor) -> list[bytes]:
    """Encoded images (PNG, JPEG, …) through the same image policy as `/v1`."""
    elements = tensor.elements or []
    if len(tensor.shape) != 1 or tensor.shape[0] != len(elements) or not elements:
        raise bad_request(
            f"input {tensor.name!r}: BYTES images need shape [N] with N ≥ 1 matching the "
            f"{len(elements)} elements sent"
        )
    _check_count(gateway, len(elements))
    decoded = await decode_uploads(
        [Upload(element, None) for element in elements], gateway.policy_for(model)
    )
    for index, item in enumerate(decoded):
        if isinstance(item, ApiError):
            status = item.status if item.status in (413, 415) else 400
            raise ApiError(status, item.code, f"input {tensor.name!r} item {index}: {item.message}")
    return [item for item in decoded if isinstance(item, bytes)]
