"""Routes `POST /v1/predictions`, `POST /v1/predictions:batch` and `GET /v1/predictions/{request_id}`."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Path, Request, Response

from app.gateway.deps import GatewayDep, OwnerDep, caller_of
from app.gateway.errors import ApiError, error_responses
from app.gateway.images import (
    NPY_TYPES,
    SUPPORTED_IMAGE_TYPES,
    ImagePolicy,
    decode_array,
    decode_array_batch,
    media_type,
)
from app.gateway.intake import (
    Upload,
    batch_item_key,
    body_fingerprint,
    check_idempotency_key,
    decode_uploads,
    parse_metadata,
    parse_multipart_files,
    read_body,
)
from app.gateway.models import BatchResponse, PredictionResponse, pending_body, result_body
from app.gateway.registry import ModelVersion
from app.gateway.results import StoredResult, Submission
from app.gateway.service import Gateway
from app.gateway.submission import Accepted, IdempotencyClaim

router = APIRouter(prefix="/v1", tags=["predictions"])

_WAIT_DESCRIPTION = (
    "Seconds to wait for the result (at most FMNIST_MAX_SYNC_WAIT_S). Answers 200 when it arrives in time, "
    "else 202 `pending`."
)
_IDEMPOTENCY_DESCRIPTION = (
    "Repeat a submit safely: the same key (per API key) returns the same request id and result. "
    "1-255 printable ASCII characters."
)
_METADATA_DESCRIPTION = (
    'JSON object of strings (≤ 1 KiB) echoed in the result as `metadata`, e.g. {"label": "3"}.'
)
# The submit routes read these three themselves (`submit_options`) instead of declaring them as
# FastAPI parameters: resolving declared parameters was 15% of the event loop's time per
# single-image request. The OpenAPI document still describes them, from here.
_SUBMIT_PARAMETERS: list[dict[str, Any]] = [
    {
        "name": "wait",
        "in": "query",
        "required": False,
        "description": _WAIT_DESCRIPTION,
        "schema": {"type": "number", "exclusiveMinimum": 0, "examples": [2.0]},
    },
    {
        "name": "Idempotency-Key",
        "in": "header",
        "required": False,
        "description": _IDEMPOTENCY_DESCRIPTION,
        "schema": {"type": "string"},
    },
    {
        "name": "X-Fmnist-Metadata",
        "in": "header",
        "required": False,
        "description": _METADATA_DESCRIPTION,
        "schema": {"type": "string"},
    },
]

_VERSION_PARAMETER: dict[str, Any] = {
    "name": "version",
    "in": "query",
    "required": False,
    "description": "Pin a version of the model: its content hash or its tag (default: the newest "
    "live version). 404 `version_not_found` lists the live ones.",
    "schema": {"type": "string", "examples": ["v2"]},
}
_MODEL_PARAMETER: dict[str, Any] = {
    "name": "name",
    "in": "path",
    "required": True,
    "description": "The model's name (`GET /v1/models` lists them).",
    "schema": {"type": "string", "examples": ["fmnist"]},
}

_IMAGE_SCHEMA = {"type": "string", "format": "binary"}
_SINGLE_BODY: dict[str, Any] = {
    "parameters": _SUBMIT_PARAMETERS,
    "requestBody": {
        "required": True,
        "description": "The image: raw bytes with its image type (or application/octet-stream, sniffed), "
        "a multipart form with field `file`, or a 1×H×W / H×W uint8 `.npy` array.",
        "content": {
            **{content_type: {"schema": _IMAGE_SCHEMA} for content_type in SUPPORTED_IMAGE_TYPES},
            "application/octet-stream": {"schema": _IMAGE_SCHEMA},
            "application/x-npy": {"schema": _IMAGE_SCHEMA},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {"file": _IMAGE_SCHEMA},
                }
            },
        },
    },
}
_BATCH_BODY: dict[str, Any] = {
    "parameters": _SUBMIT_PARAMETERS,
    "requestBody": {
        "required": True,
        "description": "Many images: a multipart form with the repeated field `files`, or one uint8 `.npy` "
        "array of N×H×W (single-channel models) or N×C×H×W, already at the model's size.",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["files"],
                    "properties": {"files": {"type": "array", "items": _IMAGE_SCHEMA}},
                }
            },
            "application/x-npy": {"schema": _IMAGE_SCHEMA},
        },
    },
}
_SUBMIT_ERRORS = error_responses(400, 401, 403, 404, 413, 415, 422, 429, 431, 503)


def _for_model(body: dict[str, Any]) -> dict[str, Any]:
    """The OpenAPI extras of a submit route under `/v1/models/{name}`."""
    return {**body, "parameters": [_MODEL_PARAMETER, *body["parameters"], _VERSION_PARAMETER]}


def _json(body: Any, status: int, headers: dict[str, str] | None = None) -> Response:
    return Response(
        orjson.dumps(body),  # a 256-item batch answer: 0.08 ms, json.dumps 1.09 ms
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


def _parse_wait(raw: str | None, gateway: Gateway) -> float:
    """`?wait=` as seconds (0 without it); 422 unless a finite number in (0, FMNIST_MAX_SYNC_WAIT_S]."""
    if raw is None:
        return 0.0
    try:
        wait = float(raw)
    except ValueError:
        wait = math.nan
    if not math.isfinite(wait) or wait <= 0:
        raise ApiError(
            422, "validation_error", f"query.wait: must be a number of seconds > 0, got {raw!r}"
        )
    cap = gateway.settings.max_sync_wait_s
    if wait > cap:
        raise ApiError(
            422,
            "validation_error",
            f"wait={wait:g} is above the cap of {cap:g} s (FMNIST_MAX_SYNC_WAIT_S)",
        )
    return wait


@dataclass(frozen=True, slots=True)
class SubmitOptions:
    """The parsed options of a submit: checked before the body is read."""

    idempotency_key: str | None
    metadata: dict[str, str] | None
    wait_s: float
    model: ModelVersion
    pinned: bool


def submit_options(request: Request, gateway: Gateway, model: str | None) -> SubmitOptions:
    """Validate `wait`, `Idempotency-Key`, `X-Fmnist-Metadata` and `version`; refuse early without a
    broker (503) or without the model (404 unknown, 503 no live worker)."""
    headers = request.headers
    version = request.query_params.get("version") or None
    idempotency_key = check_idempotency_key(headers.get("idempotency-key"))
    metadata = parse_metadata(headers.get("x-fmnist-metadata"))
    wait_s = _parse_wait(request.query_params.get("wait"), gateway)
    gateway.require_ready()
    resolved = gateway.registry.resolve(model, version)
    return SubmitOptions(idempotency_key, metadata, wait_s, resolved, version is not None)


def _model_in_path(request: Request) -> str | None:
    name = request.path_params.get("name")
    return None if name is None else str(name)


async def _read_single_image(
    request: Request, gateway: Gateway, model: ModelVersion
) -> tuple[bytes, bytes]:
    """(the upload's bytes, the model input) for the single-image route."""
    limit = gateway.settings.max_upload_bytes
    body = await read_body(request, limit, "FMNIST_MAX_UPLOAD_BYTES")
    content_type = request.headers.get("content-type")
    kind = media_type(content_type)
    if kind == "multipart/form-data":
        (upload,) = parse_multipart_files(content_type or "", body, "file", max_files=1)
    elif kind in NPY_TYPES:
        return body, decode_array(body, gateway.policy_for(model))
    else:
        upload = Upload(body, content_type)
    (decoded,) = await decode_uploads([upload], gateway.policy_for(model))
    if isinstance(decoded, ApiError):
        raise decoded
    return upload.data, decoded


@router.post(
    "/predictions",
    status_code=202,
    response_model=PredictionResponse,
    summary="Submit one image",
    responses={
        200: {"model": PredictionResponse, "description": "Completed (or failed) within `wait`."},
        202: {
            "description": "Accepted; poll `Location` or stream the result.",
            "headers": {
                "Location": {"description": "The prediction's URL.", "schema": {"type": "string"}}
            },
        },
        **_SUBMIT_ERRORS,
    },
    openapi_extra=_SINGLE_BODY,
)
async def create_prediction(request: Request) -> Response:
    """Decode and validate the image, publish it to the default model's workers, answer 202 (or 200 within `wait`)."""
    return await _create_prediction(request)


@router.post(
    "/models/{name}/predictions",
    status_code=202,
    response_model=PredictionResponse,
    summary="Submit one image to a model",
    responses={
        200: {"model": PredictionResponse, "description": "Completed (or failed) within `wait`."},
        202: {"description": "Accepted; poll `Location` or stream the result."},
        **_SUBMIT_ERRORS,
    },
    openapi_extra=_for_model(_SINGLE_BODY),
)
async def create_model_prediction(request: Request) -> Response:
    """As `POST /v1/predictions`, for the model `name` (and `?version=`): 404 for an unknown model
    or version, 503 + Retry-After while no worker serves it."""
    return await _create_prediction(request)


async def _create_prediction(request: Request) -> Response:
    gateway, owner = caller_of(request)
    options = submit_options(request, gateway, _model_in_path(request))
    key, meta = options.idempotency_key, options.metadata
    with _counting_rejections(gateway):
        raw, payload = await _read_single_image(request, gateway, options.model)
        claim = [(key, body_fingerprint(raw, meta))] if key is not None else None
        (outcome,) = await _submit(gateway, owner, options, [payload], claim)
        if isinstance(outcome, ApiError):
            raise outcome
    request_id = outcome.request_id
    (body,), done = await _answers(gateway, owner, [request_id], options.wait_s)
    return _json(body, 200 if done else 202, {"Location": f"/v1/predictions/{request_id}"})


@contextmanager
def _counting_rejections(gateway: Gateway) -> Iterator[None]:
    """Count an `ApiError` raised within by its code, and let it through."""
    try:
        yield
    except ApiError as exc:
        gateway.metrics.record_rejection(exc.code)
        raise


async def _submit(
    gateway: Gateway,
    owner: str,
    options: SubmitOptions,
    payloads: list[bytes],
    claims: Sequence[IdempotencyClaim | None] | None,
) -> list[Accepted | ApiError]:
    return await gateway.submit(
        owner,
        payloads,
        model=options.model,
        pinned=options.pinned,
        metadata=options.metadata,
        idempotency=claims,
    )


async def _answers(
    gateway: Gateway, owner: str, request_ids: list[str], wait_s: float
) -> tuple[list[dict[str, Any]], bool]:
    """Wait up to `wait_s` for the results of `request_ids`; their bodies (the result, else `pending`),
    in order, and whether every one has a result."""
    if wait_s > 0 and request_ids:
        await gateway.wait_for_all(owner, request_ids, wait_s)
    bodies: list[dict[str, Any]] = []
    all_done = True
    for request_id in request_ids:
        found = await gateway.lookup(request_id)
        if isinstance(found, StoredResult):
            bodies.append(result_body(found))
        else:
            all_done = False
            bodies.append(pending_body(request_id, found))
    return bodies, all_done


@router.post(
    "/predictions:batch",
    status_code=202,
    response_model=BatchResponse,
    summary="Submit many images in one request",
    responses={
        200: {"model": BatchResponse, "description": "Every item is completed, failed or refused."},
        **_SUBMIT_ERRORS,
    },
    openapi_extra=_BATCH_BODY,
)
async def create_predictions_batch(request: Request) -> Response:
    """One item per image, in order: a pending/completed prediction, or `{index, error}` for a bad image."""
    return await _create_batch(request)


@router.post(
    "/models/{name}/predictions:batch",
    status_code=202,
    response_model=BatchResponse,
    summary="Submit many images to a model",
    responses={
        200: {"model": BatchResponse, "description": "Every item is completed, failed or refused."},
        **_SUBMIT_ERRORS,
    },
    openapi_extra=_for_model(_BATCH_BODY),
)
async def create_model_predictions_batch(request: Request) -> Response:
    """As `POST /v1/predictions:batch`, for the model `name` (and `?version=`)."""
    return await _create_batch(request)


async def _create_batch(request: Request) -> Response:
    gateway, owner = caller_of(request)
    options = submit_options(request, gateway, _model_in_path(request))
    key, meta = options.idempotency_key, options.metadata
    with _counting_rejections(gateway):
        raws, decoded = await _read_batch(request, gateway, gateway.policy_for(options.model))
        good = [
            (index, item) for index, item in enumerate(decoded) if not isinstance(item, ApiError)
        ]
        claims: list[tuple[str, str] | None] | None = (
            [(batch_item_key(key, index), body_fingerprint(raws[index], meta)) for index, _ in good]
            if key is not None
            else None
        )
        outcomes = await _submit(gateway, owner, options, [payload for _, payload in good], claims)
    submitted = iter(outcomes)
    items: list[Accepted | ApiError] = [
        item if isinstance(item, ApiError) else next(submitted) for item in decoded
    ]
    refused = [item for item in outcomes if isinstance(item, ApiError)]
    if outcomes and len(refused) == len(outcomes) and refused[0].status in (429, 503):
        # The broker took none of them: answer with its status (and Retry-After), not 200.
        raise refused[0]
    for item in items:
        if isinstance(item, ApiError):
            gateway.metrics.record_rejection(item.code)
    accepted_ids = [item.request_id for item in items if isinstance(item, Accepted)]
    answers, all_done = await _answers(gateway, owner, accepted_ids, options.wait_s)
    answered = iter(answers)
    body_items = [
        {"index": index, "error": item.to_body()["error"]}
        if isinstance(item, ApiError)
        else next(answered)
        for index, item in enumerate(items)
    ]
    return _json({"items": body_items}, 200 if all_done else 202)


async def _read_batch(
    request: Request, gateway: Gateway, policy: ImagePolicy
) -> tuple[list[bytes], list[bytes | ApiError]]:
    """(each upload's bytes, its model input or the error that refused it) for the batch route."""
    settings = gateway.settings
    max_images = settings.max_batch_images
    body = await read_body(
        request, settings.max_batch_upload_bytes, "FMNIST_MAX_BATCH_UPLOAD_BYTES"
    )
    content_type = request.headers.get("content-type") or ""
    kind = media_type(content_type)
    if kind == "multipart/form-data":
        uploads = parse_multipart_files(content_type, body, "files", max_files=max_images)
        return [upload.data for upload in uploads], await decode_uploads(uploads, policy)
    if kind in NPY_TYPES:
        arrays = decode_array_batch(body, policy, max_images=max_images)
        return list(arrays), list(arrays)
    raise ApiError(
        415,
        "unsupported_media_type",
        "send multipart/form-data with repeated field `files`, or an application/x-npy uint8 array",
    )


@router.get(
    "/predictions/{request_id}",
    response_model=PredictionResponse,
    summary="Get a prediction",
    responses=error_responses(401, 403, 404),
)
async def get_prediction(
    gateway: GatewayDep,
    owner: OwnerDep,
    request_id: Annotated[
        str, Path(max_length=128, description="The id returned when the image was submitted.")
    ],
) -> Response:
    """`pending`, `completed` or `failed`; 404 for an unknown or expired id, or another key's request."""
    found = await gateway.lookup(request_id)
    if isinstance(found, StoredResult) and found.result.owner == owner:
        return _json(result_body(found), 200)
    if isinstance(found, Submission) and found.owner == owner:
        return _json(pending_body(request_id, found), 200)
    raise ApiError(
        404,
        "not_found",
        f"no prediction with id {request_id!r} (results are kept {gateway.settings.result_ttl_s:g} s)",
        request_id=request_id,
    )
