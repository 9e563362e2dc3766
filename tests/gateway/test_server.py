"""The server under the gateway (app/gateway/server.py and the edge middleware) against raw sockets: header
blocks bounded in size and time, bodies bounded in time and in total, idle connections closed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator

import pytest

from tests.gateway.helpers import gateway_settings, serving

pytestmark = pytest.mark.timeout(30)


@contextlib.asynccontextmanager
async def raw_connection(
    base: str,
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    host, port = base.split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def read_response(reader: asyncio.StreamReader, within: float = 5.0) -> tuple[int, bytes]:
    """The status and body of the one response the server sends before closing."""
    raw = await asyncio.wait_for(reader.read(), within)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head, "the server closed without answering"
    return int(head.split()[1]), body


async def test_an_unterminated_header_block_is_refused_with_431_as_it_arrives() -> None:
    """Header bytes past the limit get 431 while the block is still open, without waiting for its end."""
    settings = gateway_settings(max_header_bytes=4096)
    async with serving(settings) as (_, base), raw_connection(base) as (reader, writer):
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Filler: " + b"a" * 64 * 1024)
        await writer.drain()
        status, body = await read_response(reader)
    assert status == 431
    assert json.loads(body)["error"]["code"] == "header_too_large"


async def test_a_header_block_slower_than_the_timeout_gets_408() -> None:
    """A client trickling its headers is answered 408 and disconnected after the header timeout."""
    settings = gateway_settings(header_read_timeout_s=0.5)
    async with serving(settings) as (_, base), raw_connection(base) as (reader, writer):
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        await writer.drain()
        status, _ = await read_response(reader)
    assert status == 408


async def test_a_connection_that_sends_nothing_is_closed() -> None:
    """A connection that never starts a request is closed after the header timeout."""
    settings = gateway_settings(header_read_timeout_s=0.5)
    async with serving(settings) as (_, base), raw_connection(base) as (reader, _):
        assert await asyncio.wait_for(reader.read(), 5) == b""


async def test_an_idle_keep_alive_connection_is_closed_after_the_setting() -> None:
    """After a response, an idle connection is closed after FMNIST_KEEP_ALIVE_TIMEOUT_S."""
    settings = gateway_settings(keep_alive_timeout_s=1)
    async with serving(settings) as (_, base), raw_connection(base) as (reader, writer):
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        started = asyncio.get_running_loop().time()
        await asyncio.wait_for(reader.read(), 4)  # the response, then EOF when the server closes
        idle_s = asyncio.get_running_loop().time() - started
    assert idle_s < 3


async def test_a_body_slower_than_the_timeout_gets_408() -> None:
    """A client that sends part of its body and stalls is answered 408."""
    settings = gateway_settings(body_read_timeout_s=0.5)
    async with serving(settings) as (_, base), raw_connection(base) as (reader, writer):
        writer.write(
            b"POST /v1/predictions HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            b"Content-Length: 1000\r\n\r\n" + b"\x89PNG"
        )
        await writer.drain()
        status, body = await read_response(reader)
    assert status == 408
    assert json.loads(body)["error"]["code"] == "request_timeout"


async def test_bodies_past_the_global_budget_get_503_with_retry_after() -> None:
    """Two held-open bodies that together pass FMNIST_MAX_BODY_BYTES_IN_FLIGHT: the second gets 503."""
    settings = gateway_settings(max_body_bytes_in_flight=100_000)
    head = (
        b"POST /v1/predictions HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        b"Content-Length: 80000\r\n\r\n"
    )
    async with (
        serving(settings) as (_, base),
        raw_connection(base) as (first_reader, first),
        raw_connection(base) as (reader, second),
    ):
        first.write(head + b"a" * 60_000)  # held open: 20,000 bytes never come
        await first.drain()
        await asyncio.sleep(0.3)
        second.write(head + b"b" * 60_000)
        await second.drain()
        raw = await asyncio.wait_for(reader.read(), 5)
        with pytest.raises(TimeoutError):  # the first, within the budget, is still being received
            await asyncio.wait_for(first_reader.read(1), 0.2)
    status_line, _, rest = raw.partition(b"\r\n")
    assert int(status_line.split()[1]) == 503
    assert b"retry-after: 1" in rest.lower()


async def test_a_client_leaving_mid_body_costs_no_error_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A client that disconnects halfway through its body is logged at most as INFO, never ERROR."""
    async with serving(gateway_settings()) as (_, base):
        with caplog.at_level(logging.INFO):
            async with raw_connection(base) as (_, writer):
                writer.write(
                    b"POST /v1/predictions HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                    b"Content-Length: 100000\r\n\r\n" + b"\x89PNG" * 1000
                )
                await writer.drain()
                await asyncio.sleep(0.2)
            await asyncio.sleep(0.3)  # the server notices the disconnect
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []
