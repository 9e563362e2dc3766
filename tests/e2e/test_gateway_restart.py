"""A gateway SIGKILLed under load and restarted with the same id serves every request it accepted (Tansu)."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from fmnist_client import AsyncClient, FmnistError, Prediction
from websockets.asyncio.client import connect

from tests.e2e.conftest import Stack, tansu_stack
from tests.e2e.streams import StreamCollector

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.kafka,
    pytest.mark.data,
    pytest.mark.timeout(120),
]

LOAD_CONNECTIONS = 8
RESULTS_BEFORE_KILL = 150


@pytest.fixture(scope="module")
def restart_stack(e2e_log_dir: Path, e2e_checkpoint: Path) -> Iterator[Stack]:
    """Tansu, one worker and one gateway (`e2e-restart`), for this module only."""
    with tansu_stack(e2e_log_dir, e2e_checkpoint, "tansu-restart") as stack:
        stack.ensure_workers("restart-worker")
        stack.start_gateway("restart")
        yield stack


async def steady_load(
    client: AsyncClient, images: list[bytes], accepted: list[str], stop: asyncio.Event
) -> None:
    """Submit images over `LOAD_CONNECTIONS` loops until `stop`; ids answered 202 go to `accepted`."""

    async def loop(offset: int) -> None:
        index = offset
        while not stop.is_set():
            try:
                handle = await client.submit(images[index % len(images)])
            except FmnistError:
                return  # the gateway died under this request: it was never answered 202
            accepted.append(handle.request_id)
            index += LOAD_CONNECTIONS

    await asyncio.gather(*(loop(offset) for offset in range(LOAD_CONNECTIONS)))


async def one_websocket(url: str, expected: set[str], within_s: float) -> Counter[str]:
    """Results pushed to one fresh websocket (replaying everything stored) until each expected id came."""
    counts: Counter[str] = Counter()
    ws_url = url.replace("http://", "ws://") + "/v1/predictions/stream?after=0"
    async with asyncio.timeout(within_s), connect(ws_url) as websocket:
        while not expected <= set(counts):
            message = json.loads(await websocket.recv())
            if message.get("type") == "result":
                counts[message["request_id"]] += 1
        # Anything pushed twice would follow its first push closely.
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(1.0):
                while True:
                    message = json.loads(await websocket.recv())
                    if message.get("type") == "result":
                        counts[message["request_id"]] += 1
    return counts


async def test_sigkill_of_the_gateway_under_load_loses_no_accepted_request(
    restart_stack: Stack, test_pngs: tuple[list[bytes], list[int]]
) -> None:
    """SIGKILL the gateway under load, restart it (same id): every id answered 202 is served, once per socket."""
    images = test_pngs[0][:500]
    url = restart_stack.gateway_url("restart")
    gateway = restart_stack.gateways["restart"]
    accepted: list[str] = []
    stop = asyncio.Event()
    async with AsyncClient(url, backoff=0.1, retries=0) as client:
        async with StreamCollector(client) as stream:
            await asyncio.sleep(0.2)
            load = asyncio.create_task(steady_load(client, images, accepted, stop))
            await stream.wait_for(
                lambda d: len(d.results) >= RESULTS_BEFORE_KILL,
                within_s=30,
                what=f"{RESULTS_BEFORE_KILL} results before the kill",
            )
            gateway.kill()  # SIGKILL: nothing is flushed, committed or said goodbye to
            stop.set()
            await load
            served_before_kill = set(stream.delivery.counts)
        killed_at = time.time()
        restart_stack.start_gateway("restart")  # waits for /readyz: the read-back caught up
        ready_after_s = time.time() - killed_at
        semaphore = asyncio.Semaphore(32)

        async def fetch(request_id: str) -> tuple[int | str, Prediction | None]:
            async with semaphore:
                try:
                    return "ok", await client.get(request_id)
                except FmnistError as error:
                    return error.status_code or "error", None

        fetched = dict(zip(accepted, await asyncio.gather(*map(fetch, accepted)), strict=True))
        lost = {i: outcome for i, (outcome, _) in fetched.items() if outcome != "ok"}
        assert not lost, f"{len(lost)} of {len(accepted)} accepted ids not served after the restart"

        async def result(request_id: str) -> Prediction:
            async with semaphore:
                return await client.result(request_id, timeout=30)

        finished = await asyncio.gather(*map(result, accepted))
    assert all(p.status == "completed" for p in finished)
    # The restart proves something only if results the old process had consumed come back.
    assert served_before_kill & set(accepted), "no accepted id was answered before the kill"
    counts = await one_websocket(url, set(accepted), within_s=30)
    assert {i: n for i, n in counts.items() if n > 1} == {}
    assert ready_after_s < 30
