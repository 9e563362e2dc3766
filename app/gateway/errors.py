"""The gateway's error model: `ApiError`, the JSON error body, and the exception handlers that emit it."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.logs import kv

log = logging.getLogger(__name__)


class ErrorDetail(BaseModel):
    """What went wrong, in a stable machine-readable `code` and a message that says what to do."""

    code: str = Field(examples=["unsupported_media_type"])
    message: str = Field(
        examples=["content type image/png does not match the bytes, which are JPEG"]
    )
    request_id: str | None = Field(None, description="The prediction's id, when one was assigned.")


class ErrorResponse(BaseModel):
    """Every error the API returns has this body."""

    error: ErrorDetail


class ApiError(Exception):
    """An error a client caused (or must wait out); rendered as `ErrorResponse` with `status`."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        request_id: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.request_id = request_id
        self.headers = dict(headers or {})

    def to_body(self) -> dict[str, Any]:
        return error_body(self.code, self.message, self.request_id)


def error_body(code: str, message: str, request_id: str | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "request_id": request_id}}


def error_response(
    status: int,
    code: str,
    message: str,
    *,
    request_id: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(
        error_body(code, message, request_id), status_code=status, headers=dict(headers or {})
    )


# The `code` for HTTP errors Starlette/FastAPI raise themselves (routing, method, body parsing).
_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "too_many_requests",
    431: "header_too_large",
    503: "unavailable",
}


def _describe_validation(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors()[:5]:
        where = ".".join(str(p) for p in error.get("loc", ()))
        parts.append(f"{where}: {error.get('msg', 'invalid')}")
    return "; ".join(parts) or "the request is invalid"


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(
        exc.status, exc.code, exc.message, request_id=exc.request_id, headers=exc.headers
    )


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return error_response(422, "validation_error", _describe_validation(exc))


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    if exc.status_code == 404:
        message = f"no route {request.url.path}; see /docs for the API"
    elif exc.status_code == 405:
        message = f"method {request.method} is not allowed on {request.url.path}; see /docs"
    else:
        message = str(exc.detail)
    return error_response(exc.status_code, code, message, headers=exc.headers)


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    # A bug on our side: log it with the traceback; the client gets the same JSON shape.
    log.exception(kv("unhandled_error", path=request.url.path, error=type(exc).__name__))
    return error_response(500, "internal_error", "unexpected server error; it has been logged")


def install_error_handlers(app: FastAPI) -> None:
    """Render every error, ours and the framework's, as `ErrorResponse` JSON."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route: each listed status documented with the error body and an example."""
    return {
        status: {
            "model": ErrorResponse,
            "description": _STATUS_DESCRIPTIONS.get(status, "error"),
            "content": {
                "application/json": {
                    "example": error_body(
                        _HTTP_CODES.get(status, "http_error"), _STATUS_EXAMPLES.get(status, "…")
                    )
                }
            },
        }
        for status in statuses
    }


_STATUS_DESCRIPTIONS = {
    400: "Malformed request (e.g. an invalid `Idempotency-Key` or metadata header).",
    401: "An API key is required: send `Authorization: Bearer KEY` or `X-API-Key: KEY`.",
    403: "The API key is not valid.",
    404: "Unknown or expired request id.",
    413: "The upload or the decoded image exceeds a limit.",
    415: "The content type is not a supported image format, or does not match the bytes.",
    422: "The request is malformed or the image cannot be decoded.",
    429: "Too many requests in flight; retry after `Retry-After` seconds.",
    431: "A request header is too large.",
    503: "The broker is unavailable; retry after `Retry-After` seconds.",
}
_STATUS_EXAMPLES = {
    400: "Idempotency-Key must be 1-255 printable ASCII characters",
    401: "missing API key: send `Authorization: Bearer KEY` or `X-API-Key: KEY`",
    403: "invalid API key",
    404: "no prediction with id 'b1946ac92492d2347c6235b4d2611184' (results are kept 600 s)",
    413: "upload is 6291456 bytes; the limit is 5242880 (FMNIST_MAX_UPLOAD_BYTES)",
    415: "content type image/png does not match the bytes, which are JPEG",
    422: "the image could not be decoded: image file is truncated",
    429: "10000 requests in flight (FMNIST_MAX_PENDING_REQUESTS); retry later",
    431: "X-Fmnist-Metadata is 2048 bytes; the limit is 1024",
    503: "the broker is unavailable (kafka://127.0.0.1:9092); retry later",
}
