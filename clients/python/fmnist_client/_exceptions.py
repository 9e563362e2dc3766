"""The SDK's exception tree and the mapping from HTTP error responses to it.

Every exception the SDK raises on purpose derives from `FmnistError`:

    FmnistError                 anything that went wrong talking to fmnist-service
    ├── BadRequest              400 / 413 / 415 / 422 / 431: the image, a header or a parameter was refused
    ├── Unauthorized            401 / 403: API key missing or wrong
    ├── NotFound                404: unknown (or expired) request id
    ├── Overloaded              429: the gateway is full; retried, then raised
    ├── Unavailable             503, or the gateway cannot be reached; retried, then raised
    ├── Timeout                 no answer (or no result) within the time allowed
    └── PredictionFailed        the service accepted the image but could not classify it

Each carries `status_code` (None when no HTTP response was involved), the server's stable
error `code`, its `message`, and the `request_id` where there is one; `str(error)` shows them all.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._models import Prediction


class FmnistError(Exception):
    """Base class of every error the SDK raises on purpose."""

    def __init__(
        self,
        message: str,
        *,
        code: str = "client_error",
        status_code: int | None = None,
        request_id: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        self.message = message
        self.code = code
        self.status_code = status_code
        self.request_id = request_id
        self.retry_after = retry_after
        super().__init__(message)

    def __str__(self) -> str:
        where = [f"code={self.code}"]
        if self.status_code is not None:
            where.insert(0, f"HTTP {self.status_code}")
        if self.request_id:
            where.append(f"request_id={self.request_id}")
        return f"{self.message} ({', '.join(where)})"


class BadRequest(FmnistError):
    """The service refused the input: bad image, too large (413), wrong type (415) or bad parameter."""


class Unauthorized(FmnistError):
    """The API key is missing (401) or not accepted (403)."""


class NotFound(FmnistError):
    """No such request id: never submitted with this key, or its result expired."""


class Overloaded(FmnistError):
    """The gateway answered 429 on every attempt; `retry_after` says when to come back."""


class Unavailable(FmnistError):
    """The service is down or its broker is unreachable (503), or the gateway cannot be reached."""


class Timeout(FmnistError):
    """No response, or no result, within the time allowed. The request may still complete."""


class PredictionFailed(FmnistError):
    """The service accepted the image but classifying it failed; `prediction` holds the result."""

    def __init__(self, prediction: Prediction) -> None:
        error = prediction.error
        super().__init__(
            error.message if error else "prediction failed",
            code=error.code if error else "failed",
            request_id=prediction.request_id,
        )
        self.prediction = prediction


_ERROR_FOR_STATUS: dict[int, type[FmnistError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Unauthorized,
    404: NotFound,
    405: BadRequest,
    408: Timeout,
    409: BadRequest,
    413: BadRequest,
    415: BadRequest,
    422: BadRequest,
    431: BadRequest,
    429: Overloaded,
    502: Unavailable,
    503: Unavailable,
    504: Timeout,
}


def error_from_response(
    status_code: int, body: Any, *, retry_after: float | None = None
) -> FmnistError:
    """Build the exception for an error response; `body` is its parsed JSON (or None)."""
    code, message, request_id = f"http_{status_code}", f"HTTP {status_code}", None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        code = str(error.get("code") or code)
        message = str(error.get("message") or message)
        request_id = error.get("request_id")
    elif isinstance(body, dict) and "detail" in body:
        # Starlette's own errors (e.g. 405 before our handlers run) use {"detail": ...}.
        message = str(body["detail"])
    error_class = _ERROR_FOR_STATUS.get(status_code, FmnistError)
    return error_class(
        message,
        code=code,
        status_code=status_code,
        request_id=request_id,
        retry_after=retry_after,
    )
