"""`AsyncClient.stream()` and `Client.stream()` over a real websocket (uvicorn on a free port): filtering, resume after drops, refusal."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import numpy as np
import pytest
from fmnist_client import (
    AsyncClient,
    Client,
    Prediction,
    StreamEvent,
    Unauthorized,
    Unavailable,
)
from fmnist_client._stream import ids_fit_in_url

from tests.e2e.processes import free_port
from tests.sdk.conftest import LiveServer, TcpProxy

pytestmark = pytest.mark.timeout(60)


def image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(28, 28), dtype=np.uint8)


async def test_stream_with_ids_yields_each_once_then_ends(
    live_server: Callable[..., LiveServer],
) -> None:
    """stream(ids=…) yields every listed result exactly once (even ones already finished), then stops."""
    server = live_server()
    async with AsyncClient(server.url) as client:
        first = await client.submit(image(0))
        await first.result()  # finished before the stream opens: must still be delivered
        later = [await client.submit(image(seed), metadata={"n": str(seed)}) for seed in (1, 2)]
        ids = {first.request_id, *(handle.request_id for handle in later)}
        async with asyncio.timeout(20):
            received = [result async for result in client.stream(ids=ids)]
    assert sorted(r.request_id for r in received) == sorted(ids)
    assert all(r.status == "completed" and r.cursor is not None for r in received)


async def test_stream_without_ids_follows_new_results(
    live_server: Callable[..., LiveServer],
) -> None:
    """stream() with no ids yields results as they complete, with increasing cursors."""
    server = live_server()
    async with AsyncClient(server.url) as client:
        results = client.stream(after=0)
        handles = [await client.submit(image(seed)) for seed in range(3)]
        async with asyncio.timeout(20):
            received = [await anext(results) for _ in handles]
        await results.aclose()
    assert {r.request_id for r in received} == {h.request_id for h in handles}
    cursors = [r.cursor for r in received]
    assert cursors == sorted(cursors) and len(set(cursors)) == 3


async def test_stream_reconnects_and_resumes_after_a_dropped_connection(
    live_server: Callable[..., LiveServer],
) -> None:
    """A cut connection is re-opened with after=<last cursor>: a result that completed while the
    stream was down is delivered, nothing is delivered twice, and live results keep coming."""
    server = live_server()
    async with (
        TcpProxy(server.port) as proxy,
        AsyncClient(server.url) as direct,
        AsyncClient(proxy.url, backoff=0.05) as via_proxy,
    ):
        results = via_proxy.stream(after=0)
        received: list[Prediction] = []
        async with asyncio.timeout(30):
            before = await direct.submit(image(10))
            received.append(await anext(results))

            proxy.accepting = False
            proxy.cut()  # network failure: no close frame
            during = await direct.submit(image(11))
            await during.result()  # completed while nobody was listening
            proxy.accepting = True

            received.append(await anext(results))
            after = await direct.submit(image(12))
            received.append(await anext(results))
        await results.aclose()
    assert [r.request_id for r in received] == [
        before.request_id,
        during.request_id,
        after.request_id,
    ]


async def test_stream_with_a_wrong_key_is_refused_not_retried(
    live_server: Callable[..., LiveServer],
) -> None:
    """With auth on, a wrong key makes stream() raise Unauthorized at once instead of reconnecting."""
    server = live_server(api_keys="right")
    async with AsyncClient(server.url, api_key="wrong") as client:
        with pytest.raises(Unauthorized):
            async with asyncio.timeout(10):
                await anext(client.stream())


async def test_stream_with_the_right_key_sees_only_its_own_results(
    live_server: Callable[..., LiveServer],
) -> None:
    """With two keys, each stream receives its own key's results and not the other's."""
    server = live_server(api_keys="alice,bob")
    async with (
        AsyncClient(server.url, api_key="alice") as alice,
        AsyncClient(server.url, api_key="bob") as bob,
    ):
        bobs = bob.stream(after=0)
        await alice.predict(image(20))
        mine = await bob.submit(image(21))
        async with asyncio.timeout(20):
            first = await anext(bobs)
        await bobs.aclose()
    assert first.request_id == mine.request_id


async def test_stream_with_more_ids_than_fit_a_url_subscribes_over_the_socket(
    live_server: Callable[..., LiveServer],
) -> None:
    """80 ids (too long for the URL) are sent as `subscribe` messages; every result still arrives once."""
    server = live_server()
    async with AsyncClient(server.url) as client:
        handles = await asyncio.gather(*(client.submit(image(seed)) for seed in range(80)))
        ids = {handle.request_id for handle in handles}
        assert not ids_fit_in_url(ids)
        async with asyncio.timeout(30):
            received = [result.request_id async for result in client.stream(ids=ids)]
    assert sorted(received) == sorted(ids)


def test_sync_stream_with_ids_yields_each_once_then_ends(
    live_server: Callable[..., LiveServer],
) -> None:
    """Client.stream(ids=…) (sync) yields every listed result once, finished ones included, then stops."""
    server = live_server()
    with Client(server.url) as client:
        first = client.submit(image(30))
        first.result()  # finished before the stream opens: must still be delivered
        later = [client.submit(image(seed)) for seed in (31, 32)]
        ids = {first.request_id, *(handle.request_id for handle in later)}
        received = list(client.stream(ids=ids))
    assert sorted(r.request_id for r in received) == sorted(ids)
    assert all(r.status == "completed" and r.cursor is not None for r in received)


async def test_sync_stream_reconnects_and_resumes_after_a_dropped_connection(
    live_server: Callable[..., LiveServer],
) -> None:
    """The sync stream, cut mid-way, resumes after its cursor: the result finished while it was
    down arrives, nothing twice (the proxy runs on this loop, the sync stream in a thread)."""
    server = live_server()
    async with (
        TcpProxy(server.port) as proxy,
        AsyncClient(server.url) as direct,
    ):
        with Client(proxy.url, backoff=0.05) as via_proxy:
            results = via_proxy.stream(after=0)
            async with asyncio.timeout(30):
                before = await direct.submit(image(40))
                received = [await asyncio.to_thread(next, results)]
                proxy.accepting = False
                proxy.cut()
                during = await direct.submit(image(41))
                await during.result()
                proxy.accepting = True
                received.append(await asyncio.to_thread(next, results))
            results.close()
    assert [r.request_id for r in received] == [before.request_id, during.request_id]


def test_sync_stream_with_a_wrong_key_is_refused_not_retried(
    live_server: Callable[..., LiveServer],
) -> None:
    """With auth on, a wrong key makes the sync stream raise Unauthorized at once."""
    server = live_server(api_keys="right")
    with Client(server.url, api_key="wrong") as client, pytest.raises(Unauthorized):
        next(client.stream())


def test_stream_reports_each_connection_change_then_gives_up() -> None:
    """Against a port nobody listens on, on_event sees connecting, lost, retrying (with the delay)
    for each attempt, then stream() raises Unavailable once `reconnects` is spent."""
    events: list[StreamEvent] = []
    url = f"http://127.0.0.1:{free_port()}"
    with (
        Client(url, backoff=0.01) as client,
        pytest.raises(Unavailable, match="not re-established after 1 attempts"),
    ):
        next(client.stream(reconnects=1, on_event=events.append))
    assert [e.state for e in events] == ["connecting", "lost", "retrying", "connecting", "lost"]
    retrying = events[2]
    assert retrying.delay_s is not None and retrying.attempt == 1
    assert retrying.reason is not None and "ConnectionRefusedError" in retrying.reason
    assert all(e.url == url.replace("http", "ws") + "/v1/predictions/stream" for e in events)
