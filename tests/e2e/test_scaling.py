"""Two gateways sharing Redis on Kafka (Tansu), workers 2 → 4 → 1, a gateway SIGKILLed and replaced: nothing lost."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from fmnist_client import AsyncClient, Prediction

from tests.brokers import start_redis
from tests.conftest import missing_service
from tests.e2e.conftest import PROCESS_START_TIMEOUT_S, WORKER_READY, Stack, tansu_stack
from tests.e2e.load import fixed_rate_load
from tests.e2e.streams import StreamCollector

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.kafka,
    pytest.mark.data,
    pytest.mark.timeout(150),
]

RATE_PER_S = 40.0  # alternating between the gateways
PHASE_S = 2.5  # of load in each configuration
WORKERS = ("scale-w1", "scale-w2", "scale-w3", "scale-w4")


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
            # w1 alone first: the first member leads its groups, and the leader stays to the end.
            stack.ensure_workers("scale-w1")
            second = stack.start_worker("scale-w2", wait_ready=False)
            gateways = {name: stack.start_gateway(name, wait_ready=False) for name in ("a", "b")}
            second.wait_for_log(WORKER_READY, timeout=PROCESS_START_TIMEOUT_S)
            for name, gateway in gateways.items():
                gateway.wait_for_http(
                    f"{stack.gateway_url(name)}/readyz", timeout=PROCESS_START_TIMEOUT_S
                )
            yield stack
    finally:
        redis.stop()


async def test_scaling_workers_and_replacing_a_gateway_loses_nothing(
    cluster: Stack, test_pngs: tuple[list[bytes], list[int]]
) -> None:
    """Workers 2 → 4 → 1 and gateway `a` SIGKILLed then replaced under load: every accepted id served, each once per stream."""
    images = test_pngs[0][:300]
    url_a, url_b = cluster.gateway_url("a"), cluster.gateway_url("b")
    accepted: dict[str, float] = {}
    refused: list[str] = []  # by gateway `a` while it is down: never answered 202
    stop = asyncio.Event()
    async with (
        AsyncClient(url_a, backoff=0.1, retries=0) as a,
        AsyncClient(url_b, backoff=0.1, retries=0) as b,
        StreamCollector(b) as stream,
    ):
        await asyncio.sleep(0.3)  # subscribed before the first result can exist
        first = await a.submit(images[0], idempotency_key="scaling-upload")
        repeated = await b.submit(images[0], idempotency_key="scaling-upload")
        load = asyncio.create_task(
            fixed_rate_load([a, b], images, RATE_PER_S, accepted, refused, stop)
        )
        await asyncio.sleep(PHASE_S)
        # In threads, so the load goes on while processes start and stop.
        await asyncio.to_thread(cluster.ensure_workers, *WORKERS)
        await asyncio.sleep(PHASE_S)
        cluster.gateways["a"].kill()  # SIGKILL: its share of the results group moves to `b`
        await asyncio.sleep(PHASE_S / 2)
        # SIGTERM: each drains what it holds; they may leave together, since w1 leads the groups
        # (see `Stack.retire_workers`). Meanwhile `a` is replaced: same name, a new process.
        await asyncio.gather(
            asyncio.to_thread(cluster.stop_workers, "scale-w2", "scale-w3", "scale-w4"),
            asyncio.to_thread(cluster.start_gateway, "a"),
        )
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
