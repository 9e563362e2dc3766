"""The result stream: `WS /v1/predictions/stream` as an async iterator that reconnects and resumes."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator, Collection
from typing import Any
from urllib.parse import urlencode

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from ._base import RetryPolicy, auth_headers
from ._exceptions import FmnistError, Unavailable, error_from_response
from ._models import Prediction

logger = logging.getLogger("fmnist_client")

STREAM_PATH = "/v1/predictions/stream"
# Handshake answers worth another try: the gateway is starting, full, or behind a restarting proxy.
_RETRY_HANDSHAKE_STATUSES = frozenset({429, 500, 502, 503, 504})
CLOSE_POLICY_VIOLATION = 1008  # the gateway refused this stream (auth, bad query)
CLOSE_TRY_AGAIN_LATER = 1013  # the gateway shed a slow reader; resume with `after`
# Ids beyond what fits comfortably in a URL are sent in `subscribe` messages after connecting.
MAX_IDS_IN_URL_CHARS = 2000
SUBSCRIBE_CHUNK = 1000


def stream_url(base_url: str, *, ids: Collection[str] | None, after: int | None) -> str:
    """The websocket URL for the given filter and resume cursor (http→ws, https→wss)."""
    scheme, _, rest = base_url.partition("://")
    ws_scheme = {"http": "ws", "https": "wss"}.get(scheme, scheme)
    params: dict[str, str] = {}
    if ids is not None:
        # Too many for the URL: filter on nothing yet, `subscribe` messages add them (no gap: the
        # gateway replays an id's stored result when it is subscribed).
        params["ids"] = ",".join(sorted(ids)) if ids_fit_in_url(ids) else ""
    if after is not None:
        params["after"] = str(after)
    query = f"?{urlencode(params)}" if params else ""
    return f"{ws_scheme}://{rest}{STREAM_PATH}{query}"


def ids_fit_in_url(ids: Collection[str]) -> bool:
    return sum(len(request_id) + 1 for request_id in ids) <= MAX_IDS_IN_URL_CHARS


async def stream_predictions(
    base_url: str,
    *,
    api_key: str | None,
    ids: Collection[str] | None,
    after: int | None,
    reconnects: int | None,
    retry_policy: RetryPolicy,
    open_timeout: float,
) -> AsyncGenerator[Prediction, None]:
    """Yield results as they arrive; on a dropped connection, reconnect and resume after the
    last cursor seen. With `ids`, end once each of them has been yielded.

    `reconnects` bounds consecutive failed attempts (None: keep trying forever); a connection
    that delivered something resets the count.
    """
    remaining = set(ids) if ids is not None else None
    if remaining is not None and not remaining:
        return
    cursor = after
    failures = 0
    while True:
        url = stream_url(base_url, ids=remaining, after=cursor)
        try:
            async with connect(
                url, additional_headers=auth_headers(api_key), open_timeout=open_timeout
            ) as websocket:
                logger.debug("event=stream_connected url=%s", url.split("?")[0])
                if remaining and not ids_fit_in_url(remaining):
                    pending = sorted(remaining)
                    for start in range(0, len(pending), SUBSCRIBE_CHUNK):
                        chunk = pending[start : start + SUBSCRIBE_CHUNK]
                        await websocket.send(json.dumps({"type": "subscribe", "ids": chunk}))
                async for raw in websocket:
                    message = _decode(raw)
                    kind = message.get("type")
                    if kind == "error":
                        raise _stream_error(message)
                    if kind != "result":
                        continue
                    failures = 0
                    prediction = Prediction.from_json(message)
                    if prediction.cursor is not None:
                        cursor = prediction.cursor
                    if remaining is not None:
                        if prediction.request_id not in remaining:
                            continue
                        remaining.discard(prediction.request_id)
                    yield prediction
                    if remaining is not None and not remaining:
                        return
            reason = "closed by server"
        except InvalidStatus as error:
            status = error.response.status_code
            if status not in _RETRY_HANDSHAKE_STATUSES:
                raise error_from_response(status, _json_or_none(error.response.body)) from error
            reason = f"HTTP {status}"
        except ConnectionClosed as error:
            close = error.rcvd
            if close is not None and close.code == CLOSE_POLICY_VIOLATION:
                # The gateway refused the stream itself (bad key, bad `ids`): retrying cannot help.
                raise _refusal(close.reason) from error
            if close is not None and close.code == CLOSE_TRY_AGAIN_LATER:
                # We fell behind and the gateway shed us; resuming from the cursor loses nothing.
                failures = 0
            reason = f"connection closed ({close.code if close else 'no close frame'})"
        except (InvalidHandshake, OSError, TimeoutError) as error:
            reason = f"{type(error).__name__}: {error}"
        if reconnects is not None and failures >= reconnects:
            raise Unavailable(
                f"result stream at {url.split('?')[0]} lost and not re-established after "
                f"{failures} attempts ({reason}); is the gateway running?",
                code="stream_unavailable",
            )
        delay = retry_policy.delay(min(failures, 8), None)
        logger.info("event=stream_reconnect reason=%r after=%s delay_s=%.3f", reason, cursor, delay)
        failures += 1
        await asyncio.sleep(delay)


def _decode(raw: str | bytes) -> dict[str, Any]:
    try:
        message = json.loads(raw)
    except ValueError:
        return {}
    return message if isinstance(message, dict) else {}


def _json_or_none(body: bytes | bytearray | None) -> Any:
    try:
        return json.loads(body or b"")
    except ValueError:
        return None


def _refusal(reason: str) -> FmnistError:
    """The error for a 1008 close, whose reason reads "STATUS CODE: message"."""
    status_text, _, rest = reason.partition(" ")
    code, _, message = rest.partition(": ")
    status = int(status_text) if status_text.isdigit() else 400
    return error_from_response(
        status, {"error": {"code": code or "stream_refused", "message": message or reason}}
    )


def _stream_error(message: dict[str, Any]) -> FmnistError:
    error = message.get("error")
    if not isinstance(error, dict):
        error = {}
    code = str(error.get("code") or "stream_error")
    status = {"unauthorized": 401, "forbidden": 403, "not_found": 404}.get(code, 400)
    return error_from_response(
        status, {"error": error or {"code": code, "message": "stream error"}}
    )
