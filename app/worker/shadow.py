"""The shadow worker: a candidate version reads a copy of a model's live traffic and answers nobody.

    fmnist.requests.<model>            ──subscribe (group `workers.<model>.shadow-<version>`, from now)──┐
    fmnist.requests.<model>.v-<other>  ──  the same group, one per version weighted on the rollout topic ─┤
                                                                                                         ▼
                              decode ──▶ ModelRunner ──▶ publish ──▶ fmnist.results.shadow ──▶ ack

- Its groups are its own, so the live workers' groups and positions are untouched: the live path pays
  only for the broker serving one more reader.
- It starts at the current end of each topic (a unix-time start, whatever the group committed): a
  shadow compares the traffic from now on and never chews through an old backlog.
- It never publishes to the live results, requests or dead-letter topics: an undecodable request, a
  model error or an expired deadline becomes a `failed` shadow result, and the request is acked.
- Under a canary split (`TrafficWeights` on the rollout topic, read from its start) live traffic also
  flows on the version topics of the weighted versions: it reads each of those (but its own) too.
- It announces itself with `role="shadow"`: gateways list it and never route a request to it.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import Counter
from types import TracebackType
from typing import TYPE_CHECKING

import numpy as np
import orjson

from app import protocol
from app.logs import kv
from app.protocol import (
    ModelAnnouncement,
    ResultMessage,
    TrafficWeights,
    requests_topic_for,
    shadow_group_for,
)
from app.settings import Settings
from app.worker.announcing import announce, heartbeat
from app.worker.inference import announcement_of, load_served_model, start_runner
from app.worker.results import ResultPublisher
from messaging import Message, MessagingError, Outgoing, PubSub, Subscription
from ml.runner import ModelRunner, Overloaded, Prediction, RunnerError

if TYPE_CHECKING:
    from ml.runner import BatchPredictor

logger = logging.getLogger(__name__)

_OVERLOAD_BACKOFF_S = 0.005
_PUBLISH_FAILURE_BACKOFF_S = 1.0
_ROLLOUT_CHUNK = 64


def live_topics(
    settings: Settings, model: str, own_version: str, weights: TrafficWeights | None
) -> list[str]:
    """The topics carrying `model`'s live traffic that a shadow of `own_version` reads: the model's
    topic, and the topic of each version weighted above zero but its own."""
    topics = [requests_topic_for(settings.requests_topic, model)]
    if weights is not None:
        topics += [
            requests_topic_for(settings.requests_topic, model, version)
            for version, percent in sorted(weights.weights.items())
            if percent > 0 and version != own_version
        ]
    return topics


class ShadowWorker:
    """Runs one candidate version of a model on a copy of its live traffic, until drained.

    ```python
    async with ShadowWorker(settings, pubsub, name="fmnist", source="candidate.safetensors") as shadow:
        await stop_requested.wait()
    ```

    The same lifecycle as `app.worker.consumer.Worker` (`start`, `wait`, `drain`), so `fmnist worker`
    and `fmnist serve` run either.
    """

    def __init__(
        self,
        settings: Settings,
        pubsub: PubSub,
        classifier: BatchPredictor | None = None,
        *,
        worker_id: str | None = None,
        name: str | None = None,
        source: str | None = None,
    ) -> None:
        from app.worker.consumer import default_worker_id

        self.settings = settings
        self.pubsub = pubsub
        # Its own default id: beside a serving worker in one process (`fmnist serve --shadow`).
        self.worker_id = worker_id or settings.worker_id or f"{default_worker_id()}-shadow"
        self._classifier = classifier
        self._name = name
        self._source = source if source is not None else str(settings.model_path)
        self.announcement: ModelAnnouncement | None = None
        self._runner: ModelRunner | None = None
        self._reads: dict[
            str, Subscription
        ] = {}  # live topic -> its subscription in the shadow group
        self._consumers: dict[str, asyncio.Task[None]] = {}
        self._rollout: Subscription | None = None
        self._background: list[asyncio.Task[None]] = []
        self._handlers: set[asyncio.Task[None]] = set()
        self._weights: TrafficWeights | None = None
        self._drained = False
        self._ended = asyncio.Event()  # reading stopped: drained, or a task ended by itself
        self._failure: BaseException | None = None
        self.outcomes: Counter[str] = Counter()
        # Builds failed results only: shadow results are published by this class, to their own topic.
        self._failures = ResultPublisher(settings, pubsub, self.worker_id, self.outcomes)
        """Requests handled, by outcome: completed, failed, nacked."""

    async def __aenter__(self) -> ShadowWorker:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.drain()

    @property
    def model_name(self) -> str:
        return self.announcement.name if self.announcement is not None else ""

    @property
    def model_version(self) -> str:
        return self.announcement.version if self.announcement is not None else ""

    @property
    def group(self) -> str:
        return shadow_group_for(self.settings.worker_group, self.model_name, self.model_version)

    @property
    def topics(self) -> list[str]:
        """The live topics read now."""
        return sorted(self._reads)

    @property
    def max_unacked(self) -> int:
        """Requests held at once per topic: a few batches, never more than the runner may queue."""
        return max(1, min(4 * self.settings.max_batch_size, self.settings.max_queued_images))

    async def start(self) -> None:
        """Load the model, read the rollout topic's split, join the live topics from now, announce."""
        settings = self.settings
        owns_model = self._classifier is None
        if self._classifier is None:
            self._classifier = await asyncio.to_thread(
                load_served_model, settings, self._source, self._name
            )
        announcement = announcement_of(self._classifier, settings, self.worker_id, name=self._name)
        self.announcement = announcement.model_copy(update={"role": "shadow"})
        runner = await start_runner(settings, self._classifier, owns_model=owns_model)
        self._runner = runner
        try:
            model_topic = requests_topic_for(settings.requests_topic, self.model_name)
            await self.pubsub.ensure_topics(
                model_topic,
                settings.shadow_results_topic,
                settings.rollout_topic,
                settings.control_topic,
            )
            self._rollout = self.pubsub.subscribe(
                settings.rollout_topic,
                group=f"{self.group}.rollout-{secrets.token_hex(4)}",
                start="earliest",
            )
            await self._rollout.start()
            await self._catch_up_rollout()
            await self._follow(
                live_topics(settings, self.model_name, self.model_version, self._weights)
            )
            await self._announce("live")
        except BaseException:
            await self._close_subscriptions()
            await runner.close()
            raise
        loop = asyncio.get_running_loop()
        self._background = [
            self._watch(loop.create_task(self._beat(), name=f"shadow-heartbeat-{self.model_name}")),
            self._watch(
                loop.create_task(self._watch_rollout(), name=f"shadow-rollout-{self.model_name}")
            ),
        ]
        logger.info(
            kv(
                "shadow_worker_ready",
                worker_id=self.worker_id,
                broker=self.pubsub.url,
                model=self.model_name,
                model_version=self.model_version,
                group=self.group,
                topics=",".join(self.topics),
                results_topic=settings.shadow_results_topic,
            )
        )

    async def drain(self) -> None:
        """Stop reading, finish the requests in hand (compute, publish, ack), then stop. Idempotent."""
        if self._drained:
            return
        self._drained = True
        self._ended.set()
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self.announcement is not None and self._runner is not None:
            try:
                await self._announce("leaving")
            except MessagingError as exc:  # gateways notice from the missing heartbeats instead
                logger.warning(
                    kv("leaving_announcement_failed", worker_id=self.worker_id, error=exc)
                )
        for consumer in self._consumers.values():
            consumer.cancel()
        await asyncio.gather(*self._consumers.values(), return_exceptions=True)
        if self._handlers:
            await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._close_subscriptions()
        if self._runner is not None:
            await self._runner.close()
        logger.info(
            kv(
                "shadow_worker_drained",
                worker_id=self.worker_id,
                **{f"total_{k}": v for k, v in sorted(self.outcomes.items())},
            )
        )

    async def wait(self) -> None:
        """Return when reading stops (drained, or a subscription ended); re-raise its error."""
        if not self._consumers:
            raise RuntimeError("ShadowWorker not started; use `async with ShadowWorker(...)`")
        await self._ended.wait()
        if self._failure is not None and not self._drained:
            raise self._failure

    def _watch(self, task: asyncio.Task[None]) -> asyncio.Task[None]:
        """`task` ending by itself (not cancelled) ends `wait()`, with its error if it raised."""

        def ended(task: asyncio.Task[None]) -> None:
            if task.cancelled():
                return
            self._failure = task.exception() or MessagingError(f"{task.get_name()} ended")
            self._ended.set()

        task.add_done_callback(ended)
        return task

    async def _close_subscriptions(self) -> None:
        for subscription in [*self._reads.values(), *([self._rollout] if self._rollout else [])]:
            await subscription.aclose()

    # --- which topics ---------------------------------------------------------------------------

    async def _catch_up_rollout(self) -> None:
        """Apply the rollout topic's history: the split in force when this shadow starts."""
        rollout = self._rollout
        assert rollout is not None
        quiet_s = 0.5 if self.pubsub.durable else 0.0
        while True:
            try:
                async with asyncio.timeout(quiet_s):
                    messages = await rollout.receive_batch(_ROLLOUT_CHUNK)
            except TimeoutError:
                return
            if not messages:
                return
            await self._take_rollout(messages)

    async def _watch_rollout(self) -> None:
        rollout = self._rollout
        assert rollout is not None
        while messages := await rollout.receive_batch(_ROLLOUT_CHUNK):
            await self._take_rollout(messages)
            await self._follow(
                live_topics(self.settings, self.model_name, self.model_version, self._weights)
            )

    async def _take_rollout(self, messages: list[Message]) -> None:
        """Keep the newest `TrafficWeights` of this model (by `set_at`); events are not ours."""
        for message in messages:
            if (
                message.key == self.model_name
                and message.attributes.get(protocol.KIND_ATTR) == protocol.WEIGHTS_KIND
            ):
                try:
                    weights = TrafficWeights.from_bytes(message.data)
                except ValueError as exc:
                    logger.warning(kv("malformed_weights", key=message.key, error=exc))
                else:
                    if self._weights is None or weights.set_at >= self._weights.set_at:
                        self._weights = weights
            await message.ack()

    async def _follow(self, topics: list[str]) -> None:
        """Read exactly `topics`: join the new ones from now, leave those no longer weighted."""
        loop = asyncio.get_running_loop()
        for topic in sorted(set(self._reads) - set(topics)):
            subscription = self._reads.pop(topic)
            consumer = self._consumers.pop(topic, None)
            if consumer is not None:
                consumer.cancel()
                await asyncio.gather(consumer, return_exceptions=True)
            await subscription.aclose()
            logger.info(kv("shadow_topic_left", model=self.model_name, topic=topic))
        for topic in topics:
            if topic in self._reads:
                continue
            await self.pubsub.ensure_topics(topic)
            subscription = self.pubsub.subscribe(
                topic, group=self.group, start=time.time(), max_in_flight=self.max_unacked
            )
            self._reads[topic] = subscription
            await subscription.start()
            # From here on a rebalance (another shadow worker joining the group, a rejoin after a
            # broken link) keeps the group's committed offsets instead of going back to this start.
            subscription.start_position = "latest"
            logger.info(kv("shadow_topic_joined", model=self.model_name, topic=topic))
            self._consumers[topic] = self._watch(
                loop.create_task(self._consume(subscription), name=f"shadow-reader-{topic}")
            )

    # --- announcing -----------------------------------------------------------------------------

    async def _announce(self, status: str) -> None:
        assert self.announcement is not None
        await announce(self.pubsub, self.settings, self.announcement, status)

    async def _beat(self) -> None:
        assert self.announcement is not None
        await heartbeat(self.pubsub, self.settings, self.announcement, self.worker_id)

    # --- answering ------------------------------------------------------------------------------

    async def _consume(self, subscription: Subscription) -> None:
        loop = asyncio.get_running_loop()
        chunk = self.settings.max_batch_size
        while messages := await subscription.receive_batch(chunk):
            task = loop.create_task(self._answer(messages))
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)

    async def _answer(self, messages: list[Message]) -> None:
        """Compute a chunk's shadow results together, publish them in one go, ack each."""
        outcomes = await asyncio.gather(*(self._outcome(message) for message in messages))
        ready = [(m, out) for m, out in zip(messages, outcomes, strict=True) if out is not None]
        for message, outcome in zip(messages, outcomes, strict=True):
            if outcome is None:  # no request id: nothing to compare it with
                await message.ack()
        errors = await self.pubsub.publish_many(
            self.settings.shadow_results_topic, [outgoing for _, (outgoing, _) in ready]
        )
        given_back = []
        for (message, (_, status)), error in zip(ready, errors, strict=True):
            if error is None:
                self.outcomes[status] += 1
                await message.ack()
            else:
                given_back.append(message)
        if given_back:
            # Given back to this shadow group only: the live groups never see it again.
            logger.warning(kv("shadow_publish_failed", count=len(given_back), action="nack"))
            await asyncio.sleep(_PUBLISH_FAILURE_BACKOFF_S)
            for message in given_back:
                self.outcomes["nacked"] += 1
                await message.nack()

    async def _outcome(self, message: Message) -> tuple[Outgoing, str] | None:
        """The shadow result of one request (a failed one when it cannot be answered); None when
        the message has no request id."""
        from app.worker.consumer import decode_request

        attributes = message.attributes
        request_id = protocol.request_id_from(attributes, message.key)
        if not request_id:
            return None
        try:
            metadata = protocol.decode_metadata(attributes.get(protocol.METADATA_ATTR))
        except (ValueError, RecursionError):
            metadata = {}
        try:
            _, image = decode_request(message)
            deadline = _seconds(attributes.get(protocol.DEADLINE_ATTR))
            prediction = await self._submit(image, deadline)
        except RunnerError as exc:  # before ValueError: InvalidInput is both
            return self._failed(message, request_id, metadata, exc.code, str(exc)), "failed"
        except ValueError as exc:
            failed = self._failed(message, request_id, metadata, "invalid_request", str(exc))
            return failed, "failed"
        return self._completed(message, request_id, metadata, prediction), "completed"

    async def _submit(self, image: np.ndarray, deadline: float | None) -> Prediction:
        runner = self._runner
        assert runner is not None
        while True:
            try:
                return await runner.submit(image, deadline)
            except Overloaded:
                await asyncio.sleep(_OVERLOAD_BACKOFF_S)

    def _completed(
        self, message: Message, request_id: str, metadata: dict[str, str], prediction: Prediction
    ) -> Outgoing:
        now = time.time()
        result = ResultMessage(
            request_id=request_id,
            status="completed",
            label=prediction.label,
            class_name=prediction.class_name,
            probabilities=prediction.probabilities,
            model=self.model_name,
            model_version=self.model_version,
            batch_id=prediction.batch_id,
            batch_size=prediction.batch_size,
            queue_ms=round(prediction.queue_ms, 3),
            inference_ms=round(prediction.inference_ms, 3),
            worker_id=self.worker_id,
            completed_at=now,
            owner=message.attributes.get(protocol.OWNER_ATTR, ""),
            metadata=metadata,
        )
        return Outgoing(
            orjson.dumps(result.model_dump()),
            None,
            protocol.result_attributes(message.attributes, now, request_id),
        )

    def _failed(
        self, message: Message, request_id: str, metadata: dict[str, str], code: str, text: str
    ) -> Outgoing:
        """A failed shadow result, built as a live worker builds its failures."""
        self._failures.model_name = self.model_name
        self._failures.model_version = self.model_version
        return self._failures.failure(message, request_id, metadata, code, text)


def _seconds(text: str | None) -> float | None:
    """A unix-seconds attribute; None when absent. ValueError when malformed."""
    if not text:
        return None
    return float(text)
