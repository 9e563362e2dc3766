"""Two gateways sharing Redis on Kafka (Tansu), workers 2 → 4 → 1, a gateway SIGKILLed and replaced: nothing lost."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest
from fmnist_client import AsyncClient, FmnistError, Prediction

from tests.brokers import start_redis
from tests.conftest import missing_service
from tests.e2e.conftest import Stack, tansu_stack
from tests.e2e.streams import StreamCollector

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.kafka,
    pytest.mark.data,
    pytest.mark.timeout(150),
]

LOAD_CONNECTIONS = 4
PHASE_S = 4.0


@pytest.fixture(scope="module")
def cluster(e2e_log_dir: Path, e2e_checkpoint: Path) -> Iterator[Stack]:
    """Tansu, redis-server, two workers and two gateways (`a`, `b`) sharing state, for this module only."""
    try:
        redis = start_redis(e2e_log_dir)
    except RuntimeError as exc:
        missing_service(str(exc))
        raise
    shared_state = {"FMNIST_SHARED_STATE_URL": f"redis://127.0.0.1:{redis.port}/0"}
    try:
        with tansu_stack(
            e2e_log_dir,
            e2e_checkpoint,
            "tansu-scaling",
            url_options="&partitions=4",
            env=shared_state,
        ) as stack:
            stack.ensure_workers("scale-w1", "scale-w2")
            stack.start_gateway("a")
            stack.start_gateway("b")
            yield stack
    finally:
        redis.stop()


async def round_robin_load(
    clients: list[AsyncClient], images: list[bytes], accepted: list[str], stop: asyncio.Event
) -> None:
    """Submit over `LOAD_CONNECTIONS` loops, alternating gateways, until `stop`; ids answered 202 go to `accepted`."""

    async def loop(offset: int) -> None:
        turn = itertools.count(offset)
        while not stop.is_set():
            index = next(turn)
            try:
                handle = await clients[index % len(clients)].submit(images[index % len(images)])
            except FmnistError:
                await asyncio.sleep(0.1)  # that gateway is down: never answered 202
                continue
            accepted.append(handle.request_id)

    await asyncio.gather(*(loop(offset) for offset in range(LOAD_CONNECTIONS)))


async def test_scaling_workers_and_replacing_a_gateway_loses_nothing(
    cluster: Stack, test_pngs: tuple[list[bytes], list[int]]
) -> None:
    """Workers 2 → 4 → 1 and gateway `a` SIGKILLed then replaced under load: every accepted id served, each once per stream."""
    images = test_pngs[0][:300]
    url_a, url_b = cluster.gateway_url("a"), cluster.gateway_url("b")
    accepted: list[str] = []
    stop = asyncio.Event()
    async with (
        AsyncClient(url_a, backoff=0.1, retries=0) as a,
        AsyncClient(url_b, backoff=0.1, retries=0) as b,
    ):
        first = await a.submit(images[0], idempotency_key="scaling-upload")
        repeated = await b.submit(images[0], idempotency_key="scaling-upload")
        async with StreamCollector(b) as stream:
            await asyncio.sleep(0.3)
            load = asyncio.create_task(round_robin_load([a, b], images, accepted, stop))
            await asyncio.sleep(PHASE_S)
            cluster.ensure_workers("scale-w1", "scale-w2", "scale-w3", "scale-w4")
            await asyncio.sleep(PHASE_S)
            cluster.gateways["a"].kill()  # SIGKILL: its share of the results group moves to `b`
            await asyncio.sleep(PHASE_S / 2)
            for name in ("scale-w2", "scale-w3", "scale-w4"):
                cluster.workers.pop(name).stop()  # SIGTERM: each drains what it holds
            cluster.start_gateway("a")  # replaced: same name, a new process
            await asyncio.sleep(PHASE_S)
            stop.set()
            await load
            ids = [first.request_id, *accepted]
            semaphore = asyncio.Semaphore(32)

            async def result(index_and_id: tuple[int, str]) -> Prediction:
                index, request_id = index_and_id
                async with semaphore:  # asked of either gateway, whichever accepted it
                    return await (a, b)[index % 2].result(request_id, timeout=60)

            finished = await asyncio.gather(*map(result, enumerate(ids)))
            await stream.wait_for_all(ids, within_s=30)
    assert repeated.request_id == first.request_id
    assert len(accepted) > 50
    assert [p.request_id for p in finished if p.status != "completed"] == []
    assert stream.delivery.duplicated(ids) == {}
