"""The gateway on Kafka (the Tansu broker): submit, wait, batch and GET end to end with a stand-in worker."""

from __future__ import annotations

import pytest

from tests.gateway.helpers import (
    fashion_like,
    gateway_settings,
    png_bytes,
    running_gateway,
    worker_running,
)

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(90)]


async def test_round_trip_on_kafka(kafka_url: str) -> None:
    """Single and batch submits on Kafka come back completed with the worker's answers."""
    settings = gateway_settings(kafka_url)
    async with running_gateway(settings) as (app, client), worker_running(settings):
        assert app.state.gateway.ready
        single = await client.post(
            "/v1/predictions?wait=20",
            content=png_bytes(fashion_like(8)),
            headers={"Content-Type": "image/png"},
        )
        files = [
            ("files", (f"{i}.png", png_bytes(fashion_like(i)), "image/png")) for i in range(20)
        ]
        batch = await client.post("/v1/predictions:batch?wait=20", files=files)
        polled = await client.get(f"/v1/predictions/{single.json()['request_id']}")
    assert single.status_code == 200, single.text
    assert single.json()["label"] == 8
    assert batch.status_code == 200, batch.text
    assert [item["label"] for item in batch.json()["items"]] == [i % 10 for i in range(20)]
    assert polled.json()["status"] == "completed"
