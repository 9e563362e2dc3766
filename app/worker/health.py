"""A worker's health endpoint: `GET /healthz` (the process and its event loop answer) and `GET /readyz`.

Workers serve no HTTP otherwise, so this is a minimal HTTP/1.1 responder on asyncio streams rather than
an ASGI app: orchestrators (Kubernetes probes, load balancers) only need a status line and a short body.
Each connection sends one request and gets one answer; a request head larger than `_MAX_HEAD` or slower
than `_READ_TIMEOUT_S` is dropped, so a stray client cannot hold memory or a task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

import orjson

from app.logs import kv

log = logging.getLogger(__name__)

_MAX_HEAD = 8192
_READ_TIMEOUT_S = 5.0

Readiness = Callable[[], tuple[bool, str]]
"""Returns (ready, reason): the reason says what the worker waits for when it is not ready."""


class HealthServer:
    """Answers `/healthz` with 200 while the event loop runs and `/readyz` from `readiness()`."""

    def __init__(self, host: str, port: int, readiness: Readiness) -> None:
        self.host = host
        self.port = port
        self._readiness = readiness
        self._server: asyncio.Server | None = None

    @property
    def bound_port(self) -> int:
        """The port actually listened on (differs from `port` when that was 0)."""
        assert self._server is not None, "start() first"
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._answer, self.host, self.port, limit=_MAX_HEAD
        )
        log.info(kv("worker_health_listening", url=f"http://{self.host}:{self.bound_port}/healthz"))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(_READ_TIMEOUT_S):
                head = await reader.readuntil(b"\r\n\r\n")
            status, body = self._route(head.split(b"\r\n", 1)[0])
            payload = orjson.dumps(body)
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
                + payload
            )
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass  # a probe that hung up or never finished its request gets nothing
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    def _route(self, request_line: bytes) -> tuple[str, dict[str, object]]:
        parts = request_line.split()
        if len(parts) != 3 or parts[0] not in (b"GET", b"HEAD"):
            return "405 Method Not Allowed", {"error": "only GET /healthz and GET /readyz"}
        path = parts[1].split(b"?", 1)[0]
        if path == b"/healthz":
            return "200 OK", {"status": "ok"}
        if path == b"/readyz":
            ready, reason = self._readiness()
            if ready:
                return "200 OK", {"status": "ready"}
            return "503 Service Unavailable", {"status": "not_ready", "reason": reason}
        return "404 Not Found", {"error": "only GET /healthz and GET /readyz"}


@contextlib.asynccontextmanager
async def health_server(
    host: str, port: int | None, readiness: Readiness
) -> AsyncIterator[HealthServer | None]:
    """Run a `HealthServer` for the block; nothing when `port` is None (the endpoint is off)."""
    if port is None:
        yield None
        return
    server = HealthServer(host, port, readiness)
    await server.start()
    try:
        yield server
    finally:
        await server.close()
