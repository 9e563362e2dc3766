"""Gateways sharing state in Redis (`FMNIST_SHARED_STATE_URL`): ids, waits, streams and keys across gateways."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from websockets.asyncio.client import connect

import messaging
from app.protocol import GATEWAY_ATTR, OWNER_ATTR, ResultMessage, result_attributes
from app.settings import Settings
from tests.brokers import start_redis, unique_name
from tests.gateway.helpers import (
    fashion_like,
    gateway_settings,
    png_bytes,
    running_gateway,
    serving,
    worker_running,
)

pytestmark = pytest.mark.timeout(60)

PNG = {"Content-Type": "image/png"}


def shared_settings(redis_address: str, **overrides: Any) -> Settings:
    """Settings of the first gateway of a pair: fresh topics, a fresh key prefix and results group."""
    return gateway_settings(
        shared_state_url=f"redis://{redis_address}/0",
        shared_state_prefix=unique_name("fm"),
        shared_results_group=unique_name("gateways"),
        **overrides,
    )


def twin(settings: Settings) -> Settings:
    """The same deployment's second gateway (same broker, topics, Redis prefix; its own id)."""
    return settings.model_copy(update={"gateway_id": None})


@contextlib.asynccontextmanager
async def two_gateways(
    settings: Settings,
) -> AsyncIterator[tuple[tuple[FastAPI, httpx.AsyncClient], tuple[FastAPI, httpx.AsyncClient]]]:
    async with running_gateway(settings) as a, running_gateway(twin(settings)) as b:
        yield a, b


async def submit(client: httpx.AsyncClient, seed: int, **headers: str) -> httpx.Response:
    return await client.post(
        "/v1/predictions", content=png_bytes(fashion_like(seed)), headers={**PNG, **headers}
    )


async def poll(client: httpx.AsyncClient, request_id: str, within: float = 15.0) -> dict[str, Any]:
    """GET until the request is no longer pending."""
    async with asyncio.timeout(within):
        while True:
            body: dict[str, Any] = (await client.get(f"/v1/predictions/{request_id}")).json()
            if body.get("status") != "pending":
                return body
            await asyncio.sleep(0.05)


async def test_a_request_submitted_on_one_gateway_is_answered_by_the_other(
    redis_address: str,
) -> None:
    """GET on gateway B answers pending, then completed, for an id accepted by gateway A."""
    settings = shared_settings(redis_address)
    async with two_gateways(settings) as ((_, a), (_, b)):
        accepted = (await submit(a, 3)).json()["request_id"]
        pending = await b.get(f"/v1/predictions/{accepted}")
        async with worker_running(settings):
            done = await poll(b, accepted)
    assert pending.status_code == 200, pending.text
    assert pending.json()["status"] == "pending"
    assert done["status"] == "completed"
    assert done["label"] == 3


async def test_an_idempotency_key_is_honoured_across_gateways(redis_address: str) -> None:
    """The same Idempotency-Key sent to A then to B answers A's request id, and publishes once."""
    settings = shared_settings(redis_address)
    async with two_gateways(settings) as ((_, a), (app_b, b)):
        first = await submit(a, 4, **{"Idempotency-Key": "upload-1"})
        again = await submit(b, 4, **{"Idempotency-Key": "upload-1"})
        other_body = await submit(b, 5, **{"Idempotency-Key": "upload-1"})
    assert first.status_code == 202, first.text
    assert again.json()["request_id"] == first.json()["request_id"]
    assert other_body.status_code == 422
    assert app_b.state.gateway.store.pending_count == 0


async def test_wait_on_another_gateway_returns_the_result(redis_address: str) -> None:
    """A retried upload with `?wait` on gateway B gets the result of A's request within the wait."""
    settings = shared_settings(redis_address)
    async with two_gateways(settings) as ((_, a), (_, b)):
        first = await submit(a, 6, **{"Idempotency-Key": "k"})
        async with worker_running(settings):
            waited = await b.post(
                "/v1/predictions?wait=15",
                content=png_bytes(fashion_like(6)),
                headers={**PNG, "Idempotency-Key": "k"},
            )
    assert waited.status_code == 200, waited.text
    assert waited.json()["request_id"] == first.json()["request_id"]
    assert waited.json()["label"] == 6


async def test_each_result_is_decoded_by_one_gateway(redis_address: str) -> None:
    """With shared state the gateways share the results topic: results decoded in all equal results made."""
    settings = shared_settings(redis_address)
    async with two_gateways(settings) as ((app_a, a), (app_b, b)):
        ids = [
            (await submit(client, i)).json()["request_id"] for i, client in enumerate([a, b] * 5)
        ]
        async with worker_running(settings):
            for request_id in ids:
                await poll(a, request_id)
        decoded = [decoded_by(app) for app in (app_a, app_b)]
    assert sum(decoded) == len(ids)


def decoded_by(app: FastAPI) -> float:
    """The gateway's `fmnist_results_decoded_total`."""
    value: float = app.state.gateway.results_decoded._value.get()  # prometheus Counter
    return value


async def test_on_a_skewed_split_each_gateway_decodes_only_its_own_results(
    redis_address: str,
) -> None:
    """8 requests on A, 2 on B: A decodes 8 results and B 2, whichever gateway consumes the results."""
    settings = shared_settings(redis_address)
    async with two_gateways(settings) as ((app_a, a), (app_b, b)):
        mine = {
            client: [(await submit(client, i)).json()["request_id"] for i in range(count)]
            for client, count in ((a, 8), (b, 2))
        }
        async with worker_running(settings):
            for client, request_ids in mine.items():
                for request_id in request_ids:
                    assert (await poll(client, request_id))["status"] == "completed"
        decoded = (decoded_by(app_a), decoded_by(app_b))
        completed = (app_a.state.gateway.metrics.completed, app_b.state.gateway.metrics.completed)
    assert decoded == (8, 2)
    assert completed == (8, 2)  # each result counted once, by the gateway that accepted it


async def test_a_result_on_both_channels_a_gateway_holds_is_decoded_once(
    redis_address: str,
) -> None:
    """A stream open on the accepting gateway (own and owner channel both subscribed): its result is decoded once."""
    settings = shared_settings(redis_address)
    async with (
        serving(settings) as (app_a, base_a),
        serving(twin(settings)) as (app_b, _),
        httpx.AsyncClient(base_url=f"http://{base_a}") as a,
        worker_running(settings),
        connect(f"ws://{base_a}/v1/predictions/stream") as socket,
    ):
        await submit(a, 7)
        pushed = json.loads(await asyncio.wait_for(socket.recv(), 15))
        await asyncio.sleep(0.2)  # time for the copy on the other channel to arrive
        decoded = (decoded_by(app_a), decoded_by(app_b))
    assert pushed["label"] == 7
    assert decoded == (1, 0)


async def test_results_of_an_older_worker_without_routing_attributes_are_answered(
    redis_address: str,
) -> None:
    """Results without owner/completed_at attributes are decoded to route them, and answered on both gateways."""
    settings = shared_settings(redis_address)
    async with two_gateways(settings) as ((_, a), (_, b)):
        ids = [
            ((await submit(client, i)).json()["request_id"], client)
            for i, client in enumerate([a, b] * 2)
        ]
        async with worker_running(settings, routing_attributes=False):
            answers = [await poll(client, request_id) for request_id, client in ids]
    assert [answer["label"] for answer in answers] == [0, 1, 2, 3]


async def test_a_malformed_result_fails_its_request_on_every_gateway(redis_address: str) -> None:
    """A result that cannot be parsed answers its request failed (malformed_result) on A and B, not pending."""
    settings = shared_settings(redis_address)
    async with two_gateways(settings) as ((app_a, a), (_, b)):
        request_id = (await submit(a, 1)).json()["request_id"]
        async with messaging.connect(settings.broker_url) as pubsub:
            await pubsub.ensure_topics(settings.results_topic)
            await pubsub.publish(
                settings.results_topic,
                b'{"request_id": "' + request_id.encode() + b'", "status": ',
                attributes=result_attributes(
                    {OWNER_ATTR: "", GATEWAY_ATTR: app_a.state.gateway.gateway_id},
                    time.time(),
                    request_id,
                ),
            )
        on_a = await poll(a, request_id)
        on_b = await poll(b, request_id)
    assert (on_a["status"], on_a["error"]["code"]) == ("failed", "malformed_result")
    assert (on_b["status"], on_b["error"]["code"]) == ("failed", "malformed_result")


async def test_a_get_racing_the_result_into_redis_answers_the_result(
    redis_address: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GET on B while A's request's result replaces its pending entry answers the result, not 404."""
    settings = shared_settings(redis_address)
    async with two_gateways(settings) as ((app_a, a), (app_b, b)):
        request_id = (await submit(a, 2)).json()["request_id"]
        shared = app_b.state.gateway.shared
        result = ResultMessage(
            request_id=request_id, status="completed", label=2, completed_at=time.time()
        )
        get_pending = shared.get_pending

        async def result_lands_first(rid: str) -> Any:
            """The result is stored (and the pending entry deleted) just before B reads it."""
            await shared.store_results(
                [(rid, "", result.to_bytes(), app_a.state.gateway.gateway_id)]
            )
            return await get_pending(rid)

        monkeypatch.setattr(shared, "get_pending", result_lands_first)
        answer = await b.get(f"/v1/predictions/{request_id}")
    assert answer.status_code == 200, answer.text
    assert (answer.json()["status"], answer.json()["label"]) == ("completed", 2)


async def test_an_overdue_request_of_a_gone_gateway_answers_failed_on_another(
    redis_address: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past its deadline, a request whose gateway is gone answers failed (deadline_exceeded) on B, not 404."""
    monkeypatch.setattr("app.gateway.shared_state.EXPIRY_GRACE_S", 0.0)  # no 5 s wait for the grace
    settings = shared_settings(redis_address, request_deadline_s=0.3)
    async with running_gateway(settings) as (_, a):
        request_id = (await submit(a, 7)).json()["request_id"]
    async with running_gateway(twin(settings)) as (_, b):
        await asyncio.sleep(0.5)
        answer = await b.get(f"/v1/predictions/{request_id}")
    assert answer.status_code == 200, answer.text
    assert (answer.json()["status"], answer.json()["error"]["code"]) == (
        "failed",
        "deadline_exceeded",
    )


async def test_a_stream_on_one_gateway_gets_results_of_the_other_and_resumes(
    redis_address: str,
) -> None:
    """A stream on B pushes the result of a request accepted by A; resuming with its cursor on A replays the next."""
    settings = shared_settings(redis_address)
    async with (
        serving(settings) as (_, base_a),
        serving(twin(settings)) as (_, base_b),
        httpx.AsyncClient(base_url=f"http://{base_a}") as a,
    ):
        async with worker_running(settings):
            async with connect(f"ws://{base_b}/v1/predictions/stream") as socket:
                first_id = (await submit(a, 1)).json()["request_id"]
                pushed = json.loads(await asyncio.wait_for(socket.recv(), 15))
            second_id = (await submit(a, 2)).json()["request_id"]
            await poll(a, second_id)
        async with connect(
            f"ws://{base_a}/v1/predictions/stream?after={pushed['cursor']}"
        ) as socket:
            resumed = json.loads(await asyncio.wait_for(socket.recv(), 5))
    assert (pushed["request_id"], pushed["label"]) == (first_id, 1)
    assert (resumed["request_id"], resumed["label"]) == (second_id, 2)


async def test_redis_down_makes_the_gateway_unready_and_submits_503(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis stopped: /readyz 503, a submit 503 + Retry-After, and one `shared_state_down` line."""
    try:
        server = start_redis(tmp_path)
    except RuntimeError as exc:
        pytest.skip(str(exc))
    settings = shared_settings(f"127.0.0.1:{server.port}", shared_state_timeout_s=0.5)
    try:
        async with running_gateway(settings) as (_, client):
            ready_before = (await client.get("/readyz")).status_code
            with caplog.at_level(logging.INFO, logger="app.gateway.shared_state"):
                server.stop()
                await asyncio.sleep(3)
                ready = await client.get("/readyz")
                refused = await submit(client, 0)
    finally:
        server.stop()
    downs = [r for r in caplog.records if "event=shared_state_down" in r.getMessage()]
    assert ready_before == 200
    assert ready.status_code == 503
    assert refused.status_code == 503
    assert refused.headers.get("Retry-After")
    assert len(downs) == 1
