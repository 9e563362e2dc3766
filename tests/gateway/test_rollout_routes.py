"""Canary routes: PUT weights (admin), history, weights and live figures in GET /v1/models/{name},
and the split honoured on the real publish path."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

import messaging
from app.gateway.service import Gateway
from app.protocol import MODEL_VERSION_ATTR, requests_topic_for
from app.settings import Settings
from tests.brokers import unique_name
from tests.gateway.helpers import (
    announce_model,
    announcement,
    fashion_like,
    gateway_settings,
    png_bytes,
    running_gateway,
    stand_in_worker,
)

pytestmark = pytest.mark.timeout(30)

OLD = announcement("old-worker", version="aaaaaaaaaaaa", tag="v1")
NEW = announcement("new-worker", version="bbbbbbbbbbbb", tag="v2")
ADMIN = {"Authorization": "Bearer admin-key"}
PNG = {"Content-Type": "image/png"}


@contextlib.asynccontextmanager
async def two_versions(
    settings: Settings, **options: Any
) -> AsyncIterator[tuple[Gateway, httpx.AsyncClient]]:
    """A gateway that knows versions v1 and v2 of `fmnist`, both live (no worker answers)."""
    async with running_gateway(settings, announce=False, **options) as (app, client):
        await announce_model(settings, OLD)
        await announce_model(settings, NEW)
        yield app.state.gateway, client


async def applied(gateway: Gateway, weights: dict[str, int]) -> None:
    """Wait until `gateway` has `weights` in force for fmnist (another gateway set them)."""
    async with asyncio.timeout(5):
        while True:
            if gateway.rollout.weights("fmnist") == weights:
                return
            await asyncio.sleep(0.01)


async def test_weights_need_an_admin_key_when_keys_are_configured() -> None:
    """PUT weights: 401 without a key, 403 with an API key that is not an admin key, 200 with one."""
    settings = gateway_settings(api_keys=["user-key"], admin_api_keys=["admin-key"])
    body = {"weights": {"v1": 90, "v2": 10}}
    async with two_versions(settings) as (_, client):
        anonymous = await client.put("/v1/models/fmnist/weights", json=body)
        user = await client.put(
            "/v1/models/fmnist/weights", json=body, headers={"X-API-Key": "user-key"}
        )
        admin = await client.put("/v1/models/fmnist/weights", json=body, headers=ADMIN)
        event = await client.post(
            "/v1/models/fmnist/history",
            json={"candidate": NEW.version, "action": "started"},
            headers={"X-API-Key": "user-key"},
        )
    assert (anonymous.status_code, user.status_code, admin.status_code) == (401, 403, 200)
    assert event.status_code == 403


async def test_setting_weights_answers_full_ids_and_shows_in_the_model() -> None:
    """Tags resolve to full ids; GET /v1/models/fmnist and the history show the split at once."""
    async with two_versions(gateway_settings()) as (_, client):
        put = await client.put(
            "/v1/models/fmnist/weights",
            json={"weights": {"v1": 90, "bbbb": 10}, "reason": "canary"},
        )
        model = await client.get("/v1/models/fmnist")
        history = await client.get("/v1/models/fmnist/history")
    assert put.status_code == 200, put.text
    split = {OLD.version: 90, NEW.version: 10}
    assert put.json()["weights"] == split
    assert model.json()["weights"] == split
    (entry,) = history.json()["events"]
    assert (entry["kind"], entry["weights"], entry["reason"]) == ("weights", split, "canary")


@pytest.mark.parametrize(
    ("name", "weights", "status"),
    [
        ("nope", {"v1": 100}, 404),
        ("fmnist", {"v1": 90, "v2": 20}, 422),
        ("fmnist", {"v9": 100}, 422),
    ],
)
async def test_bad_weights_are_refused(name: str, weights: dict[str, int], status: int) -> None:
    """An unknown model is 404; a total other than 100 or an unknown version is 422."""
    async with two_versions(gateway_settings()) as (gateway, client):
        response = await client.put(f"/v1/models/{name}/weights", json={"weights": weights})
    assert response.status_code == status, response.text
    assert gateway.rollout.weights("fmnist") == {}


async def test_a_posted_event_is_stamped_and_kept_in_the_history() -> None:
    """POST history answers 201 with `at` and `by` set by the gateway; GET history lists it."""
    settings = gateway_settings(api_keys=["user-key"], admin_api_keys=["admin-key"])
    event = {"candidate": NEW.version, "action": "gate_passed", "figures": {"agreement": 0.99}}
    async with two_versions(settings) as (_, client):
        posted = await client.post("/v1/models/fmnist/history", json=event, headers=ADMIN)
        history = await client.get("/v1/models/fmnist/history", headers=ADMIN)
    assert posted.status_code == 201, posted.text
    assert posted.json()["by"] == hashlib.sha256(b"admin-key").hexdigest()[:16]
    assert posted.json()["at"] > 0
    assert history.json()["events"] == [{**posted.json(), "kind": "event"}]


async def test_the_split_holds_on_the_publish_path() -> None:
    """2,000 requests under 90/10 reach the version topics within ±2 points, each with its version."""
    settings = gateway_settings(max_pending_requests=10_000)
    count = 2_000
    async with two_versions(settings) as (gateway, client):
        await client.put("/v1/models/fmnist/weights", json={"weights": {"v1": 90, "v2": 10}})
        model = gateway.registry.resolve("fmnist")
        payload = bytes(784)
        for start in range(0, count, 500):
            claims = [(f"key-{i}", "body") for i in range(start, start + 500)]
            outcomes = await gateway.submit("", [payload] * 500, model=model, idempotency=claims)
            assert all(not isinstance(o, Exception) for o in outcomes)
        counts = {
            v.version: Counter(a[MODEL_VERSION_ATTR] for a in await published(settings, v.version))
            for v in (OLD, NEW)
        }
    assert sum(sum(c.values()) for c in counts.values()) == count
    assert counts[OLD.version] == Counter({OLD.version: counts[OLD.version].total()})
    share = counts[NEW.version].total() / count * 100
    assert abs(share - 10) <= 2, counts


async def published(settings: Settings, version: str) -> list[dict[str, str]]:
    """The attributes of the requests on `version`'s topic, read in a group of their own."""
    topic = requests_topic_for(settings.requests_topic, "fmnist", version)
    seen: list[dict[str, str]] = []
    async with (
        messaging.connect(settings.broker_url) as pubsub,
        pubsub.subscribe(topic, group=unique_name("count"), start="earliest") as messages,
    ):
        while True:
            try:
                async with asyncio.timeout(0.2):
                    batch = await messages.receive_batch(1000)
            except TimeoutError:
                return seen
            for message in batch:
                seen.append(dict(message.attributes))
                await message.ack()


async def test_live_figures_count_each_versions_results() -> None:
    """Answered requests under 50/50 show in `versions[].live` of the version that answered them."""
    settings = gateway_settings()
    async with running_gateway(settings, announce=False) as (_, client):
        workers = [
            asyncio.create_task(stand_in_worker(settings, model=m, pinned_only=True, ready=ready))
            for m, ready in ((OLD, asyncio.Event()), (NEW, asyncio.Event()))
        ]
        try:
            await announce_model(settings, OLD)
            await announce_model(settings, NEW)
            await client.put("/v1/models/fmnist/weights", json={"weights": {"v1": 50, "v2": 50}})
            answers = [
                await client.post(
                    "/v1/predictions?wait=5", content=png_bytes(fashion_like(i)), headers=PNG
                )
                for i in range(10)
            ]
            model = (await client.get("/v1/models/fmnist")).json()
        finally:
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
    answered = Counter(a.json()["model_version"] for a in answers)
    live = {v["version"]: v["live"] for v in model["versions"]}
    assert {v: live[v]["requests"] for v in live} == {
        OLD.version: answered[OLD.version],
        NEW.version: answered[NEW.version],
    }
    assert all(live[v]["p50_ms"] is not None for v in answered)
    assert sum(answered.values()) == 10


async def test_an_idempotency_key_lands_on_the_same_version_through_any_gateway() -> None:
    """The same Idempotency-Key sent to two gateways (no shared state) reaches the same version."""
    settings = gateway_settings()
    keys = [f"order-{i}" for i in range(20)]
    async with (
        two_versions(settings) as (_, a),
        running_gateway(settings, announce=False) as (bapp, b),
    ):
        await a.put("/v1/models/fmnist/weights", json={"weights": {"v1": 50, "v2": 50}})
        await applied(bapp.state.gateway, {OLD.version: 50, NEW.version: 50})
        ids: dict[str, list[str]] = {key: [] for key in keys}
        for client in (a, b):
            for key in keys:
                answer = await client.post(
                    "/v1/predictions",
                    content=png_bytes(fashion_like(1)),
                    headers={**PNG, "Idempotency-Key": key},
                )
                assert answer.status_code == 202, answer.text
                ids[key].append(answer.json()["request_id"])
        version_of = {
            a["request_id"]: a[MODEL_VERSION_ATTR]
            for v in (OLD, NEW)
            for a in await published(settings, v.version)
        }
    landed = {key: {version_of[request_id] for request_id in pair} for key, pair in ids.items()}
    assert all(len(versions) == 1 for versions in landed.values()), landed
    assert {v for versions in landed.values() for v in versions} == {OLD.version, NEW.version}


async def test_a_gateway_started_later_has_the_split_in_force_when_it_starts() -> None:
    """A gateway started after a weights change reads the rollout topic from its beginning at start."""
    settings = gateway_settings()
    async with two_versions(settings) as (_, a):
        await a.put("/v1/models/fmnist/weights", json={"weights": {"v1": 90, "v2": 10}})
        async with running_gateway(settings, announce=False) as (later, _):
            weights = later.state.gateway.rollout.weights("fmnist")
    assert weights == {OLD.version: 90, NEW.version: 10}
