"""The Open Inference Protocol's REST API under `/v2`: health, server and model metadata, readiness, infer.

JSON tensors and the binary tensor data extension (`Inference-Header-Content-Length`: a JSON header,
then each binary tensor's bytes in order) both work, in requests and in responses. Errors are the
protocol's `{"error": "message"}` with the status `/v1` gives the same failure.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import orjson
from fastapi import APIRouter, Request, Response

from app.gateway.deps import caller_of, get_gateway_of
from app.gateway.errors import ApiError
from app.gateway.intake import read_body
from app.gateway.registry import ModelVersion
from app.gateway.service import RETRY_AFTER_BROKER_S, Gateway
from app.gateway.v2 import inference
from app.gateway.v2.tensors import (
    InputTensor,
    OutputTensor,
    RequestedOutput,
    bad_request,
    check_shape,
    split_bytes_elements,
)

router = APIRouter(prefix="/v2", tags=["open inference protocol (v2)"])

HEADER_LENGTH = "inference-header-content-length"
_ERROR_BODY = {
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["error"],
                "properties": {"error": {"type": "string"}},
            },
            "example": {"error": "no model 'mnist'; known models: fmnist"},
        }
    }
}
_TENSOR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["name", "datatype", "shape"],
    "properties": {
        "name": {"type": "string", "examples": ["input"]},
        "datatype": {"type": "string", "enum": ["UINT8", "FP32", "BYTES"]},
        "shape": {"type": "array", "items": {"type": "integer"}, "examples": [[1, 1, 28, 28]]},
        "parameters": {
            "type": "object",
            "description": "`binary_data_size`: the tensor's bytes follow the JSON header.",
        },
        "data": {"type": "array", "items": {}, "description": "Row-major values (flat or nested)."},
    },
}
_INFER_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "An inference request: one input `input`, UINT8 (or FP32 in [0, 1], scaled by "
        "255) N×C×H×W pixels in the model's shape, or BYTES [N] encoded images (PNG, JPEG, …, base64 "
        "in JSON). With `Inference-Header-Content-Length`, the JSON header is followed by the binary "
        "tensors it announces.",
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["inputs"],
                    "properties": {
                        "id": {"type": "string"},
                        "parameters": {"type": "object"},
                        "inputs": {"type": "array", "items": _TENSOR_SCHEMA},
                        "outputs": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "properties": {
                                    "name": {
                                        "type": "string",
                                        "enum": list(inference.OUTPUT_NAMES),
                                    },
                                    "parameters": {"type": "object"},
                                },
                            },
                        },
                    },
                }
            },
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


def _json(body: object, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status, headers=headers, media_type="application/json")


def _error(exc: ApiError) -> Response:
    return _json({"error": exc.message}, exc.status, exc.headers)


def _errors(gateway: Gateway, exc: ApiError) -> Response:
    gateway.metrics.record_rejection(exc.code)
    return _error(exc)


def _responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"description": "error", **_ERROR_BODY} for status in statuses}


async def _answer(request: Request, build: Callable[[Gateway], Awaitable[Response]]) -> Response:
    """Run a route's body; an `ApiError` (its own or auth's) becomes the protocol's error body."""
    gateway = get_gateway_of(request)
    try:
        return await build(gateway)
    except ApiError as exc:
        return _errors(gateway, exc)


@router.get("", summary="Server metadata")
async def server_metadata(request: Request) -> Response:
    """The server's name, version and protocol extensions."""
    return _json(
        {
            "name": inference.SERVER_NAME,
            "version": request.app.version,
            "extensions": list(inference.EXTENSIONS),
        }
    )


@router.get("/health/live", summary="Server liveness")
async def server_live() -> Response:
    """200 while the process serves."""
    return _json({"live": True})


@router.get("/health/ready", summary="Server readiness", responses=_responses(503))
async def server_ready(request: Request) -> Response:
    """200 when the broker link and the results consumer are up; 503 (`{"ready": false}`) otherwise."""
    gateway = get_gateway_of(request)
    if gateway.ready:
        return _json({"ready": True})
    return _json(
        {"ready": False, "error": gateway.broker_status},
        503,
        {"Retry-After": str(RETRY_AFTER_BROKER_S)},
    )


async def _metadata(request: Request, name: str, version: str | None) -> Response:
    async def build(gateway: Gateway) -> Response:
        caller_of(request)
        meta = inference.model_metadata(gateway, name, version)
        return _json(
            {
                "name": meta.name,
                "versions": meta.versions,
                "platform": meta.platform,
                "inputs": [_tensor_meta(t) for t in meta.inputs],
                "outputs": [_tensor_meta(t) for t in meta.outputs],
            }
        )

    return await _answer(request, build)


def _tensor_meta(tensor: inference.TensorMetadata) -> dict[str, object]:
    return {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}


async def _ready(request: Request, name: str, version: str | None) -> Response:
    async def build(gateway: Gateway) -> Response:
        caller_of(request)
        if inference.model_ready(gateway, name, version):
            return _json({"name": name, "ready": True})
        return _json(
            {"name": name, "ready": False, "error": f"model {name!r} has no live worker"},
            503,
            {"Retry-After": str(RETRY_AFTER_BROKER_S)},
        )

    return await _answer(request, build)


@router.get("/models/{name}", summary="Model metadata", responses=_responses(401, 403, 404))
async def model_metadata(request: Request, name: str) -> Response:
    """The model's versions, input (`input`: UINT8 N×C×H×W) and outputs."""
    return await _metadata(request, name, None)


@router.get(
    "/models/{name}/versions/{version}",
    summary="Model version metadata",
    responses=_responses(401, 403, 404),
)
async def model_version_metadata(request: Request, name: str, version: str) -> Response:
    """The metadata of one version (a content hash or a tag)."""
    return await _metadata(request, name, version)


@router.get("/models/{name}/ready", summary="Model readiness", responses=_responses(404, 503))
async def model_ready(request: Request, name: str) -> Response:
    """200 when a worker serves the model; 503 otherwise."""
    return await _ready(request, name, None)


@router.get(
    "/models/{name}/versions/{version}/ready",
    summary="Model version readiness",
    responses=_responses(404, 503),
)
async def model_version_ready(request: Request, name: str, version: str) -> Response:
    """200 when a worker serves this version; 503 otherwise."""
    return await _ready(request, name, version)


_INFER_ERRORS = _responses(400, 401, 403, 404, 413, 415, 429, 500, 503, 504)


@router.post(
    "/models/{name}/infer",
    summary="Classify images (v2 infer)",
    responses=_INFER_ERRORS,
    openapi_extra=_INFER_BODY,
)
async def model_infer(request: Request, name: str) -> Response:
    """Outputs `probabilities` (FP32 N×K), `label` (INT64 N) and `class_name` (BYTES N)."""
    return await _infer(request, name, None)


@router.post(
    "/models/{name}/versions/{version}/infer",
    summary="Classify images with one model version (v2 infer)",
    responses=_INFER_ERRORS,
    openapi_extra=_INFER_BODY,
)
async def model_version_infer(request: Request, name: str, version: str) -> Response:
    """As `/v2/models/{name}/infer`, with the version (a content hash or a tag) chosen."""
    return await _infer(request, name, version)


async def _infer(request: Request, name: str, version: str | None) -> Response:
    async def build(gateway: Gateway) -> Response:
        _, owner = caller_of(request)
        model = gateway.registry.resolve(name, version)
        gateway.require_ready()
        settings = gateway.settings
        body = await read_body(
            request, settings.max_batch_upload_bytes, "FMNIST_MAX_BATCH_UPLOAD_BYTES"
        )
        header, inputs, requested, binary_default = parse_infer_request(
            body, request.headers.get(HEADER_LENGTH), request.headers.get("content-encoding")
        )
        outputs = await inference.infer(
            gateway, owner, model, inputs, requested, pinned=version is not None
        )
        binary = {o.name: o.binary for o in requested}
        return infer_response(
            model,
            header.get("id"),
            outputs,
            [
                binary.get(o.name) is True or (binary.get(o.name) is None and binary_default)
                for o in outputs
            ],
        )

    return await _answer(request, build)


def parse_infer_request(
    body: bytes, header_length: str | None, content_encoding: str | None
) -> tuple[dict[str, Any], list[InputTensor], list[RequestedOutput], bool]:
    """(the JSON header, the inputs, the outputs asked for, `binary_data_output`) of an infer body."""
    if content_encoding not in (None, "", "identity"):
        raise ApiError(
            415, "unsupported_media_type", f"Content-Encoding {content_encoding!r} is not accepted"
        )
    if header_length is None:
        json_part, binary = body, b""
    else:
        try:
            length = int(header_length)
        except ValueError:
            length = -1
        if not 0 <= length <= len(body):
            raise bad_request(
                f"Inference-Header-Content-Length {header_length!r} must be a byte count "
                f"between 0 and the body's {len(body)}"
            )
        json_part, binary = body[:length], body[length:]
    try:
        header = orjson.loads(json_part)
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"the request is not valid JSON: {exc}") from None
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list):
        raise bad_request("the request must be a JSON object with a list `inputs`")
    inputs: list[InputTensor] = []
    position = 0
    for entry in header["inputs"]:
        tensor, position = _input_tensor(entry, binary, position)
        inputs.append(tensor)
    if position != len(binary):
        raise bad_request(
            f"{len(binary) - position} bytes after the binary tensors the header announces"
        )
    parameters = header.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise bad_request("`parameters` must be an object")
    requested = [_requested_output(entry) for entry in header.get("outputs") or []]
    return header, inputs, requested, parameters.get("binary_data_output") is True


def _input_tensor(entry: object, binary: bytes, position: int) -> tuple[InputTensor, int]:
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise bad_request("each input must be an object with `name`, `datatype` and `shape`")
    name = entry["name"]
    datatype = entry.get("datatype")
    if not isinstance(datatype, str):
        raise bad_request(f"input {name!r}: `datatype` must be a string such as UINT8")
    shape = check_shape(name, entry.get("shape"))
    parameters = entry.get("parameters") or {}
    size = parameters.get("binary_data_size") if isinstance(parameters, dict) else None
    if size is not None:
        if not isinstance(size, int) or size < 0 or position + size > len(binary):
            raise bad_request(f"input {name!r}: binary_data_size {size!r} runs past the body")
        raw = binary[position : position + size]
        position += size
        if datatype == "BYTES":
            return InputTensor(
                name, datatype, shape, elements=split_bytes_elements(name, raw)
            ), position
        return InputTensor(name, datatype, shape, raw=raw), position
    data = entry.get("data")
    if not isinstance(data, list):
        raise bad_request(f"input {name!r}: send `data` (a list) or binary data")
    if datatype == "BYTES":
        return InputTensor(name, datatype, shape, elements=_json_bytes(name, data)), position
    return InputTensor(name, datatype, shape, values=data), position


def _json_bytes(name: str, data: list[object]) -> list[bytes]:
    """BYTES elements of a JSON tensor: encoded images as base64 strings (raw bytes are not JSON text)."""
    import base64
    import binascii

    flat = _flatten(data)
    try:
        return [base64.b64decode(item, validate=True) for item in flat if isinstance(item, str)]
    except (binascii.Error, ValueError):
        raise bad_request(
            f"input {name!r}: BYTES images in JSON must be base64 strings (or use binary data)"
        ) from None


def _flatten(data: list[object]) -> list[object]:
    flat: list[object] = []
    for item in data:
        if isinstance(item, list):
            flat.extend(_flatten(item))
        else:
            flat.append(item)
    return flat


def _requested_output(entry: object) -> RequestedOutput:
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise bad_request("each requested output must be an object with a `name`")
    parameters = entry.get("parameters") or {}
    binary = parameters.get("binary_data") if isinstance(parameters, dict) else None
    return RequestedOutput(entry["name"], binary if isinstance(binary, bool) else None)


def infer_response(
    model: ModelVersion, request_id: object, outputs: list[OutputTensor], binary: list[bool]
) -> Response:
    """The infer response: JSON, or a JSON header and binary outputs when any output is binary."""
    entries: list[dict[str, object]] = []
    chunks: list[bytes] = []
    for output, as_binary in zip(outputs, binary, strict=True):
        entry: dict[str, object] = {
            "name": output.name,
            "datatype": output.datatype,
            "shape": list(output.shape),
        }
        if as_binary:
            raw = output.raw()
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = output.json_data()
        entries.append(entry)
    body: dict[str, object] = {
        "model_name": model.name,
        "model_version": model.version,
        "outputs": entries,
    }
    if isinstance(request_id, str) and request_id:
        body["id"] = request_id
    header = orjson.dumps(body)
    if not chunks:
        return Response(header, 200, media_type="application/json")
    return Response(
        b"".join([header, *chunks]),
        200,
        headers={"Inference-Header-Content-Length": str(len(header))},
        media_type="application/octet-stream",
    )
