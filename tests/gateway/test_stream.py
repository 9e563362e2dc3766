"""`WS /v1/predictions/stream` on a real uvicorn: pushes, submits, id filters, resume, at-most-once, auth."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

import messaging
from app.protocol import ResultMessage
from tests.gateway.helpers import fashion_like, gateway_settings, png_bytes, serving, worker_running

pytestmark = pytest.mark.timeout(30)

PNG = {"Content-Type": "image/png"}


async def receive(socket: ClientConnection, within: float = 5.0) -> dict[str, Any]:
    message = json.loads(await asyncio.wait_for(socket.recv(), within))
    assert isinstance(message, dict)
    return message


async def nothing_more(socket: ClientConnection, within: float = 0.3) -> None:
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(socket.recv(), within)


async def submit_http(base: str, seed: int, headers: dict[str, str] | None = None) -> str:
    async with httpx.AsyncClient(base_url=f"http://{base}") as client:
        response = await client.post(
            "/v1/predictions",
            content=png_bytes(fashion_like(seed)),
            headers={**PNG, **(headers or {})},
        )
    assert response.status_code in (200, 202), response.text
    return str(response.json()["request_id"])


async def test_results_are_pushed_as_they_arrive() -> None:
    """A connected client receives every new result, with a cursor and the full prediction."""
    settings = gateway_settings()
    async with (
        serving(settings) as (_, base),
        worker_running(settings),
        connect(f"ws://{base}/v1/predictions/stream") as socket,
    ):
        ids = [await submit_http(base, seed) for seed in (1, 2)]
        pushed = [await receive(socket), await receive(socket)]
    assert sorted(m["request_id"] for m in pushed) == sorted(ids)
    assert all(m["type"] == "result" and m["status"] == "completed" for m in pushed)
    assert {m["request_id"]: m["label"] for m in pushed} == {ids[0]: 1, ids[1]: 2}
    assert pushed[0]["cursor"] < pushed[1]["cursor"]


async def test_submit_over_the_socket_is_accepted_then_answered() -> None:
    """A `submit` message gets `accepted` (with its client_ref) before the `result` of that request."""
    settings = gateway_settings()
    async with (
        serving(settings) as (_, base),
        worker_running(settings),
        connect(f"ws://{base}/v1/predictions/stream?ids=") as socket,
    ):
        image = base64.b64encode(png_bytes(fashion_like(6))).decode()
        await socket.send(
            json.dumps(
                {"type": "submit", "image": image, "client_ref": "c-1", "metadata": {"a": "b"}}
            )
        )
        accepted = await receive(socket)
        result = await receive(socket)
    assert accepted["type"] == "accepted" and accepted["client_ref"] == "c-1"
    assert result["type"] == "result" and result["request_id"] == accepted["request_id"]
    assert (result["label"], result["metadata"]) == (6, {"a": "b"})


async def test_bad_messages_get_errors_and_the_socket_stays_open() -> None:
    """Malformed messages and undecodable images answer `error` messages; the connection keeps working."""
    settings = gateway_settings()
    async with (
        serving(settings) as (_, base),
        connect(f"ws://{base}/v1/predictions/stream") as socket,
    ):
        await socket.send("not json")
        not_json = await receive(socket)
        await socket.send("[" * 5000)  # nested deeper than the JSON parser's recursion limit
        too_deep = await receive(socket)
        await socket.send(
            json.dumps(
                {
                    "type": "submit",
                    "image": base64.b64encode(b"nope").decode(),
                    "client_ref": "x",
                }
            )
        )
        bad_image = await receive(socket)
        await socket.send(json.dumps({"type": "dance"}))
        unknown = await receive(socket)
    assert not_json["error"]["code"] == "invalid_message"
    assert too_deep["error"]["code"] == "invalid_message"
    assert bad_image["error"]["code"] == "unsupported_media_type" and bad_image["client_ref"] == "x"
    assert unknown["type"] == "error"


async def test_ids_filter_limits_the_stream() -> None:
    """With `ids=`, only those requests are pushed; `subscribe` adds ids and pushes stored results at once."""
    settings = gateway_settings()
    async with serving(settings) as (app, base), worker_running(settings):
        first, second = await submit_http(base, 1), await submit_http(base, 2)
        store = app.state.gateway.store
        await store.wait_for_all([first, second], 5)
        async with connect(f"ws://{base}/v1/predictions/stream?ids={first}") as socket:
            replayed = await receive(socket)
            await nothing_more(socket)
            await socket.send(json.dumps({"type": "subscribe", "ids": [second, first]}))
            subscribed = await receive(socket)
            await nothing_more(socket)  # `first` was already pushed on this connection
    assert (replayed["request_id"], subscribed["request_id"]) == (first, second)


async def test_resume_after_a_cursor_loses_nothing() -> None:
    """Results that arrive while a client is away are replayed when it reconnects with `after=`."""
    settings = gateway_settings()
    async with (
        serving(settings) as (app, base),
        worker_running(settings),
        connect(f"ws://{base}/v1/predictions/stream") as socket,
    ):
        await submit_http(base, 1)
        last = await receive(socket)
        missed = [await submit_http(base, seed) for seed in (2, 3)]
        await app.state.gateway.store.wait_for_all(missed, 5)
        async with connect(f"ws://{base}/v1/predictions/stream?after={last['cursor']}") as socket:
            replayed = [await receive(socket), await receive(socket)]
            await nothing_more(socket)
    assert [m["request_id"] for m in replayed] == missed


async def test_a_republished_result_is_pushed_once() -> None:
    """A worker publishing the same request id twice (redelivery) reaches the socket once."""
    settings = gateway_settings()
    async with (
        serving(settings) as (_, base),
        connect(f"ws://{base}/v1/predictions/stream") as socket,
    ):
        async with messaging.connect(settings.broker_url) as pubsub:
            for _ in range(2):
                duplicate = ResultMessage(
                    request_id="dup-1", status="completed", label=1, completed_at=time.time()
                )
                await pubsub.publish(settings.results_topic, duplicate.to_bytes(), key="dup-1")
        assert (await receive(socket))["request_id"] == "dup-1"
        await nothing_more(socket)


async def test_stream_needs_a_key_and_shows_only_the_keys_results() -> None:
    """With API keys: no key is 401, a wrong key 403; `?api_key=` streams only that key's results."""
    settings = gateway_settings(api_keys=["alice-key", "bob-key"])
    async with serving(settings) as (_, base), worker_running(settings):
        with pytest.raises(InvalidStatus) as missing:
            async with connect(f"ws://{base}/v1/predictions/stream"):
                pass
        with pytest.raises(InvalidStatus) as wrong:
            async with connect(f"ws://{base}/v1/predictions/stream?api_key=eve"):
                pass
        async with connect(f"ws://{base}/v1/predictions/stream?api_key=alice-key") as socket:
            await submit_http(base, 1, {"X-API-Key": "bob-key"})
            alices = await submit_http(base, 2, {"Authorization": "Bearer alice-key"})
            pushed = await receive(socket)
            await nothing_more(socket)
    assert missing.value.response.status_code == 401
    assert wrong.value.response.status_code == 403
    assert pushed["request_id"] == alices


async def test_a_client_that_falls_behind_is_closed_with_a_resume_cursor() -> None:
    """Past the per-socket queue bound the socket gets what was queued, then close 1013 naming `after=`."""
    settings = gateway_settings(stream_max_queued_messages=5)
    async with (
        serving(settings) as (app, base),
        connect(f"ws://{base}/v1/predictions/stream") as socket,
    ):
        await asyncio.sleep(0.1)  # the session is listening
        store = app.state.gateway.store
        for i in range(20):  # in one go: faster than any socket drains
            store.add_result(
                ResultMessage(request_id=f"burst-{i}", status="completed", completed_at=time.time())
            )
        received = []
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                received.append(await receive(socket))
    assert [m["request_id"] for m in received] == [f"burst-{i}" for i in range(5)]
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013
    assert f"after={received[-1]['cursor']}" in closed.value.rcvd.reason


async def test_a_refused_subscribe_adds_no_ids() -> None:
    """A subscribe refused for passing FMNIST_STREAM_MAX_IDS leaves room for a later one that fits."""
    settings = gateway_settings(stream_max_ids=3)
    async with (
        serving(settings) as (_, base),
        connect(f"ws://{base}/v1/predictions/stream?ids=") as socket,
    ):
        await socket.send(json.dumps({"type": "subscribe", "ids": ["a", "b"]}))
        await socket.send(json.dumps({"type": "subscribe", "ids": ["c", "d"]}))
        refused = await receive(socket)
        await socket.send(json.dumps({"type": "subscribe", "ids": ["c"]}))
        await nothing_more(socket)
    assert refused["error"]["code"] == "validation_error"
    assert "FMNIST_STREAM_MAX_IDS" in refused["error"]["message"]


async def test_a_pushed_id_frees_its_place_under_the_cap() -> None:
    """Once an id's result is pushed it stops counting, so a socket keeps submitting past the cap."""
    settings = gateway_settings(stream_max_ids=1)
    image = base64.b64encode(png_bytes(fashion_like(3))).decode()
    async with (
        serving(settings) as (_, base),
        worker_running(settings),
        connect(f"ws://{base}/v1/predictions/stream?ids=") as socket,
    ):
        kinds = []
        for _ in range(3):
            await socket.send(json.dumps({"type": "submit", "image": image}))
            kinds += [(await receive(socket))["type"], (await receive(socket))["type"]]
    assert kinds == ["accepted", "result"] * 3


async def test_a_long_client_ref_is_refused_not_echoed() -> None:
    """A client_ref over the limit answers an error that does not repeat it."""
    settings = gateway_settings()
    async with (
        serving(settings) as (_, base),
        connect(f"ws://{base}/v1/predictions/stream") as socket,
    ):
        await socket.send(json.dumps({"type": "dance", "client_ref": "r" * 100_000}))
        raw = await asyncio.wait_for(socket.recv(), 5)
    assert len(raw) < 1000 and json.loads(raw)["error"]["code"] == "invalid_message"


async def test_a_client_that_sends_but_never_reads_is_dropped() -> None:
    """Invalid frames from a client that reads nothing fill a bounded queue; the server then drops it."""
    settings = gateway_settings(stream_max_queued_messages=50, stream_send_timeout_s=0.5)
    async with serving(settings) as (_, base):
        host, port = base.split(":")
        reader, writer = await asyncio.open_connection(host, int(port), limit=1024)
        writer.write(
            b"GET /v1/predictions/stream HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
        )
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
        writer.transport.pause_reading()  # nothing the server sends is read from here on
        frame = masked_text_frame(b"[" + b"x" * 1000)  # invalid JSON: each answers an error
        deadline = asyncio.get_running_loop().time() + 20
        dropped = False
        while not dropped and asyncio.get_running_loop().time() < deadline:
            try:
                writer.write(frame * 20)
                await asyncio.wait_for(writer.drain(), 0.2)
            except ConnectionError:
                dropped = True
            except TimeoutError:
                dropped = writer.transport.is_closing()
        writer.transport.abort()
    assert dropped


def masked_text_frame(payload: bytes) -> bytes:
    """One client-to-server text frame (RFC 6455: clients mask; a zero mask keeps the bytes as they are)."""
    assert 125 < len(payload) < 65536
    return bytes([0x81, 0x80 | 126]) + len(payload).to_bytes(2, "big") + b"\0\0\0\0" + payload


async def test_a_submit_past_the_id_cap_is_refused() -> None:
    """A socket already waiting for FMNIST_STREAM_MAX_IDS results gets `too_many_ids` for a submit."""
    settings = gateway_settings(stream_max_ids=1)
    image = base64.b64encode(png_bytes(fashion_like(3))).decode()
    async with (
        serving(settings) as (_, base),
        connect(f"ws://{base}/v1/predictions/stream?ids=never-answered") as socket,
    ):
        await socket.send(json.dumps({"type": "submit", "image": image, "client_ref": "c"}))
        refused = await receive(socket)
    assert (refused["type"], refused["error"]["code"]) == ("error", "too_many_ids")


async def test_a_refused_handshake_logs_one_line_and_no_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A wrong key or a bad query costs one INFO line per attempt, never an ERROR."""
    settings = gateway_settings(api_keys=["alice-key"])
    async with serving(settings) as (_, base):
        caplog.clear()
        with caplog.at_level(logging.DEBUG):
            for query in ("api_key=eve", "api_key=alice-key&after=x"):
                with pytest.raises(InvalidStatus):
                    async with connect(f"ws://{base}/v1/predictions/stream?{query}"):
                        pass
            await asyncio.sleep(0.2)  # the server finishes each attempt after answering it
    lines = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert len(lines) <= 2, [r.getMessage() for r in lines]
    assert all(r.levelno < logging.ERROR for r in lines)


async def test_an_over_long_request_line_is_answered_414_at_once() -> None:
    """`ids=` past the websocket request-line limit answers 414 promptly instead of hanging."""
    ids = ",".join(f"{i:032x}" for i in range(300))
    async with serving(gateway_settings()) as (_, base):
        with pytest.raises(InvalidStatus) as refused:
            async with connect(f"ws://{base}/v1/predictions/stream?ids={ids}", open_timeout=3):
                pass
    assert refused.value.response.status_code == 414


async def test_many_ids_fit_through_subscribe_messages() -> None:
    """The documented 10,000 ids, too many for a URL, are taken in `subscribe` messages."""
    settings = gateway_settings()
    ids = [f"{i:032x}" for i in range(10_000)]
    async with (
        serving(settings) as (_, base),
        connect(f"ws://{base}/v1/predictions/stream?ids=") as socket,
    ):
        for start in range(0, len(ids), 1000):
            await socket.send(json.dumps({"type": "subscribe", "ids": ids[start : start + 1000]}))
        await nothing_more(socket)


async def test_streams_past_the_connection_cap_are_refused_with_503() -> None:
    """With FMNIST_STREAM_MAX_CONNECTIONS open, one more handshake gets 503 + Retry-After; a freed
    slot is taken again."""
    settings = gateway_settings(stream_max_connections=1)
    url_of = "ws://{}/v1/predictions/stream".format
    async with serving(settings) as (_, base):
        async with connect(url_of(base)):
            with pytest.raises(InvalidStatus) as refused:
                async with connect(url_of(base)):
                    pass
        await asyncio.sleep(0.1)  # the server sees the first one go
        async with connect(url_of(base)) as again:
            await nothing_more(again)
    assert refused.value.response.status_code == 503
    assert refused.value.response.headers["Retry-After"] == "5"
