"""Shadow in the gateway: the registry never routes to a shadow, the join, the endpoint and the metrics."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import messaging
from app.gateway.errors import ApiError
from app.gateway.metrics import GatewayMetrics
from app.gateway.registry import ModelRegistry
from app.gateway.shadow import ShadowComparison, ShadowMonitor
from app.gateway.v2.grpc_server import status_code_of
from app.protocol import (
    GATEWAY_ATTR,
    METADATA_ATTR,
    OWNER_ATTR,
    REQUEST_ID_ATTR,
    ModelAnnouncement,
    ResultMessage,
    decode_metadata,
    requests_topic_for,
    result_attributes,
    shadow_group_for,
)
from app.rollout.compare import Answer
from app.settings import Settings
from tests.brokers import unique_name
from tests.gateway.helpers import (
    CLASS_NAMES,
    STAND_IN_MODEL,
    STAND_IN_VERSION,
    announcement,
    fashion_like,
    gateway_settings,
    label_of,
    png_bytes,
    running_gateway,
    sent_now,
    worker_running,
)

pytestmark = pytest.mark.timeout(30)

PNG = {"content-type": "image/png"}
CANDIDATE = "cand00000000"


async def until(condition: Callable[[], object], within: float = 5.0) -> None:
    """Return once `condition()` holds; fail after `within` seconds."""
    async with asyncio.timeout(within):
        while True:
            if condition():
                return
            await asyncio.sleep(0.01)


def shadow_announcement(worker_id: str = "shadow-1") -> ModelAnnouncement:
    return announcement(worker_id, version=CANDIDATE).model_copy(update={"role": "shadow"})


def registry_with_shadow() -> ModelRegistry:
    """A registry that learned the live stand-in, then a newer shadow version."""
    registry = ModelRegistry()
    registry.learn(sent_now(announcement("live-1")))
    registry.learn(sent_now(shadow_announcement()))
    return registry


def test_a_shadow_version_is_listed_with_its_role() -> None:
    """The registry lists a shadow-only version with role shadow, no serving worker, one shadow worker."""
    versions = {v.version: v for v in registry_with_shadow().versions(STAND_IN_MODEL)}
    shadow = versions[CANDIDATE]
    assert (shadow.role, shadow.live_workers, shadow.shadow_workers) == ("shadow", 0, 1)
    assert not shadow.ready
    assert versions[STAND_IN_VERSION].role == "serving"


def test_unpinned_traffic_never_goes_to_a_shadow_version() -> None:
    """The default resolution skips a newer shadow version and picks the serving one."""
    assert registry_with_shadow().resolve(None).version == STAND_IN_VERSION


async def test_pinning_a_shadow_version_is_a_clear_409() -> None:
    """POST ?version=<shadow> is refused with 409 version_is_shadow naming the serving versions."""
    settings = gateway_settings()
    async with running_gateway(settings) as (app, client):
        app.state.gateway.registry.learn(sent_now(shadow_announcement()))
        response = await client.post(
            f"/v1/predictions?version={CANDIDATE}", content=png_bytes(fashion_like()), headers=PNG
        )
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "version_is_shadow"
    assert STAND_IN_VERSION in response.json()["error"]["message"]


def monitor_of(
    registry: ModelRegistry,
    live_result: Callable[[str], ResultMessage | None] = lambda request_id: None,
    **overrides: Any,
) -> ShadowMonitor:
    settings = gateway_settings(**overrides)
    metrics = GatewayMetrics(in_flight=lambda: 0)
    return ShadowMonitor(
        settings,
        registry,
        metrics,
        gateway_id="gw-a",
        live_result=live_result,
    )


def result(
    request_id: str, label: int | None, version: str, *, truth: int | None = None, ms: float = 1.0
) -> ResultMessage:
    return ResultMessage(
        request_id=request_id,
        status="completed" if label is not None else "failed",
        label=label,
        model=STAND_IN_MODEL,
        model_version=version,
        inference_ms=ms,
        completed_at=time.time(),
        metadata={} if truth is None else {"label": str(truth)},
    )


def test_live_and_shadow_results_join_by_request_id_into_the_figures() -> None:
    """Agreement, per-class disagreement, accuracy on labelled requests and latency, either side first."""
    monitor = monitor_of(registry_with_shadow())
    monitor.follow_registry()
    # r0, r1 agree (class 1); r2: live 2, candidate 3; r3 is labelled 3. Truth: r0=1, r2=3.
    monitor.add_live(result("r0", 1, STAND_IN_VERSION, truth=1, ms=2.0))
    monitor.add_shadow(result("r0", 1, CANDIDATE, ms=4.0))
    monitor.add_shadow(result("r1", 1, CANDIDATE, ms=4.0))
    monitor.add_live(result("r1", 1, STAND_IN_VERSION, ms=2.0))
    monitor.add_live(result("r2", 2, STAND_IN_VERSION, truth=3, ms=2.0))
    monitor.add_shadow(result("r2", 3, CANDIDATE, ms=4.0))
    monitor.add_live(result("r3", 3, STAND_IN_VERSION))  # the candidate has not answered
    (entry,) = monitor.candidates(STAND_IN_MODEL)
    assert entry["version"] == CANDIDATE
    assert entry["samples"] == 3
    assert entry["agreement"] == pytest.approx(2 / 3, abs=1e-6)
    assert entry["disagreement"] == {"class-2": {"class-3": 1}}
    assert (entry["labelled"], entry["live_accuracy"], entry["candidate_accuracy"]) == (2, 0.5, 1.0)
    assert entry["live_latency_ms"] == {"p50": 2.0, "p99": 2.0}
    assert entry["candidate_latency_ms"] == {"p50": 4.0, "p99": 4.0}


def test_a_failed_shadow_answer_counts_as_wrong_and_not_as_agreement() -> None:
    """A failed candidate answer joins the pair but counts neither in agreement nor as correct."""
    monitor = monitor_of(registry_with_shadow())
    monitor.follow_registry()
    monitor.add_live(result("r0", 1, STAND_IN_VERSION, truth=1))
    monitor.add_shadow(result("r0", None, CANDIDATE))
    (entry,) = monitor.candidates(STAND_IN_MODEL)
    assert (entry["samples"], entry["agreement"], entry["candidate_accuracy"]) == (1, None, 0.0)


def test_live_results_read_back_from_long_before_the_gateway_started_are_not_compared() -> None:
    """A live result the gateway re-read from an hour ago waits for no shadow answer."""
    monitor = monitor_of(registry_with_shadow())
    monitor.follow_registry()
    old = result("old", 1, STAND_IN_VERSION).model_copy(update={"completed_at": time.time() - 3600})
    monitor.add_live(old)
    monitor.add_shadow(result("old", 1, CANDIDATE))
    (entry,) = monitor.candidates(STAND_IN_MODEL)
    assert entry["samples"] == 0


def test_a_live_result_stored_before_the_comparison_was_fed_still_joins() -> None:
    """A shadow result whose live answer came before the gateway fed its candidate joins it from the store."""
    live = result("r0", 1, STAND_IN_VERSION, truth=1)
    monitor = monitor_of(registry_with_shadow(), {"r0": live}.get)
    monitor.add_live(live)  # not fed yet: the registry has not been followed
    monitor.add_shadow(result("r0", 2, CANDIDATE))
    (entry,) = monitor.candidates(STAND_IN_MODEL)
    assert (entry["samples"], entry["agreement"], entry["candidate_accuracy"]) == (1, 0.0, 0.0)


def test_a_comparison_keeps_only_about_its_window_of_pairs() -> None:
    """Past FMNIST_SHADOW_WINDOW pairs the oldest are dropped, so a long shadow holds bounded memory."""
    comparison = ShadowComparison(STAND_IN_MODEL, CANDIDATE, tuple(CLASS_NAMES), window=100)
    for i in range(1000):
        comparison.add_live(f"r{i}", Answer(1), None)
        comparison.add_candidate(f"r{i}", Answer(1))
    assert 100 <= len(comparison.pairs) <= 110
    assert len(comparison._joined) == len(comparison.pairs)
    assert comparison.pairs[-1].request_id == "r999"


async def test_with_shared_state_a_gateway_compares_only_its_own_requests() -> None:
    """With shared state, a shadow result of another gateway's request is not joined here."""
    registry = registry_with_shadow()
    monitor = monitor_of(
        registry, shared_state_url="redis://unused:6379", shadow_results_topic=unique_name("sh")
    )
    settings = monitor.settings
    await monitor.start()
    reader_connection = messaging.connect(settings.broker_url)
    await reader_connection.connect()
    reader = asyncio.create_task(monitor.read(reader_connection))
    try:
        await until(lambda: monitor.reading)
        for request_id in ("mine", "theirs"):
            monitor.add_live(result(request_id, 1, STAND_IN_VERSION))
        async with messaging.connect(settings.broker_url) as pubsub:
            for request_id, gateway in (("mine", "gw-a"), ("theirs", "gw-b")):
                await pubsub.publish(
                    settings.shadow_results_topic,
                    result(request_id, 1, CANDIDATE).to_bytes(),
                    key=request_id,
                    attributes={GATEWAY_ATTR: gateway, OWNER_ATTR: ""},
                )
        await until(lambda: [c["samples"] for c in monitor.candidates(STAND_IN_MODEL)] == [1])
        await asyncio.sleep(0.1)
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        await reader_connection.close()
        await monitor.stop()
    (entry,) = monitor.candidates(STAND_IN_MODEL)
    assert entry["samples"] == 1


async def stand_in_shadow(settings: Settings) -> None:
    """A shadow worker without torch: reads the model's topic in the shadow group, answers the live
    stand-in's label on even first pixels and the next class on odd ones, on the shadow topic."""
    model = shadow_announcement()
    topic = requests_topic_for(settings.requests_topic, STAND_IN_MODEL)
    group = shadow_group_for(settings.worker_group, STAND_IN_MODEL, CANDIDATE)
    async with messaging.connect(settings.broker_url) as pubsub:
        await pubsub.ensure_topics(topic, settings.shadow_results_topic, settings.control_topic)
        async with pubsub.subscribe(topic, group=group, start="latest") as requests:
            await pubsub.publish(settings.control_topic, sent_now(model).to_bytes(), key="fmnist")
            async for message in requests:
                attributes = message.attributes
                live = label_of(message.data)
                label = live if live % 2 == 0 else (live + 1) % 10
                answer = ResultMessage(
                    request_id=attributes[REQUEST_ID_ATTR],
                    status="completed",
                    label=label,
                    model=STAND_IN_MODEL,
                    model_version=CANDIDATE,
                    inference_ms=0.5,
                    completed_at=time.time(),
                    metadata=decode_metadata(attributes.get(METADATA_ATTR)),
                )
                await pubsub.publish(
                    settings.shadow_results_topic,
                    answer.to_bytes(),
                    attributes=result_attributes(
                        attributes, answer.completed_at, answer.request_id
                    ),
                )
                await message.ack()


@contextlib.asynccontextmanager
async def shadow_running(settings: Settings, app: Any) -> AsyncIterator[None]:
    task = asyncio.create_task(stand_in_shadow(settings))
    try:
        await until(
            lambda: any(
                v.role == "shadow" and v.shadow_workers
                for v in app.state.gateway.registry.versions(STAND_IN_MODEL)
            )
        )
        app.state.gateway.shadow.follow_registry()
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def send_labelled(client: httpx.AsyncClient, count: int) -> list[dict[str, Any]]:
    """Submit `count` images, each labelled with the stand-in's own answer, and wait for them."""
    answers = []
    for i in range(count):
        response = await client.post(
            "/v1/predictions?wait=5",
            content=png_bytes(fashion_like(i)),
            headers={**PNG, "x-fmnist-metadata": f'{{"label": "{i % 10}"}}'},
        )
        assert response.status_code == 200, response.text
        answers.append(response.json())
    return answers


async def wait_for_samples(client: httpx.AsyncClient, count: int) -> dict[str, Any]:
    async with asyncio.timeout(10):
        while True:
            body = (await client.get(f"/v1/models/{STAND_IN_MODEL}/shadow")).json()
            if body["candidates"] and body["candidates"][0]["samples"] >= count:
                return body
            await asyncio.sleep(0.02)


async def test_the_shadow_endpoint_reports_a_running_candidate_and_clients_see_only_live_results() -> (
    None
):
    """GET /v1/models/{name}/shadow reports the candidate's agreement and accuracy; clients get the
    live version's results only."""
    settings = gateway_settings(shadow_results_topic=unique_name("sh"))
    async with (
        running_gateway(settings) as (app, client),
        worker_running(settings),
        shadow_running(settings, app),
    ):
        answers = await send_labelled(client, 10)
        body = await wait_for_samples(client, 10)
        model = (await client.get(f"/v1/models/{STAND_IN_MODEL}")).json()
    assert {a["model_version"] for a in answers} == {STAND_IN_VERSION}
    (entry,) = body["candidates"]
    assert (body["model"], entry["version"], entry["samples"]) == ("fmnist", CANDIDATE, 10)
    assert entry["agreement"] == 0.5  # the stand-in shadow answers the odd classes differently
    assert (entry["labelled"], entry["live_accuracy"], entry["candidate_accuracy"]) == (
        10,
        1.0,
        0.5,
    )
    assert entry["disagreement"]["class-1"] == {"class-2": 1}
    roles = {v["version"]: v["role"] for v in model["versions"]}
    assert roles == {STAND_IN_VERSION: "serving", CANDIDATE: "shadow"}


async def test_the_shadow_figures_are_prometheus_metrics() -> None:
    """/metrics carries the candidate's agreement, accuracy, samples and disagreements."""
    settings = gateway_settings(shadow_results_topic=unique_name("sh"))
    async with (
        running_gateway(settings) as (app, client),
        worker_running(settings),
        shadow_running(settings, app),
    ):
        await send_labelled(client, 4)
        await wait_for_samples(client, 4)
        text = (await client.get("/metrics")).text
    samples = {
        (sample.name, sample.labels.get("candidate"), sample.labels.get("live_class")): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("fmnist_shadow")
    }
    assert samples[("fmnist_shadow_agreement", CANDIDATE, None)] == 0.5
    assert samples[("fmnist_shadow_candidate_accuracy", CANDIDATE, None)] == 0.5
    assert samples[("fmnist_shadow_live_accuracy", CANDIDATE, None)] == 1.0
    assert samples[("fmnist_shadow_samples_total", CANDIDATE, None)] == 4
    assert samples[("fmnist_shadow_disagreements_total", CANDIDATE, "class-1")] == 1


async def test_the_shadow_endpoint_is_404_for_an_unknown_model_and_empty_without_a_shadow() -> None:
    """An unknown model is 404 model_not_found; a known one without a shadow lists no candidate."""
    async with running_gateway(gateway_settings()) as (_, client):
        unknown = await client.get("/v1/models/nope/shadow")
        known = await client.get(f"/v1/models/{STAND_IN_MODEL}/shadow")
    assert (unknown.status_code, unknown.json()["error"]["code"]) == (404, "model_not_found")
    assert (known.status_code, known.json()) == (200, {"model": "fmnist", "candidates": []})


def test_pinning_a_shadow_version_over_grpc_is_failed_precondition_not_internal() -> None:
    """The gRPC service maps the 409 of a pinned shadow version to FAILED_PRECONDITION."""
    refused = ApiError(409, "version_is_shadow", "runs as a shadow")
    assert status_code_of(refused) == grpc.StatusCode.FAILED_PRECONDITION
