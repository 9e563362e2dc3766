"""The HTTP server under the gateway: uvicorn, with what one connection may hold or take bounded.

uvicorn's httptools protocol buffers a request's header block until it is complete, with no limit and
no timeout; `BoundedHeadersProtocol` counts the bytes as they arrive and answers 431 past
`FMNIST_MAX_HEADER_BYTES`, or 408 when the block takes longer than `FMNIST_HEADER_READ_TIMEOUT_S`;
a body that takes longer than `FMNIST_BODY_READ_TIMEOUT_S` is answered 408 too.
`GatewayWebSocketProtocol` answers an over-long websocket request line (414) at once instead of never,
logs a refused handshake in one line, and drops a client that has not finished closing soon after the
app is done with it (one that stopped reading never does).
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from app.gateway.errors import error_body
from app.logs import kv
from app.settings import Settings

log = logging.getLogger(__name__)

# Room for the request line on top of the header block: a websocket's `ids=` query lives there
# (the websockets library refuses request lines over 8 KiB itself).
REQUEST_LINE_BYTES = 8 * 1024
# Room for JSON framing and metadata around a base64 image in one websocket `submit` message.
WS_MESSAGE_OVERHEAD_BYTES = 64 * 1024
# A websocket whose app has finished but whose client has not completed the close by then is dropped.
WS_ABANDON_AFTER_S = 5.0


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """What the protocols enforce, read once from the settings."""

    max_header_block_bytes: int
    header_read_timeout_s: float
    body_read_timeout_s: float

    @classmethod
    def from_settings(cls, settings: Settings) -> ConnectionLimits:
        return cls(
            max_header_block_bytes=settings.max_header_bytes + REQUEST_LINE_BYTES,
            header_read_timeout_s=settings.header_read_timeout_s,
            body_read_timeout_s=settings.body_read_timeout_s,
        )


class GatewayConfig(uvicorn.Config):
    """uvicorn's config, carrying the gateway's connection limits to its protocols."""

    connection_limits: ConnectionLimits


def uvicorn_config(app: Any, settings: Settings, *, host: str, port: int) -> GatewayConfig:
    """The uvicorn config `fmnist serve`/`fmnist gateway` (and the tests' servers) run with."""
    config = GatewayConfig(
        app,
        host=host,
        port=port,
        http=BoundedHeadersProtocol,
        ws=GatewayWebSocketProtocol,
        ws_max_size=settings.max_upload_bytes * 4 // 3 + WS_MESSAGE_OVERHEAD_BYTES,
        timeout_keep_alive=settings.keep_alive_timeout_s,
        log_config=None,  # keep our key=value logging
        access_log=False,  # one line per request is too costly at thousands of images/s; see /metrics
        lifespan="on",
    )
    config.connection_limits = ConnectionLimits.from_settings(settings)
    return config


def _limits_of(config: uvicorn.Config) -> ConnectionLimits:
    limits = getattr(config, "connection_limits", None)
    if isinstance(limits, ConnectionLimits):
        return limits
    defaults = {name: field.default for name, field in Settings.model_fields.items()}
    return ConnectionLimits(
        max_header_block_bytes=defaults["max_header_bytes"] + REQUEST_LINE_BYTES,
        header_read_timeout_s=defaults["header_read_timeout_s"],
        body_read_timeout_s=defaults["body_read_timeout_s"],
    )


class BoundedHeadersProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol; a header block over the limit is refused with 431 as it arrives,
    one slower than the timeout with 408, and a connection that sends nothing is closed after it; a
    body slower than its timeout gets 408 too."""

    def __init__(self, config: uvicorn.Config, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        limits = _limits_of(config)
        self._max_header_block = limits.max_header_block_bytes
        self._header_timeout_s = limits.header_read_timeout_s
        self._body_timeout_s = limits.body_read_timeout_s
        self._awaiting_headers = True
        self._header_bytes = 0
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        self._cancel_body_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._awaiting_headers:
            self._header_bytes += len(data)
        super().data_received(data)
        # Checked after parsing: a chunk that completes the headers (and carries body bytes) passes.
        if self._awaiting_headers and self._header_bytes and not self.transport.is_closing():
            if self._header_bytes > self._max_header_block:
                self._refuse(
                    431,
                    "header_too_large",
                    f"the request line and headers exceed {self._max_header_block} bytes "
                    "(FMNIST_MAX_HEADER_BYTES)",
                )
            elif self._header_timer is None:
                # Whole header blocks arrive in one read on the hot path and never get here.
                self._arm_header_timer()
        elif (
            not self._awaiting_headers
            and self._body_timer is None
            and self.cycle is not None
            and self.cycle.scope is self.scope  # not a websocket upgrade, which has no cycle
            and self.cycle.more_body
        ):
            # A body that did not come whole with its headers: the clock starts (never on the hot path).
            self._body_timer = self.loop.call_later(self._body_timeout_s, self._body_timed_out)

    def on_headers_complete(self) -> None:
        self._awaiting_headers = False
        self._header_bytes = 0
        self._cancel_header_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._awaiting_headers = True
        self._cancel_body_timer()

    def _arm_header_timer(self) -> None:
        self._header_timer = self.loop.call_later(self._header_timeout_s, self._headers_timed_out)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _cancel_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _body_timed_out(self) -> None:
        self._body_timer = None
        cycle = self.cycle
        if cycle is None or not cycle.more_body or self.transport.is_closing():
            return
        if cycle.response_started:
            self.transport.close()
            return
        # The app, waiting for the rest of the body, sees a disconnect once the transport closes.
        self._refuse(
            408,
            "request_timeout",
            f"the request body did not arrive within {self._body_timeout_s:g} s "
            "(FMNIST_BODY_READ_TIMEOUT_S)",
        )

    def _headers_timed_out(self) -> None:
        self._header_timer = None
        if not self._awaiting_headers or self.transport.is_closing():
            return
        if self._header_bytes == 0:
            self.transport.close()  # connected and said nothing: no request to answer
            return
        self._refuse(
            408,
            "request_timeout",
            f"the request headers did not arrive within {self._header_timeout_s:g} s "
            "(FMNIST_HEADER_READ_TIMEOUT_S)",
        )

    def _refuse(self, status: int, code: str, message: str) -> None:
        log.info(kv("connection_refused", status=status, code=code, client=_client(self.client)))
        self._cancel_header_timer()
        self._awaiting_headers = False
        body = json.dumps(error_body(code, message)).encode()
        head = (
            f"HTTP/1.1 {status} {'Request Header Fields Too Large' if status == 431 else 'Request Timeout'}\r\n"
            "content-type: application/json\r\n"
            f"content-length: {len(body)}\r\n"
            "connection: close\r\n\r\n"
        ).encode()
        self.transport.write(head + body)
        self.transport.close()


class _DemotedInfo(logging.LoggerAdapter):
    """websockets' per-connection INFO lines ("connection open", "connection rejected") at DEBUG:
    uvicorn already logs one line per handshake."""

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        super().log(logging.DEBUG if level == logging.INFO else level, msg, *args, **kwargs)


class GatewayWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's websockets protocol: one log line per refused handshake, a prompt answer to a
    request the websockets parser refuses, and no connection kept for a client that stopped reading."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.conn.logger = _DemotedInfo(self.conn.logger, {})

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if (
            not self.handshake_initiated
            and self.conn.handshake_exc is not None
            and not self.transport.is_closing()
        ):
            # The parser refused the request (e.g. a request line over 8 KiB) and queued its answer;
            # uvicorn never writes it, and the client would wait for its own timeout.
            response = self.conn.data_to_send()
            log.info(
                kv(
                    "websocket_refused",
                    client=_client(self.client),
                    error=self.conn.handshake_exc,
                )
            )
            self.transport.write(b"".join(response))
            self.transport.close()

    async def send(self, message: Any) -> None:
        await super().send(message)
        if message["type"] == "websocket.http.response.body" and not message.get("more_body"):
            # The denial response answered the handshake; uvicorn would otherwise log an ERROR
            # ("returned without completing handshake") for every refused key or bad query.
            self.handshake_complete = True

    async def run_asgi(self) -> None:
        await super().run_asgi()
        if not self.disconnected:
            self.loop.call_later(WS_ABANDON_AFTER_S, self._abandon)

    def _abandon(self) -> None:
        if not self.disconnected:
            log.info(
                kv("websocket_dropped", client=_client(self.client), reason="close not completed")
            )
            self.transport.abort()


def _client(address: tuple[str, int] | None) -> str:
    return f"{address[0]}:{address[1]}" if address else "unknown"
