"""A worker announces each model it serves on the control topic: at start, with heartbeats, and when it leaves."""

from __future__ import annotations

import pytest

import messaging
from app.protocol import ModelAnnouncement, requests_topic_for
from app.worker.consumer import Worker
from tests.ml.models import TinyClassifier, image
from tests.worker.helpers import MODEL, take, take_results, worker_settings

pytestmark = pytest.mark.timeout(60)


async def test_a_worker_announces_at_start_beats_and_leaves() -> None:
    """live at start, live again each heartbeat interval, `leaving` on drain; all describe the model."""
    settings = worker_settings("memory://announce", heartbeat_interval_s=0.2)
    model = TinyClassifier()
    async with messaging.connect(settings.broker_url) as pubsub:
        await pubsub.ensure_topics(settings.control_topic)
        async with pubsub.subscribe(settings.control_topic, group="observer") as control:
            async with Worker(settings, pubsub, model, worker_id="w1"):
                first_three = await take(control, 3, within=5)
            leaving = await take(control, 1, within=5)
    announced = [ModelAnnouncement.from_bytes(m.data) for m in [*first_three, *leaving]]
    assert [a.status for a in announced] == ["live", "live", "live", "leaving"]
    first = announced[0]
    assert (first.name, first.worker_id, first.heartbeat_s) == (MODEL, "w1", 0.2)
    assert first.input_shape == (1, 28, 28) and len(first.class_names) == 10
    assert first.version == model.version
    assert announced[1].sent_at > first.sent_at


async def test_a_named_model_is_served_on_its_own_topic_and_results_name_it() -> None:
    """Worker(name="shoes") reads `<requests>.shoes` and stamps `model="shoes"` on its results."""
    settings = worker_settings("memory://named")
    model = TinyClassifier()
    async with (
        messaging.connect(settings.broker_url) as pubsub,
        pubsub.subscribe(settings.results_topic, group="observer") as results,
        Worker(settings, pubsub, model, name="shoes"),
    ):
        await pubsub.publish(
            requests_topic_for(settings.requests_topic, "shoes"),
            image(seed=1).numpy().tobytes(),
            key="r1",
            attributes={"request_id": "r1", "shape": "1,28,28"},
        )
        (result,) = await take_results(results, 1)
    assert (result.model, result.status) == ("shoes", "completed")
    assert result.model_version == model.version
