"""Worker in-process: round trip on every backend, failures, dead letters, ack-after-publish, drain."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import messaging
from app import protocol
from app.settings import Settings
from app.worker import consumer as worker_module
from app.worker import inference
from app.worker.consumer import Worker
from messaging import BrokerUnavailable, PubSub
from messaging._base import OutgoingItem
from tests.brokers import connect_options
from tests.ml.models import PoisonClassifier, TinyClassifier, image
from tests.worker.helpers import (
    model_topic,
    nothing_more,
    publish_request,
    request_attributes,
    results_by_id,
    take,
    take_results,
    worker_settings,
)

pytestmark = pytest.mark.timeout(60)


def open_broker(url: str) -> PubSub:
    return messaging.connect(url, **connect_options(url))


async def test_every_request_gets_its_result_on_every_backend(broker_url: str) -> None:
    """Requests in → one completed result per request, with batch provenance, owner and metadata echoed."""
    settings = worker_settings(broker_url)
    model = TinyClassifier()
    images = [image(seed=i) for i in range(24)]
    expected = model.predict(torch.stack(images))
    async with open_broker(broker_url) as pubsub:
        await pubsub.ensure_topics(
            model_topic(settings), settings.results_topic, settings.deadletter_topic
        )
        async with (
            pubsub.subscribe(settings.results_topic, group="observer") as results,
            Worker(settings, pubsub, model, worker_id="w1") as worker,
        ):
            await asyncio.gather(
                *(
                    publish_request(
                        pubsub, settings, f"r{i}", img, owner="key-a", metadata={"label": str(i)}
                    )
                    for i, img in enumerate(images)
                )
            )
            answers = results_by_id(await take_results(results, 24))
            assert worker.stats.completed == 24
    assert sorted(answers) == sorted(f"r{i}" for i in range(24))
    for i, row in enumerate(expected):
        result = answers[f"r{i}"]
        assert result.status == "completed"
        assert result.label == int(row.argmax())
        assert result.probabilities == pytest.approx(row.tolist(), abs=1e-6)
        assert (result.owner, result.metadata, result.worker_id) == (
            "key-a",
            {"label": str(i)},
            "w1",
        )
        assert result.model_version == model.version
        assert result.batch_id and result.batch_size and 1 <= result.batch_size <= 8
        assert result.queue_ms is not None and result.inference_ms is not None


async def test_an_undecodable_request_goes_to_the_dead_letter_topic_and_its_client_gets_a_failure() -> (
    None
):
    """A payload of the wrong size is dead-lettered with the error, answered as failed, and the worker goes on."""
    settings = worker_settings("memory://")
    async with open_broker("memory://") as pubsub:
        await pubsub.ensure_topics(
            model_topic(settings), settings.results_topic, settings.deadletter_topic
        )
        async with (
            pubsub.subscribe(settings.results_topic, group="observer") as results,
            pubsub.subscribe(settings.deadletter_topic, group="observer") as dead,
            Worker(settings, pubsub, TinyClassifier()),
        ):
            await pubsub.publish(
                model_topic(settings),
                b"\x00" * 10,
                key="bad",
                attributes={protocol.REQUEST_ID_ATTR: "bad", protocol.SHAPE_ATTR: "1,28,28"},
            )
            await publish_request(pubsub, settings, "good", image(seed=1))
            (letter,) = await take(dead, 1)
            answers = results_by_id(await take_results(results, 2))
    assert letter.attributes[protocol.ERROR_CODE_ATTR] == "undecodable_request"
    assert "10 bytes" in letter.attributes[protocol.ERROR_MESSAGE_ATTR]
    assert letter.data == b"\x00" * 10
    assert answers["bad"].status == "failed" and answers["bad"].error is not None
    assert answers["bad"].error.code == "invalid_request"
    assert answers["good"].status == "completed"


async def test_deeply_nested_metadata_is_dead_lettered_not_redelivered_forever() -> None:
    """Metadata nested past the JSON parser's recursion limit is a poison message: dead-lettered once."""
    settings = worker_settings("memory://")
    async with open_broker("memory://") as pubsub:
        await pubsub.ensure_topics(
            model_topic(settings), settings.results_topic, settings.deadletter_topic
        )
        async with (
            pubsub.subscribe(settings.deadletter_topic, group="observer") as dead,
            Worker(settings, pubsub, TinyClassifier()),
        ):
            await pubsub.publish(
                model_topic(settings),
                bytes(image(seed=2).flatten().tolist()),
                key="nested",
                attributes={
                    protocol.REQUEST_ID_ATTR: "nested",
                    protocol.SHAPE_ATTR: "1,28,28",
                    protocol.METADATA_ATTR: "[" * 5000,
                },
            )
            (letter,) = await take(dead, 1)
    assert letter.attributes[protocol.REQUEST_ID_ATTR] == "nested"
    assert letter.attributes[protocol.ERROR_CODE_ATTR] == "undecodable_request"


async def test_an_expired_request_is_answered_deadline_exceeded_without_compute() -> None:
    """A request whose deadline passed gets a failed result with code deadline_exceeded."""
    settings = worker_settings("memory://")
    model = TinyClassifier()
    async with open_broker("memory://") as pubsub:
        await pubsub.ensure_topics(
            model_topic(settings), settings.results_topic, settings.deadletter_topic
        )
        async with (
            pubsub.subscribe(settings.results_topic, group="observer") as results,
            Worker(settings, pubsub, model),
        ):
            await publish_request(pubsub, settings, "late", image(1), deadline_in_s=-1.0)
            (answer,) = await take_results(results, 1)
    assert answer.status == "failed" and answer.error is not None
    assert answer.error.code == "deadline_exceeded"
    assert model.calls == []


async def test_results_carry_the_attributes_a_gateway_routes_them_by() -> None:
    """A result's attributes repeat its request id, owner, completed_at and (when the request had
    one) its gateway; it carries no key (a request id orders nothing)."""
    settings = worker_settings("memory://")
    async with open_broker("memory://") as pubsub:
        await pubsub.ensure_topics(
            model_topic(settings), settings.results_topic, settings.deadletter_topic
        )
        async with (
            pubsub.subscribe(settings.results_topic, group="observer") as results,
            Worker(settings, pubsub, TinyClassifier()),
        ):
            await pubsub.publish(
                model_topic(settings),
                image(1).contiguous().numpy().tobytes(),
                key="routed",
                attributes={
                    **request_attributes("routed", image(1), owner="k1"),
                    protocol.GATEWAY_ATTR: "gw-a",
                },
            )
            await publish_request(pubsub, settings, "late", image(2), deadline_in_s=-1.0)
            taken_messages = await take(results, 2)
            taken = {m.attributes[protocol.REQUEST_ID_ATTR]: m for m in taken_messages}
    routed, late = taken["routed"], taken["late"]
    assert [m.key for m in taken_messages] == [None, None]
    assert routed.attributes[protocol.OWNER_ATTR] == "k1"
    assert routed.attributes[protocol.GATEWAY_ATTR] == "gw-a"
    assert float(routed.attributes[protocol.COMPLETED_AT_ATTR]) == (
        protocol.ResultMessage.from_bytes(routed.data).completed_at
    )
    assert late.attributes[protocol.OWNER_ATTR] == ""
    assert protocol.GATEWAY_ATTR not in late.attributes  # its request named no gateway
    assert float(late.attributes[protocol.COMPLETED_AT_ATTR]) == (
        protocol.ResultMessage.from_bytes(late.data).completed_at
    )


async def test_a_request_that_keeps_failing_is_retried_then_dead_lettered() -> None:
    """A model error re-queues the request; after max_attempts it is dead-lettered and answered as failed."""
    settings = worker_settings("memory://", max_attempts=3)
    async with open_broker("memory://") as pubsub:
        await pubsub.ensure_topics(
            model_topic(settings), settings.results_topic, settings.deadletter_topic
        )
        async with (
            pubsub.subscribe(settings.results_topic, group="observer") as results,
            pubsub.subscribe(settings.deadletter_topic, group="observer") as dead,
            Worker(settings, pubsub, PoisonClassifier()) as worker,
        ):
            await publish_request(pubsub, settings, "poison", image(255))
            await publish_request(pubsub, settings, "fine", image(seed=2))
            (letter,) = await take(dead, 1)
            answers = results_by_id(await take_results(results, 2))
            assert worker.outcomes["requeued"] == 2
    assert letter.attributes[protocol.ERROR_CODE_ATTR] == "model_error"
    assert letter.attributes[protocol.ATTEMPT_ATTR] == "3"
    assert "poison pixel" in letter.attributes[protocol.ERROR_MESSAGE_ATTR]
    assert answers["poison"].error is not None and answers["poison"].error.code == "model_error"
    assert answers["fine"].status == "completed"


class ResultsPublishFailsOnce:
    """Fault injection: the first publish to the results topic fails as if the broker dropped."""

    def __init__(self, pubsub: PubSub, results_topic: str, times: int = 1) -> None:
        self._pubsub = pubsub
        self._results_topic = results_topic
        self._times = times
        self.failed = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self._pubsub, name)

    async def publish(
        self,
        topic: str,
        data: bytes,
        *,
        key: str | None = None,
        attributes: Mapping[str, str] | None = None,
    ) -> None:
        if topic == self._results_topic and self.failed < self._times:
            self.failed += 1
            raise BrokerUnavailable("injected: broker went away")
        await self._pubsub.publish(topic, data, key=key, attributes=attributes)

    async def publish_many(
        self, topic: str, items: Iterable[OutgoingItem], *, timeout_s: float | None = None
    ) -> list[Exception | None]:
        items = list(items)
        failing = min(len(items), self._times - self.failed) if topic == self._results_topic else 0
        self.failed += failing
        rest = await self._pubsub.publish_many(topic, items[failing:], timeout_s=timeout_s)
        return [BrokerUnavailable("injected: broker went away")] * failing + rest


async def test_a_request_is_acked_only_after_its_result_is_published(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """When publishing the result fails, the request is not acked: it comes back and is answered."""
    monkeypatch.setattr(worker_module, "_PUBLISH_FAILURE_BACKOFF_S", 0.01)
    settings = worker_settings("memory://")
    model = TinyClassifier()
    async with open_broker("memory://") as pubsub:
        await pubsub.ensure_topics(
            model_topic(settings), settings.results_topic, settings.deadletter_topic
        )
        flaky = ResultsPublishFailsOnce(pubsub, settings.results_topic)
        async with (
            pubsub.subscribe(settings.results_topic, group="observer") as results,
            Worker(settings, flaky, model) as worker,  # type: ignore[arg-type]
        ):
            await publish_request(pubsub, settings, "r1", image(seed=3))
            (answer,) = await take_results(results, 1)
            assert worker.outcomes["nacked"] == 1
    assert flaky.failed == 1
    assert answer.request_id == "r1" and answer.status == "completed"
    assert model.calls == [1, 1]  # computed twice: the first answer never reached the broker


async def test_failed_publishes_log_one_line_per_chunk_not_per_request(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An outage that fails every result of a chunk logs one publish_failed line with the count."""
    monkeypatch.setattr(worker_module, "_PUBLISH_FAILURE_BACKOFF_S", 0.01)
    settings = worker_settings("memory://", max_batch_size=16, batch_fill_wait_ms=200.0)
    total = 16
    async with open_broker("memory://") as pubsub:
        await pubsub.ensure_topics(
            model_topic(settings), settings.results_topic, settings.deadletter_topic
        )
        flaky = ResultsPublishFailsOnce(pubsub, settings.results_topic, times=total)
        async with (
            pubsub.subscribe(settings.results_topic, group="observer") as results,
            Worker(settings, flaky, TinyClassifier()) as worker,  # type: ignore[arg-type]
        ):
            await asyncio.gather(
                *(publish_request(pubsub, settings, f"r{i}", image(seed=i)) for i in range(total))
            )
            answers = await take_results(results, total)
            assert worker.outcomes["nacked"] == total
    assert {answer.status for answer in answers} == {"completed"}
    lines = [r.getMessage() for r in caplog.records if "event=publish_failed" in r.getMessage()]
    assert 1 <= len(lines) < total
    assert sum(int(line.split("count=")[1].split()[0]) for line in lines) == total


async def test_a_crash_building_one_result_gives_back_that_request_alone(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A result that fails to build is logged and its request given back; the others are published."""
    monkeypatch.setattr(worker_module, "_PUBLISH_FAILURE_BACKOFF_S", 0.01)
    settings = worker_settings("memory://", max_batch_size=8, batch_fill_wait_ms=200.0)
    completed = worker_module.ResultPublisher.completed

    def completed_crashing_on_r1(
        self: object, message: object, request: Any, prediction: object
    ) -> object:
        if request.request_id == "r1":
            raise RuntimeError("a bug building the result")
        return completed(self, message, request, prediction)  # type: ignore[arg-type]

    monkeypatch.setattr(worker_module.ResultPublisher, "completed", completed_crashing_on_r1)
    async with open_broker("memory://") as pubsub:
        await pubsub.ensure_topics(
            model_topic(settings), settings.results_topic, settings.deadletter_topic
        )
        async with (
            pubsub.subscribe(settings.results_topic, group="observer") as results,
            Worker(settings, pubsub, TinyClassifier()) as worker,
        ):
            await asyncio.gather(
                *(publish_request(pubsub, settings, f"r{i}", image(seed=i)) for i in range(4))
            )
            answers = await take_results(results, 3)
            assert worker.outcomes["nacked"] >= 1
            assert worker.outcomes["completed"] == 3
    assert sorted(answer.request_id for answer in answers) == ["r0", "r2", "r3"]
    assert any(
        "event=handler_crashed" in r.getMessage() and "request_id=r1" in r.getMessage()
        for r in caplog.records
    )


async def test_drain_answers_in_flight_requests_and_leaves_the_rest_to_the_next_worker() -> None:
    """A drained worker answers what it took; a second worker of the group finishes the others, none twice."""
    settings = worker_settings("memory://", max_batch_size=4, batch_fill_wait_ms=20.0)
    total = 60
    async with open_broker("memory://") as pubsub:
        await pubsub.ensure_topics(
            model_topic(settings), settings.results_topic, settings.deadletter_topic
        )
        for i in range(total):
            await publish_request(pubsub, settings, f"r{i}", image(seed=i))
        async with pubsub.subscribe(settings.results_topic, group="observer") as results:
            first = Worker(settings, pubsub, TinyClassifier(), worker_id="first")
            async with first:
                collected = await take_results(results, 1)
                await first.drain()
            assert 1 <= first.outcomes["completed"] < total
            async with Worker(settings, pubsub, TinyClassifier(), worker_id="second"):
                collected += await take_results(results, total - 1)
                assert await nothing_more(results, wait=0.3)
    assert sorted(r.request_id for r in collected) == sorted(f"r{i}" for i in range(total))
    assert {r.worker_id for r in collected} == {"first", "second"}


async def test_worker_stats_before_start_say_how_to_start_it() -> None:
    """Reading stats of a worker that never started is a clear error."""
    async with open_broker("memory://") as pubsub:
        with pytest.raises(RuntimeError, match="async with"):
            _ = Worker(worker_settings("memory://"), pubsub, TinyClassifier()).stats


def test_decoded_request_carries_the_pixels_and_shape() -> None:
    """decode_request rebuilds the uint8 C×H×W image from payload and `shape`."""
    pixels = image(seed=5)
    message = messaging.Message(
        "t",
        pixels.numpy().tobytes(),
        "k",
        {protocol.SHAPE_ATTR: "1,28,28", protocol.REQUEST_ID_ATTR: "id"},
    )
    request_id, decoded = worker_module.decode_request(message)
    assert request_id == "id"
    assert decoded.dtype == np.uint8 and decoded.shape == (1, 28, 28)
    assert torch.equal(torch.from_numpy(decoded.copy()), pixels)


def test_auto_precision_is_bf16_exactly_where_the_cpu_has_native_bf16(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`auto` follows the hardware; explicit choices are kept as they are."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(inference, "native_bf16", lambda native=native: native)
        assert inference.resolve_precision("auto") == expected
        assert inference.resolve_precision("fp32") == "fp32"
        assert inference.resolve_precision("bf16") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(inference, "native_bf16", lambda: True)
    assert inference.resolve_precision("auto") == "fp32"


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_worker_loads_its_model_in_the_configured_precision(
    tmp_path: Path, precision: str
) -> None:
    """FMNIST_INFERENCE_PRECISION reaches the loaded classifier."""
    from ml import ImageClassifier

    path = tmp_path / "model.safetensors"
    ImageClassifier(widths=(4, 8), convs_per_stage=(1, 1)).save(path)
    settings = Settings(model_path=path, inference_precision=precision)
    classifier = inference.load_classifier(settings)
    assert isinstance(classifier, ImageClassifier)
    assert classifier.precision == precision
