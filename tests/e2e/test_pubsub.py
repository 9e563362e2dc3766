"""The round trip on Google's Pub/Sub emulator: gateway and two workers as processes."""

from __future__ import annotations

import asyncio

import pytest
from fmnist_client import AsyncClient

from tests.e2e.conftest import Stack
from tests.e2e.streams import StreamCollector, accuracy, submit_all

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.gcp,
    pytest.mark.data,
    pytest.mark.timeout(120),
]


async def test_three_hundred_images_complete_once_each_on_the_pubsub_emulator(
    pubsub_stack: Stack, test_pngs: tuple[list[bytes], list[int]]
) -> None:
    """300 real test images through the SDK on Pub/Sub: each result streamed once, accuracy >= 93%."""
    images, labels = test_pngs[0][:300], test_pngs[1][:300]
    async with (
        AsyncClient(pubsub_stack.gateway_url("pubsub-gateway")) as client,
        StreamCollector(client) as stream,
    ):
        await asyncio.sleep(0.2)
        ids = await submit_all(client, images, labels)
        await stream.wait_for_all(ids, within_s=60)
    assert stream.delivery.duplicated(ids) == {}
    results = stream.delivery.of(ids)
    assert all(r.status == "completed" for r in results.values())
    assert accuracy(results) >= 0.93
