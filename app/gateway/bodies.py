"""Request body bytes held across every request in flight, HTTP and gRPC alike, against one limit."""

from __future__ import annotations

from app.gateway.errors import ApiError

RETRY_AFTER_BODY_BUDGET_S = 1


class BodyBudget:
    """Request body bytes held across all requests in flight, against one limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def take(self, size: int) -> None:
        """Count `size` more bytes as held; 503 + Retry-After when that would pass the limit."""
        if self.held + size > self.limit:
            raise ApiError(
                503,
                "busy",
                f"the gateway holds {self.limit} bytes of request bodies already "
                "(FMNIST_MAX_BODY_BYTES_IN_FLIGHT); retry shortly",
                headers={"Retry-After": str(RETRY_AFTER_BODY_BUDGET_S), "Connection": "close"},
            )
        self.held += size

    def release(self, size: int) -> None:
        """Stop counting `size` bytes (their request is done)."""
        self.held -= size
