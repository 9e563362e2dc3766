"""The gateway's rollout endpoints (docs/api.md) over httpx, for `fmnist promote`: read a model and
its shadow comparison, set weights, record decisions; a failed call is a `GatewayError` that says
what to do about 401 and 403."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import httpx

HTTP_TIMEOUT_S = 30.0


class GatewayError(RuntimeError):
    """A gateway call that failed: the status and the gateway's own message."""

    def __init__(self, what: str, status: int | None, message: str) -> None:
        self.status = status
        hint = {
            401: " (pass an admin key: --api-key or FMNIST_API_KEY)",
            403: " (the key is not an admin key: see FMNIST_ADMIN_API_KEYS)",
        }.get(status or 0, "")
        super().__init__(f"{what}: {message}{hint}")


class RolloutApi:
    """The contract's rollout endpoints of one gateway, over httpx."""

    def __init__(
        self, url: str, api_key: str | None, *, transport: httpx.BaseTransport | None = None
    ) -> None:
        import httpx

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(
            base_url=url, headers=headers, timeout=HTTP_TIMEOUT_S, transport=transport
        )

    def close(self) -> None:
        self._client.close()

    def _call(self, what: str, method: str, path: str, body: object = None) -> Any:
        import httpx

        try:
            response = self._client.request(method, path, json=body)
        except httpx.HTTPError as exc:
            where = self._client.base_url
            raise GatewayError(what, None, f"{exc} (is the gateway at {where}?)") from None
        if response.is_success:
            return response.json()
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:200] or response.reason_phrase
        raise GatewayError(what, response.status_code, f"{response.status_code} {message}")

    def model(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("reading the model", "GET", f"/v1/models/{name}")
        return result

    def shadow(self, name: str) -> list[dict[str, Any]]:
        body = self._call("reading the shadow comparison", "GET", f"/v1/models/{name}/shadow")
        return list(body.get("candidates", []))

    def set_weights(self, name: str, weights: Mapping[str, int], reason: str) -> None:
        body = {"weights": dict(weights), "reason": reason}
        self._call("setting the weights", "PUT", f"/v1/models/{name}/weights", body)

    def record(self, name: str, event: Mapping[str, Any]) -> None:
        self._call("recording the decision", "POST", f"/v1/models/{name}/history", event)
