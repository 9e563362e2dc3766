"""The retryable refusals of the gateway runtime: 503 while the broker or the shared state is away, 429 when full."""

from __future__ import annotations

from app.gateway.errors import ApiError

RETRY_AFTER_BROKER_S = 2
RETRY_AFTER_OVERLOAD_S = 1


def broker_unavailable(message: str, request_id: str | None = None) -> ApiError:
    """503 `broker_unavailable`: the broker link is down or did not take a request."""
    return _retry_later(503, "broker_unavailable", message, request_id, RETRY_AFTER_BROKER_S)


def too_many_requests(message: str, request_id: str | None = None) -> ApiError:
    """429 `too_many_requests`: the gateway's or the workers' bound on waiting requests is reached."""
    return _retry_later(429, "too_many_requests", message, request_id, RETRY_AFTER_OVERLOAD_S)


def shared_unavailable(exc: BaseException) -> ApiError:
    """503 `shared_state_unavailable`: the gateways' shared state (Redis) did not answer."""
    message = f"the gateways' shared state is unreachable ({exc}); retry later"
    return _retry_later(503, "shared_state_unavailable", message, None, RETRY_AFTER_BROKER_S)


def _retry_later(
    status: int, code: str, message: str, request_id: str | None, retry_after_s: int
) -> ApiError:
    headers = {"Retry-After": str(retry_after_s)}
    return ApiError(status, code, message, request_id=request_id, headers=headers)
