"""The result stream: `WS /v1/predictions/stream` as an iterator (async or sync) that reconnects and resumes."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncGenerator, Callable, Collection, Generator
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlencode

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.sync.client import connect as connect_sync

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


StreamState = Literal["connecting", "connected", "lost", "retrying"]


@dataclass(frozen=True)
class StreamEvent:
    """A change in the result stream's connection, for `stream(on_event=...)`.

    `state` is "connecting" (opening the websocket), "connected", "lost" (a connection attempt
    failed or an open connection dropped; `reason` says why) or "retrying" (`delay_s` before the
    next attempt, `attempt` counting consecutive failures from 1).
    """

    state: StreamState
    url: str
    reason: str | None = None
    delay_s: float | None = None
    attempt: int = 0


StreamEventCallback = Callable[[StreamEvent], None]

# What a connection attempt or an open connection may raise that is worth judging in `lost()`.
STREAM_ERRORS: tuple[type[BaseException], ...] = (
    InvalidHandshake,
    ConnectionClosed,
    OSError,
    TimeoutError,
)


class StreamSession:
    """The result stream's state across reconnections, without I/O.

    The async and the sync loop each open sockets and sleep; this decides everything else: the URL
    to open (filter and resume cursor), the `subscribe` messages to send once connected, what each
    message means, and after a failure whether to raise or how long to wait.
    `reconnects` bounds consecutive failed attempts (None: keep trying forever); a connection
    that delivered something resets the count.
    """

    def __init__(
        self,
        base_url: str,
        *,
        ids: Collection[str] | None,
        after: int | None,
        reconnects: int | None,
        retry_policy: RetryPolicy,
        on_event: StreamEventCallback | None = None,
    ) -> None:
        self.base_url = base_url
        self.remaining = set(ids) if ids is not None else None
        self.cursor = after
        self.failures = 0
        self.reconnects = reconnects
        self.retry_policy = retry_policy
        self._on_event = on_event

    @property
    def finished(self) -> bool:
        """True once every requested id has been yielded (never, without `ids`)."""
        return self.remaining is not None and not self.remaining

    @property
    def endpoint(self) -> str:
        """The websocket URL without its query, for messages."""
        return stream_url(self.base_url, ids=None, after=None)

    def connecting(self) -> str:
        """Note the attempt; the URL to open now."""
        self._emit(StreamEvent("connecting", self.endpoint, attempt=self.failures))
        return stream_url(self.base_url, ids=self.remaining, after=self.cursor)

    def connected(self) -> list[str]:
        """Note the connection; the `subscribe` messages to send before reading."""
        logger.debug("event=stream_connected url=%s", self.endpoint)
        self._emit(StreamEvent("connected", self.endpoint))
        if not self.remaining or ids_fit_in_url(self.remaining):
            return []
        pending = sorted(self.remaining)
        return [
            json.dumps({"type": "subscribe", "ids": pending[start : start + SUBSCRIBE_CHUNK]})
            for start in range(0, len(pending), SUBSCRIBE_CHUNK)
        ]

    def received(self, raw: str | bytes) -> Prediction | None:
        """The prediction to yield for one message, or None for one to skip; raises the
        gateway's error messages."""
        message = _decode(raw)
        kind = message.get("type")
        if kind == "error":
            raise _stream_error(message)
        if kind != "result":
            return None
        self.failures = 0
        prediction = Prediction.from_json(message)
        if prediction.cursor is not None:
            self.cursor = prediction.cursor
        if self.remaining is not None:
            if prediction.request_id not in self.remaining:
                return None
            self.remaining.discard(prediction.request_id)
        return prediction

    def lost(self, error: BaseException | None) -> float:
        """Judge a failed attempt or a dropped connection (`error` None: the server closed it);
        raise when retrying cannot help or the attempts are spent, else the seconds to wait."""
        reason = self._reason(error)
        self._emit(StreamEvent("lost", self.endpoint, reason=reason, attempt=self.failures + 1))
        if self.reconnects is not None and self.failures >= self.reconnects:
            raise Unavailable(
                f"result stream at {self.endpoint} lost and not re-established after "
                f"{self.failures} attempts ({reason}); is the gateway running?",
                code="stream_unavailable",
            )
        delay = self.retry_policy.delay(min(self.failures, 8), None)
        logger.info(
            "event=stream_reconnect reason=%r after=%s delay_s=%.3f", reason, self.cursor, delay
        )
        self.failures += 1
        self._emit(
            StreamEvent(
                "retrying", self.endpoint, reason=reason, delay_s=delay, attempt=self.failures
            )
        )
        return delay

    def _reason(self, error: BaseException | None) -> str:
        if error is None:
            return "closed by server"
        if isinstance(error, InvalidStatus):
            status = error.response.status_code
            if status not in _RETRY_HANDSHAKE_STATUSES:
                raise error_from_response(status, _json_or_none(error.response.body)) from error
            return f"HTTP {status}"
        if isinstance(error, ConnectionClosed):
            close = error.rcvd
            if close is not None and close.code == CLOSE_POLICY_VIOLATION:
                # The gateway refused the stream itself (bad key, bad `ids`): retrying cannot help.
                raise _refusal(close.reason) from error
            if close is not None and close.code == CLOSE_TRY_AGAIN_LATER:
                # We fell behind and the gateway shed us; resuming from the cursor loses nothing.
                self.failures = 0
            return f"connection closed ({close.code if close else 'no close frame'})"
        return f"{type(error).__name__}: {error}"

    def _emit(self, event: StreamEvent) -> None:
        if self._on_event is not None:
            self._on_event(event)


async def stream_predictions(
    session: StreamSession, *, api_key: str | None, open_timeout: float
) -> AsyncGenerator[Prediction, None]:
    """Yield results as they arrive; on a dropped connection, reconnect and resume after the
    last cursor seen. With `ids`, end once each of them has been yielded."""
    while not session.finished:
        error: BaseException | None = None
        try:
            async with connect(
                session.connecting(),
                additional_headers=auth_headers(api_key),
                open_timeout=open_timeout,
            ) as websocket:
                for subscribe in session.connected():
                    await websocket.send(subscribe)
                async for raw in websocket:
                    prediction = session.received(raw)
                    if prediction is not None:
                        yield prediction
                        if session.finished:
                            return
        except STREAM_ERRORS as failure:
            error = failure
        await asyncio.sleep(session.lost(error))


def stream_predictions_sync(
    session: StreamSession, *, api_key: str | None, open_timeout: float
) -> Generator[Prediction, None, None]:
    """`stream_predictions` on the websockets sync client, for `Client.stream()`."""
    while not session.finished:
        error: BaseException | None = None
        try:
            with connect_sync(
                session.connecting(),
                additional_headers=auth_headers(api_key),
                open_timeout=open_timeout,
            ) as websocket:
                for subscribe in session.connected():
                    websocket.send(subscribe)
                for raw in websocket:
                    prediction = session.received(raw)
                    if prediction is not None:
                        yield prediction
                        if session.finished:
                            return
        except STREAM_ERRORS as failure:
            error = failure
        time.sleep(session.lost(error))


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
