"""The whole system on Tansu (Kafka protocol): gateway and two workers as processes, under faults and load."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path

import httpx
import pytest
from fmnist_client import AsyncClient

from tests.e2e.conftest import Stack
from tests.e2e.load import post_all
from tests.e2e.reference import card_accuracy, checkpoint_accuracy
from tests.e2e.streams import StreamCollector, accuracy, submit_all

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.kafka,
    pytest.mark.data,
    pytest.mark.timeout(120),
]

IN_FLIGHT_CAP = 16  # the overload gateway's FMNIST_MAX_PENDING_REQUESTS
ACCURACY_IMAGES = 1000  # enough for both accuracy checks; the time grows with the count


async def test_a_thousand_images_complete_once_each_with_the_checkpoints_accuracy(
    kafka_stack: Stack, test_pngs: tuple[list[bytes], list[int]], e2e_checkpoint: Path
) -> None:
    """1000 real test images through the SDK: each result arrives once on the websocket, accuracy as offline."""
    images, labels = test_pngs[0][:ACCURACY_IMAGES], test_pngs[1][:ACCURACY_IMAGES]
    async with AsyncClient(kafka_stack.gateway_url()) as client, StreamCollector(client) as stream:
        await asyncio.sleep(0.2)  # let the websocket connect before the first result can exist
        ids = await submit_all(client, images, labels)
        await stream.wait_for_all(ids, within_s=60)
    delivered = stream.delivery
    assert not delivered.duplicated(ids)
    results = delivered.of(ids)
    assert all(r.status == "completed" for r in results.values())
    # The card's figure is over all 10,000 test images; these are the first 1000 (94.90% offline).
    assert accuracy(results) >= card_accuracy(e2e_checkpoint) - 0.005
    assert accuracy(results) >= checkpoint_accuracy(e2e_checkpoint, images, labels) - 0.005


async def test_sigkill_of_a_worker_mid_stream_loses_and_duplicates_nothing(
    kafka_stack: Stack, test_pngs: tuple[list[bytes], list[int]]
) -> None:
    """SIGKILL one of two workers while 600 requests flow: every id is streamed exactly once."""
    kafka_stack.ensure_workers("worker-1", "worker-2")
    images, labels = test_pngs[0][:600], test_pngs[1][:600]
    victim = kafka_stack.workers["worker-1"]
    async with AsyncClient(kafka_stack.gateway_url()) as client, StreamCollector(client) as stream:
        await asyncio.sleep(0.2)
        submitting = asyncio.create_task(submit_all(client, images, labels, concurrency=16))
        # Kill once the victim has answered some requests, so it dies holding unacked work.
        await stream.wait_for(
            lambda d: sum(1 for r in d.results if r.worker_id == "worker-1") >= 50,
            within_s=30,
            what="worker-1 to answer 50 requests",
        )
        victim.signal(signal.SIGKILL)
        ids = await submitting
        await stream.wait_for_all(ids, within_s=60, grace_s=2.0)
    assert not victim.running()
    assert stream.delivery.duplicated(ids) == {}
    results = stream.delivery.of(ids)
    assert all(r.status == "completed" for r in results.values())
    # The survivor finished the victim's share after the rebalance.
    assert any(r.worker_id == "worker-2" for r in results.values())


async def test_gateway_restart_serves_results_completed_while_it_was_down(
    kafka_stack: Stack, test_pngs: tuple[list[bytes], list[int]]
) -> None:
    """SIGTERM the gateway with work queued; after a restart (same id) the client gets every result."""
    kafka_stack.ensure_some_worker()
    images, labels = test_pngs[0][:200], test_pngs[1][:200]
    url = kafka_stack.gateway_url()
    # A short backoff so the stream's reconnect attempts do not sleep long past the restart.
    async with AsyncClient(url, backoff=0.1) as client, StreamCollector(client) as stream:
        await asyncio.sleep(0.2)
        warmup = await submit_all(client, images[:10], labels[:10])
        await stream.wait_for_all(warmup, within_s=30, grace_s=0)
        # Pause the workers so the queued requests complete only after the gateway is gone.
        for worker in kafka_stack.workers.values():
            worker.signal(signal.SIGSTOP)
        ids = await submit_all(client, images, labels)
        gateway = kafka_stack.gateways["gateway"]
        stopped_at = time.time()
        assert gateway.stop(timeout=20) == 0
        kafka_stack.ensure_some_worker()  # SIGCONT: they answer while it is down
        await asyncio.sleep(2.0)
        restarted_at = time.time()
        kafka_stack.start_gateway()
        # The SDK's stream reconnects on its own; every queued id must reach it exactly once.
        await stream.wait_for_all(ids, within_s=60)
        fetched = {i: (await client.get(i)) for i in ids}
    assert stream.delivery.duplicated(ids) == {}
    assert all(p.status == "completed" for p in fetched.values())
    completed_meanwhile = [
        p for p in fetched.values() if stopped_at < (p.completed_at or 0) < restarted_at
    ]
    assert completed_meanwhile, (
        "no result was computed while the gateway was down; the test proves nothing"
    )


async def test_overload_answers_429_with_retry_after_keeps_memory_bounded_and_loses_nothing(
    kafka_stack: Stack, test_pngs: tuple[list[bytes], list[int]]
) -> None:
    """At 8× the in-flight cap: 429 + Retry-After, RSS stays bounded, every accepted request completes."""
    kafka_stack.ensure_some_worker()
    gateway = kafka_stack.start_gateway(
        "overload-gateway", FMNIST_MAX_PENDING_REQUESTS=str(IN_FLIGHT_CAP)
    )
    url = kafka_stack.gateway_url("overload-gateway")
    images = test_pngs[0][:800]
    rss_before = gateway.rss_kib()
    rss_samples: list[int] = []

    async def sample_rss() -> None:
        while True:
            rss_samples.append(gateway.rss_kib())
            await asyncio.sleep(0.05)

    sampler = asyncio.create_task(sample_rss())
    try:
        answers = await post_all(
            "127.0.0.1",
            kafka_stack.gateway_ports["overload-gateway"],
            "/v1/predictions",
            images,
            content_type="image/png",
            connections=8 * IN_FLIGHT_CAP,  # all at once, no client retries
        )
    finally:
        sampler.cancel()
    statuses = [a.status for a in answers]
    refused = [a for a in answers if a.status == 429]
    accepted = [json.loads(a.body)["request_id"] for a in answers if a.status in (200, 202)]
    assert refused, f"no 429 at 8× the in-flight cap: {sorted(set(statuses))}"
    assert set(statuses) <= {200, 202, 429}
    assert all("retry-after" in a.headers and json.loads(a.body)["error"]["code"] for a in refused)
    assert len(accepted) >= IN_FLIGHT_CAP
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        semaphore = asyncio.Semaphore(32)

        async def status_of(request_id: str) -> str:
            async with semaphore:
                return str((await http.get(f"/v1/predictions/{request_id}")).json()["status"])

        deadline = time.monotonic() + 60
        pending = set(accepted)
        while pending and time.monotonic() < deadline:
            ids = sorted(pending)
            for request_id, status in zip(
                ids, await asyncio.gather(*map(status_of, ids)), strict=True
            ):
                if status != "pending":
                    assert status == "completed", request_id
                    pending.discard(request_id)
            await asyncio.sleep(0.2)
    assert not pending, f"{len(pending)} accepted requests never completed"
    peak_growth_mib = (max(rss_samples) - rss_before) / 1024
    assert peak_growth_mib < 64, f"gateway RSS grew {peak_growth_mib:.0f} MiB under overload"
    gateway.stop()
