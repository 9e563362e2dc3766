"""Models learned from worker announcements: /v1/models, per-model routes, versions and model errors."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from app.gateway.registry import LIVENESS_INTERVALS, ModelRegistry
from app.settings import Settings
from tests.gateway.helpers import (
    announce_model,
    announcement,
    fashion_like,
    gateway_settings,
    png_bytes,
    running_gateway,
    stand_in_worker,
)

PNG = {"Content-Type": "image/png"}


@contextlib.asynccontextmanager
async def stand_ins(settings: Settings, *options: dict[str, Any]) -> AsyncIterator[None]:
    """Stand-in workers with the given options, each announced and consuming, for the block."""
    tasks = []
    for option in options:
        ready = asyncio.Event()
        tasks.append(asyncio.create_task(stand_in_worker(settings, ready=ready, **option)))
        async with asyncio.timeout(15):
            await ready.wait()
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


COLOURS = announcement(
    "colour-worker", name="colours", version="c01005000000", input_shape=(3, 32, 32),
    classes=["red", "green", "blue", "yellow"],
)  # fmt: skip


async def test_models_lists_what_workers_announced() -> None:
    """GET /v1/models lists each announced model with its shape, classes, versions and live workers."""
    settings = gateway_settings()
    async with (
        running_gateway(settings, announce=False) as (_, client),
        stand_ins(settings, {}, {"model": COLOURS}),
    ):
        response = await client.get("/v1/models")
        one = await client.get("/v1/models/colours")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["default"] == "fmnist"
    by_name = {m["name"]: m for m in body["models"]}
    assert by_name["colours"]["input_shape"] == [3, 32, 32]
    assert by_name["colours"]["class_names"] == ["red", "green", "blue", "yellow"]
    assert by_name["colours"]["ready"] and by_name["colours"]["live_workers"] == 1
    assert [v["version"] for v in by_name["colours"]["versions"]] == ["c01005000000"]
    assert by_name["fmnist"]["input_shape"] == [1, 28, 28]
    assert one.json() == by_name["colours"]


async def test_each_model_gets_uploads_fitted_to_its_own_input() -> None:
    """The same 28×28 grayscale PNG reaches the colours model as 3×32×32 and fmnist as 1×28×28."""
    settings = gateway_settings()
    async with (
        running_gateway(settings, announce=False) as (app, client),
        stand_ins(settings, {}, {"model": COLOURS}),
    ):
        colours = await client.post(
            "/v1/models/colours/predictions?wait=5", content=png_bytes(fashion_like(3)), headers=PNG
        )
        fmnist = await client.post(
            "/v1/predictions?wait=5", content=png_bytes(fashion_like(3)), headers=PNG
        )
    # The stand-ins answer only payloads of their own input shape (else the wait runs out: 202).
    assert (colours.status_code, fmnist.status_code) == (200, 200), colours.text
    assert (colours.json()["model"], fmnist.json()["model"]) == ("colours", "fmnist")
    assert colours.json()["class_name"] in COLOURS.class_names
    assert colours.json()["model_version"] == "c01005000000"
    served = app.state.gateway.metrics.exposition().decode()
    series = (
        'fmnist_model_results_total{model="colours",outcome="completed",version="c01005000000"}'
    )
    assert f"{series} 1.0" in served


async def test_unknown_model_is_404_listing_the_known_ones() -> None:
    """POST /v1/models/nope/predictions answers 404 model_not_found naming the known models."""
    async with running_gateway(gateway_settings()) as (_, client):
        response = await client.post(
            "/v1/models/nope/predictions", content=png_bytes(fashion_like()), headers=PNG
        )
        described = await client.get("/v1/models/nope")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"
    assert "fmnist" in response.json()["error"]["message"]
    assert described.status_code == 404


async def test_model_without_live_worker_is_503_with_retry_after() -> None:
    """A model whose only worker announced `leaving` answers 503 model_unavailable + Retry-After."""
    settings = gateway_settings()
    async with running_gateway(settings) as (_, client):
        await announce_model(settings, announcement("announcer", status="leaving"))
        response = await client.post(
            "/v1/models/fmnist/predictions", content=png_bytes(fashion_like()), headers=PNG
        )
        listed = await client.get("/v1/models/fmnist")
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "model_unavailable"
    assert int(response.headers["retry-after"]) >= 1
    assert listed.json()["ready"] is False


async def test_unknown_version_is_404_listing_the_live_ones() -> None:
    """?version=nope answers 404 version_not_found naming the live versions."""
    async with running_gateway(gateway_settings()) as (_, client):
        response = await client.post(
            "/v1/predictions?version=nope", content=png_bytes(fashion_like()), headers=PNG
        )
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "version_not_found"
    assert "standin00000" in response.json()["error"]["message"]


async def test_a_pinned_request_is_answered_by_its_version_only() -> None:
    """With versions a (tag v1) and b (tag v2) live, ?version=v1 and ?version=<b's hash> each reach their own."""
    settings = gateway_settings()
    old = announcement("old", version="aaaaaaaaaaaa", tag="v1")
    new = announcement("new", version="bbbbbbbbbbbb", tag="v2")
    async with (
        running_gateway(settings, announce=False) as (_, client),
        stand_ins(
            settings, {"model": old, "pinned_only": True}, {"model": new, "pinned_only": True}
        ),
    ):
        answers = [
            await client.post(
                f"/v1/predictions?wait=5&version={pin}",
                content=png_bytes(fashion_like(i)),
                headers=PNG,
            )
            for i, pin in enumerate(["v1", "bbbbbbbbbbbb", "v1", "v2"])
        ]
    assert [a.status_code for a in answers] == [200] * 4, answers[0].text
    assert [a.json()["model_version"] for a in answers] == [
        "aaaaaaaaaaaa", "bbbbbbbbbbbb", "aaaaaaaaaaaa", "bbbbbbbbbbbb"
    ]  # fmt: skip


async def test_a_restarted_gateway_knows_live_models_at_once() -> None:
    """A gateway started after the announcement learns the model from the control topic's recent past."""
    settings = gateway_settings(broker_url="memory://restart-models?retain_s=60")
    async with running_gateway(settings, announce=False):
        await announce_model(settings)
    async with running_gateway(settings, announce=False) as (_, client):
        response = await client.get("/v1/models/fmnist")
    assert response.status_code == 200, response.text
    assert response.json()["ready"] is True


def test_a_worker_is_live_while_its_heartbeats_are_fresh() -> None:
    """A worker counts for LIVENESS_INTERVALS of its heartbeat interval after its last announcement."""
    now = [1000.0]
    registry = ModelRegistry(clock=lambda: now[0])
    registry.learn(announcement("w1", heartbeat_s=2.0), received_at=now[0])
    now[0] += LIVENESS_INTERVALS * 2.0 - 0.1
    live_before = registry.versions("fmnist")[0].live_workers
    now[0] += 0.2
    assert (live_before, registry.versions("fmnist")[0].live_workers) == (1, 0)


def test_the_newest_live_version_answers_unpinned_requests() -> None:
    """resolve(name) picks the version learned last among those with a live worker."""
    registry = ModelRegistry()
    registry.learn(announcement("w1", version="aaaaaaaaaaaa"))
    registry.learn(announcement("w2", version="bbbbbbbbbbbb"))
    registry.learn(announcement("w2", version="bbbbbbbbbbbb", status="leaving"))
    assert registry.resolve("fmnist").version == "aaaaaaaaaaaa"


async def test_an_image_for_a_four_channel_model_is_422() -> None:
    """A model taking 4-channel input refuses an image upload with 422 unsupported_model_input."""
    settings = gateway_settings()
    rgba = announcement("rgba", name="rgba", version="dddddddddddd", input_shape=(4, 8, 8))
    async with running_gateway(settings, announce=False) as (_, client):
        await announce_model(settings, rgba)
        response = await client.post(
            "/v1/models/rgba/predictions", content=png_bytes(fashion_like()), headers=PNG
        )
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "unsupported_model_input"


async def test_a_v2_version_route_reaches_only_that_version() -> None:
    """POST /v2/models/fmnist/versions/<hash>/infer is answered by a worker of that version only."""
    settings = gateway_settings(request_deadline_s=3.0)
    only = announcement("pinned-only", version="aaaaaaaaaaaa", tag="v1")
    pixels = [[[fashion_like(4).tolist()]]]
    body = {
        "inputs": [{"name": "input", "datatype": "UINT8", "shape": [1, 1, 28, 28], "data": pixels}]
    }
    async with (
        running_gateway(settings, announce=False) as (_, client),
        stand_ins(settings, {"model": only, "pinned_only": True}),
    ):
        response = await client.post("/v2/models/fmnist/versions/aaaaaaaaaaaa/infer", json=body)
    assert response.status_code == 200, response.text
    outputs = {o["name"]: o for o in response.json()["outputs"]}
    assert outputs["label"]["data"] == [4]
