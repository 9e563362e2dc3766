"""Shadow worker in-process: a copy of live traffic, its own results topic, from now on, never retried."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

import messaging
from app import protocol
from app.protocol import ModelAnnouncement, TrafficWeights
from app.settings import Settings
from app.worker.consumer import Worker
from app.worker.shadow import ShadowWorker
from messaging import PubSub
from tests.brokers import connect_options, unique_name
from tests.ml.models import PoisonClassifier, TinyClassifier, image
from tests.worker.helpers import (
    MODEL,
    model_topic,
    nothing_more,
    publish_request,
    request_attributes,
    take,
    take_results,
    worker_settings,
)

pytestmark = pytest.mark.timeout(30)


async def until(condition: Callable[[], object], within: float = 5.0) -> None:
    """Return once `condition()` holds; fail after `within` seconds."""
    async with asyncio.timeout(within):
        while True:
            if condition():
                return
            await asyncio.sleep(0.01)


class Candidate(TinyClassifier):
    """Another version of the model: other weights, its own version id."""

    version = "cand00000000"

    def __init__(self) -> None:
        super().__init__(seed=1)


class PoisonCandidate(PoisonClassifier):
    version = "cand00000000"


def shadow_settings() -> Settings:
    url = f"memory://{unique_name('shadow')}"
    return worker_settings(
        url,
        shadow_results_topic=unique_name("shadowres"),
        rollout_topic=unique_name("rollout"),
    )


async def topics(pubsub: PubSub, settings: Settings) -> None:
    await pubsub.ensure_topics(
        model_topic(settings),
        settings.results_topic,
        settings.shadow_results_topic,
        settings.deadletter_topic,
        settings.control_topic,
        settings.rollout_topic,
    )


async def test_shadow_results_go_to_the_shadow_topic_only() -> None:
    """Each live request gets a shadow result on the shadow topic, with the candidate's version and
    the request's routing attributes, and nothing on the live results topic."""
    settings = shadow_settings()
    async with messaging.connect(settings.broker_url) as pubsub:
        await topics(pubsub, settings)
        async with (
            pubsub.subscribe(settings.results_topic, group="live-observer") as live,
            pubsub.subscribe(settings.shadow_results_topic, group="observer") as shadow,
            ShadowWorker(settings, pubsub, Candidate(), worker_id="s1"),
        ):
            for i in range(3):
                await pubsub.publish(
                    model_topic(settings),
                    image(seed=i).numpy().tobytes(),
                    key=f"r{i}",
                    attributes={
                        **request_attributes(f"r{i}", image(seed=i), metadata={"label": "1"}),
                        protocol.GATEWAY_ATTR: "gw-a",
                    },
                )
            messages = await take(shadow, 3)
            assert await nothing_more(live, wait=0.3)
    results = [protocol.ResultMessage.from_bytes(m.data) for m in messages]
    assert {r.request_id for r in results} == {"r0", "r1", "r2"}
    assert {r.model_version for r in results} == {"cand00000000"}
    assert all(r.status == "completed" and r.metadata == {"label": "1"} for r in results)
    assert {m.attributes[protocol.GATEWAY_ATTR] for m in messages} == {"gw-a"}


async def test_a_shadow_takes_nothing_away_from_the_live_workers() -> None:
    """With a live worker and a shadow on the same topic, every request gets both a live and a shadow result."""
    settings = shadow_settings()
    async with messaging.connect(settings.broker_url) as pubsub:
        await topics(pubsub, settings)
        async with (
            pubsub.subscribe(settings.results_topic, group="live-observer") as live,
            pubsub.subscribe(settings.shadow_results_topic, group="observer") as shadow,
            Worker(settings, pubsub, TinyClassifier(), worker_id="w1"),
            ShadowWorker(settings, pubsub, Candidate(), worker_id="s1"),
        ):
            for i in range(10):
                await publish_request(pubsub, settings, f"r{i}", image(seed=i))
            live_results = await take_results(live, 10)
            shadow_results = await take_results(shadow, 10)
    assert {r.request_id for r in live_results} == {f"r{i}" for i in range(10)}
    assert {r.request_id for r in shadow_results} == {f"r{i}" for i in range(10)}
    assert {r.model_version for r in live_results} == {"tiny00000000"}


async def test_a_shadow_starts_at_the_current_end_of_the_topic() -> None:
    """Requests published before the shadow started are not answered by it: no old backlog."""
    settings = shadow_settings()
    async with messaging.connect(settings.broker_url) as pubsub:
        await topics(pubsub, settings)
        for i in range(5):
            await publish_request(pubsub, settings, f"old{i}", image(seed=i))
        await asyncio.sleep(0.01)  # the shadow's start time is after the backlog's
        async with (
            pubsub.subscribe(settings.shadow_results_topic, group="observer") as shadow,
            ShadowWorker(settings, pubsub, Candidate(), worker_id="s1"),
        ):
            await publish_request(pubsub, settings, "new", image(seed=9))
            (result,) = await take_results(shadow, 1)
            assert await nothing_more(shadow, wait=0.3)
    assert result.request_id == "new"


async def test_a_failed_shadow_inference_is_a_failed_shadow_result_never_a_retry() -> None:
    """A model error becomes a failed shadow result; nothing is re-queued or dead-lettered."""
    settings = shadow_settings()
    async with messaging.connect(settings.broker_url) as pubsub:
        await topics(pubsub, settings)
        async with (
            pubsub.subscribe(settings.shadow_results_topic, group="observer") as shadow,
            pubsub.subscribe(model_topic(settings), group="requests-observer") as requests,
            pubsub.subscribe(settings.deadletter_topic, group="dead-observer") as dead,
            ShadowWorker(settings, pubsub, PoisonCandidate(), worker_id="s1"),
        ):
            await publish_request(pubsub, settings, "poison", image(255))
            (result,) = await take_results(shadow, 1)
            await take(requests, 1)  # the original request
            assert await nothing_more(requests, wait=0.3)
            assert await nothing_more(dead, wait=0.05)
    assert result.status == "failed" and result.error is not None
    assert result.error.code == "model_error"
    assert result.model_version == "cand00000000"


async def test_a_shadow_announces_itself_with_the_shadow_role() -> None:
    """The shadow's announcement on the control topic says role=shadow."""
    settings = shadow_settings()
    async with messaging.connect(settings.broker_url) as pubsub:
        await topics(pubsub, settings)
        async with (
            pubsub.subscribe(settings.control_topic, group="observer") as control,
            ShadowWorker(settings, pubsub, Candidate(), worker_id="s1"),
        ):
            (message,) = await take(control, 1)
    announcement = ModelAnnouncement.from_bytes(message.data)
    assert (announcement.role, announcement.version) == ("shadow", "cand00000000")


async def publish_weights(pubsub: PubSub, settings: Settings, weights: dict[str, int]) -> None:
    split = TrafficWeights(model=MODEL, weights=weights, set_at=time.time())
    await pubsub.publish(
        settings.rollout_topic,
        split.to_bytes(),
        key=MODEL,
        attributes={protocol.KIND_ATTR: protocol.WEIGHTS_KIND},
    )


async def test_a_shadow_reads_the_version_topics_of_a_canary_split() -> None:
    """Under a split (set before and after the shadow starts) it also reads each weighted version's
    topic, in its own group, but not its own version's."""
    settings = shadow_settings()
    async with messaging.connect(settings.broker_url) as pubsub:
        await topics(pubsub, settings)
        await publish_weights(pubsub, settings, {"aaaa": 90, "bbbb": 10, "cccc": 0})
        async with ShadowWorker(settings, pubsub, Candidate(), worker_id="s1") as shadow:
            assert shadow.topics == sorted(
                [
                    model_topic(settings),
                    model_topic(settings, "aaaa"),
                    model_topic(settings, "bbbb"),
                ]
            )
            await publish_weights(pubsub, settings, {"aaaa": 50, "cand00000000": 50})
            await until(lambda: model_topic(settings, "bbbb") not in shadow.topics)
            async with pubsub.subscribe(settings.shadow_results_topic, group="obs") as results:
                torch_image = image(seed=3)
                await pubsub.publish(
                    model_topic(settings, "aaaa"),
                    torch_image.numpy().tobytes(),
                    key="pinned",
                    attributes=request_attributes("pinned", torch_image),
                )
                (result,) = await take_results(results, 1)
            assert shadow.topics == sorted([model_topic(settings), model_topic(settings, "aaaa")])
    assert result.request_id == "pinned"


@pytest.mark.kafka
@pytest.mark.slow
async def test_a_second_shadow_worker_joining_does_not_send_the_first_back_to_its_start(
    kafka_url: str,
) -> None:
    """On Kafka, the rebalance a second shadow worker causes keeps the group's committed offsets:
    the requests the first already answered are not answered again."""
    settings = worker_settings(
        kafka_url, shadow_results_topic=unique_name("shadowres"), rollout_topic=unique_name("ro")
    )
    options = connect_options(kafka_url)
    async with (
        messaging.connect(kafka_url, **options) as pubsub,
        messaging.connect(kafka_url, **options) as other,
    ):
        await topics(pubsub, settings)
        async with (
            pubsub.subscribe(settings.shadow_results_topic, group="observer") as shadow,
            ShadowWorker(settings, pubsub, Candidate(), worker_id="s1"),
        ):
            for i in range(12):
                await publish_request(pubsub, settings, f"r{i}", image(seed=i))
            await take(shadow, 12)
            async with ShadowWorker(settings, other, Candidate(), worker_id="s2"):
                await publish_request(pubsub, settings, "after", image(seed=20))
                (last,) = await take_results(shadow, 1)
                assert await nothing_more(shadow, wait=0.5)
    assert last.request_id == "after"
