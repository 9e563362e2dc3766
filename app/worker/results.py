"""What a worker publishes for each request: results, failures, dead letters and retries, each counted in `outcomes`."""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import NamedTuple

import orjson

from app import protocol
from app.logs import kv
from app.protocol import ErrorInfo, ResultMessage, requests_topic_for
from app.settings import Settings
from app.worker.decoding import Request, request_id_of
from messaging import Message, Outgoing, PubSub
from ml.runner import ModelError, Prediction

logger = logging.getLogger(__name__)

WORKER_ID_ATTR = "worker_id"


class Ready(NamedTuple):
    """A request's result message, computed and waiting to be published with the others."""

    message: Message
    outgoing: Outgoing  # the result message, keyed and with the attributes gateways route it by
    outcome: str  # what it counts as once published


class ResultPublisher:
    """Publishes the outcomes of one worker's requests on its `pubsub`, counting each in `outcomes`.

    `model_name` and `model_version` (set once the worker knows its model) go into every result.
    """

    def __init__(
        self, settings: Settings, pubsub: PubSub, worker_id: str, outcomes: Counter[str]
    ) -> None:
        self.settings = settings
        self.pubsub = pubsub
        self.worker_id = worker_id
        self.outcomes = outcomes
        self.model_name = ""
        self.model_version: str | None = None

    async def publish_ready(self, ready: list[Ready]) -> list[tuple[Message, BaseException]]:
        """Publish the outcomes computed so far together; ack each one accepted, count it; the
        requests whose outcome was not accepted, with the error, to be given back."""
        errors = await self.pubsub.publish_many(
            self.settings.results_topic, [item.outgoing for item in ready]
        )
        failed: list[tuple[Message, BaseException]] = []
        for item, error in zip(ready, errors, strict=True):
            if error is None:
                self.outcomes[item.outcome] += 1
                await item.message.ack()
            else:  # the request goes back for a later delivery
                self.outcomes["nacked"] += 1
                failed.append((item.message, error))
        return failed

    def completed(self, message: Message, request: Request, prediction: Prediction) -> Outgoing:
        """A computed request's result message."""
        now = time.time()
        # queue_ms counts from the gateway's acceptance when known (broker transit + model queue),
        # never less than the time spent in this worker's queue.
        queue_ms = prediction.queue_ms
        if request.submitted_at is not None:
            since_submit_ms = (now - request.submitted_at) * 1000.0 - prediction.inference_ms
            queue_ms = max(queue_ms, since_submit_ms)
        # The fields of a `ResultMessage`, encoded by orjson rather than by building and dumping
        # the model, on the hot path (tests parse it back as a ResultMessage).
        result = {
            "request_id": request.request_id,
            "status": "completed",
            "label": prediction.label,
            "class_name": prediction.class_name,
            "probabilities": prediction.probabilities,
            "model": self.model_name,
            "model_version": prediction.model_version,
            "batch_id": prediction.batch_id,
            "batch_size": prediction.batch_size,
            "queue_ms": round(queue_ms, 3),
            "inference_ms": round(prediction.inference_ms, 3),
            "worker_id": self.worker_id,
            "completed_at": now,
            "owner": message.attributes.get(protocol.OWNER_ATTR, ""),
            "metadata": request.metadata,
            "error": None,
        }
        attributes = protocol.result_attributes(message.attributes, now, request.request_id)
        return Outgoing(orjson.dumps(result), None, attributes)

    def failure(
        self, message: Message, request_id: str, metadata: dict[str, str], code: str, text: str
    ) -> Outgoing:
        """A failed request's result message, logged."""
        completed_at = time.time()
        result = ResultMessage(
            request_id=request_id,
            status="failed",
            model=self.model_name,
            model_version=self.model_version,
            worker_id=self.worker_id,
            completed_at=completed_at,
            owner=message.attributes.get(protocol.OWNER_ATTR, ""),
            metadata=metadata,
            error=ErrorInfo(code=code, message=text),
        )
        logger.info(kv("request_failed", request_id=request_id, code=code, error=text))
        attributes = protocol.result_attributes(message.attributes, completed_at, request_id)
        return Outgoing(result.to_bytes(), None, attributes)

    async def publish_failure(
        self, message: Message, request_id: str, metadata: dict[str, str], code: str, text: str
    ) -> None:
        """Tell the request's client it failed."""
        failure = self.failure(message, request_id, metadata, code, text)
        await self._send(self.settings.results_topic, failure)

    async def refuse(self, message: Message, exc: BaseException) -> None:
        """A request that cannot be decoded: dead-letter it, and tell its client if it has an id."""
        await self.dead_letter(message, "undecodable_request", str(exc))
        if request_id := request_id_of(message):
            await self.publish_failure(message, request_id, {}, "invalid_request", str(exc))

    async def dead_letter(self, message: Message, code: str, text: str) -> None:
        """The request, with the error that stopped it, on the dead-letter topic."""
        attributes = {
            **message.attributes,
            protocol.ERROR_CODE_ATTR: code,
            protocol.ERROR_MESSAGE_ATTR: text[:1000],
            WORKER_ID_ATTR: self.worker_id,
        }
        await self._send(
            self.settings.deadletter_topic, Outgoing(message.data, message.key, attributes)
        )
        self.outcomes["deadlettered"] += 1
        logger.warning(
            kv("dead_lettered", request_id=request_id_of(message), code=code, error=text)
        )

    async def retry_or_dead_letter(
        self, message: Message, request_id: str, metadata: dict[str, str], error: ModelError
    ) -> None:
        """A model error: the request again with its attempt raised by one, or, at
        `FMNIST_MAX_ATTEMPTS`, dead-lettered and its client told."""
        try:
            attempt = int(message.attributes.get(protocol.ATTEMPT_ATTR, "1"))
        except ValueError:
            attempt = 1
        max_attempts = self.settings.max_attempts
        if attempt >= max_attempts:
            text = f"{error} (failed {attempt} of FMNIST_MAX_ATTEMPTS={max_attempts} attempts)"
            await self.dead_letter(message, ModelError.code, text)
            await self.publish_failure(message, request_id, metadata, ModelError.code, text)
            return
        # Re-queue rather than nack: the attempt count travels with the message, so the limit
        # holds across workers and restarts (Kafka keeps no delivery count).
        attributes = {**message.attributes, protocol.ATTEMPT_ATTR: str(attempt + 1)}
        # Back to the topic it came from: a pinned request stays with its version.
        topic = requests_topic_for(
            self.settings.requests_topic,
            self.model_name,
            message.attributes.get(protocol.MODEL_VERSION_ATTR),
        )
        await self._send(topic, Outgoing(message.data, message.key, attributes))
        self.outcomes["requeued"] += 1
        logger.warning(
            kv("model_error_requeued", request_id=request_id, attempt=attempt, error=error)
        )

    async def _send(self, topic: str, outgoing: Outgoing) -> None:
        await self.pubsub.publish(
            topic, outgoing.data, key=outgoing.key, attributes=outgoing.attributes
        )
