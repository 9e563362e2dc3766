"""API-key authentication: who is calling (an owner fingerprint, never the key itself), for HTTP and websockets."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from starlette.requests import HTTPConnection

from app.gateway.errors import ApiError
from app.logs import is_api_key_parameter

ANONYMOUS = ""  # the owner of every request when auth is off


def key_fingerprint(key: str) -> str:
    """A short, stable, non-reversible id for an API key: it tags requests and results as the key's own."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


class ApiKeys:
    """The configured keys. Empty: auth is off and every caller is `ANONYMOUS`.

    Admin keys (`FMNIST_ADMIN_API_KEYS`) are needed for the admin calls whenever any key is
    configured, and work as API keys too; without any key the admin calls are open like the rest.
    """

    def __init__(self, keys: Iterable[str], admin_keys: Iterable[str] = ()) -> None:
        self._admin = [key.encode() for key in admin_keys if key]
        self._api = [key.encode() for key in keys if key]
        # Admin keys work on every route; they do not turn auth on for the other routes.
        self._keys = self._api + self._admin if self._api else []

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    @property
    def admin_mode(self) -> str:
        """How admin calls are guarded: `open` (no key configured), `keys`, or `none` (API keys but
        no admin key: every admin call is refused)."""
        if self._admin:
            return "keys"
        return "none" if self._api else "open"

    def admin_of(self, connection: HTTPConnection) -> str:
        """The admin caller's owner fingerprint; 401 without a key, 403 with a key that is not an
        admin key, when any key is configured."""
        if not self._api and not self._admin:
            return ANONYMOUS
        presented = presented_key(connection)
        if presented is None:
            raise _missing_key()
        if not _matches(presented.encode(), self._admin):
            raise ApiError(
                403,
                "forbidden",
                "this call needs an admin key (one listed in FMNIST_ADMIN_API_KEYS)",
            )
        return key_fingerprint(presented)

    def owner_of(self, connection: HTTPConnection) -> str:
        """The caller's owner fingerprint; 401 without a key, 403 with a wrong one."""
        if not self._keys:
            return ANONYMOUS
        return self.owner_of_key(presented_key(connection))

    def owner_of_key(self, presented: str | None) -> str:
        """The owner fingerprint of a presented key (None: none sent); 401/403 as `owner_of`."""
        if not self._keys:
            return ANONYMOUS
        if presented is None:
            raise _missing_key()
        if not _matches(presented.encode(), self._keys):
            raise ApiError(403, "forbidden", "invalid API key")
        return key_fingerprint(presented)


def _missing_key() -> ApiError:
    return ApiError(
        401,
        "unauthorized",
        "missing API key: send `Authorization: Bearer KEY` or `X-API-Key: KEY`"
        " (websockets may use `?api_key=KEY`)",
        headers={"WWW-Authenticate": "Bearer"},
    )


def _matches(candidate: bytes, keys: list[bytes]) -> bool:
    # Compare against every key, in constant time per key, so timing reveals nothing.
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(candidate, key)
    return matched


def presented_key(connection: HTTPConnection) -> str | None:
    """The key the caller sent: `Authorization: Bearer`, `X-API-Key`, or (websockets) `?api_key=`."""
    authorization = connection.headers.get("authorization")
    if authorization:
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            return credentials.strip()
    header_key = connection.headers.get("x-api-key")
    if header_key:
        return header_key.strip()
    if connection.scope.get("type") == "websocket":
        return _query_key(connection)
    return None


def _query_key(connection: HTTPConnection) -> str | None:
    """The key in the websocket's query, under any spelling the log redaction also hides
    (`api_key`, `API_KEY`, `api%5Fkey`); 401 when it is given twice with different values."""
    keys = {
        value
        for name, value in connection.query_params.multi_items()
        if value and is_api_key_parameter(name)
    }
    if len(keys) > 1:
        raise ApiError(
            401,
            "unauthorized",
            "the API key is given more than once with different values; send `?api_key=KEY` once",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return keys.pop() if keys else None
