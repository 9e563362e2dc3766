"""The worker: consumes image requests from the broker, batches them through a ModelRunner, publishes results.

One request message in, one `ResultMessage` out, then the ack (at-least-once: a worker that dies
before acking leaves the request to another worker of the group):

    fmnist.requests.<model> ──subscribe (group `workers.<model>`)──▶ decode ──▶ ModelRunner.submit ──▶ publish result ──▶ ack
                                                       │                                      (fmnist.results)
                                                       └─ undecodable / failed `max_attempts` times ──▶ fmnist.deadletter ──▶ ack

- An expired deadline answers a `failed` result with code `deadline_exceeded` (no compute).
- A model error re-queues the request with its `attempt` attribute raised by one, so another try
  (possibly on another worker) happens; at `max_attempts` it goes to the dead-letter topic and its
  client gets a `failed` result with code `model_error`.
- A full runner queue is backpressure: the handler waits for room; nothing is nacked in a loop.
- A publish that fails (broker away) nacks the request so it is delivered again later.

One `Worker` serves one model: it reads the model's requests topic (in the model's group) and the
topic of requests pinned to its own version (in that version's group), and announces the model on
the control topic (`app.protocol.ModelAnnouncement`) at start, every `FMNIST_HEARTBEAT_INTERVAL_S`,
and as `leaving` when it drains. `fmnist worker --model a=... --model b=...` runs one per model.

Decoding a request message lives in `app.worker.decoding`; what is published for each request (results,
failures, dead letters, retries) in `app.worker.results`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections import Counter
from collections.abc import Awaitable
from types import TracebackType
from typing import TYPE_CHECKING

import numpy as np
import torch

from app import protocol
from app.logs import kv
from app.protocol import ModelAnnouncement, requests_topic_for, worker_group_for
from app.settings import Settings
from app.worker.announcing import announce, heartbeat
from app.worker.decoding import (
    Request,
    UndecodableRequest,
    decode_request,
    parse_request,
    request_id_of,
)
from app.worker.inference import announcement_of, load_served_model, start_runner
from app.worker.results import WORKER_ID_ATTR, Ready, ResultPublisher
from messaging import Message, MessagingError, PubSub, Subscription
from ml.runner import (
    DeadlineExceeded,
    InvalidInput,
    ModelError,
    ModelRunner,
    Overloaded,
    Prediction,
    RunnerStats,
)

if TYPE_CHECKING:
    from ml.runner import BatchPredictor

__all__ = ["WORKER_ID_ATTR", "UndecodableRequest", "Worker", "decode_request", "default_worker_id"]

logger = logging.getLogger(__name__)

# How long a handler waits before trying again when the runner's queue is full, and after a failed
# publish before it gives the request back (so a broker outage does not become a nack storm).
_OVERLOAD_BACKOFF_S = 0.005
_PUBLISH_FAILURE_BACKOFF_S = 1.0


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Worker:
    """Serves one model: consumes its requests topics in its groups until drained.

    ```python
    async with messaging.connect(url) as pubsub, Worker(settings, pubsub) as worker:
        await stop_requested.wait()
        await worker.drain()   # also done when leaving the block
    ```

    `classifier=None` loads `source` (default `settings.model_path`) with `ml.serving.load_model`,
    in a thread so the event loop stays free. `name` overrides the model's own name (a checkpoint's
    file stem, a spec's `name`).
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
        self.settings = settings
        self.pubsub = pubsub
        self.worker_id = worker_id or settings.worker_id or default_worker_id()
        self._classifier = classifier
        self._name = name
        self._source = source if source is not None else str(settings.model_path)
        self.announcement: ModelAnnouncement | None = None
        self._subscriptions: list[Subscription] = []
        self._consumers: list[asyncio.Task[None]] = []
        self._heartbeat: asyncio.Task[None] | None = None
        self._runner: ModelRunner | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._drained = False
        self.outcomes: Counter[str] = Counter()
        """Requests handled, by outcome: completed, deadline_exceeded, requeued, deadlettered, …"""
        self._results = ResultPublisher(settings, pubsub, self.worker_id, self.outcomes)

    # --- lifecycle ------------------------------------------------------------------------------

    async def __aenter__(self) -> Worker:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.drain()

    async def start(self) -> None:
        """Load the model, create the topics, join the group and start consuming."""
        owns_model = self._classifier is None
        if self._classifier is None:
            self._classifier = await asyncio.to_thread(
                load_served_model, self.settings, self._source, self._name
            )
        announcement = announcement_of(
            self._classifier, self.settings, self.worker_id, name=self._name
        )
        self.announcement = announcement
        self._results.model_name = announcement.name
        self._results.model_version = announcement.version
        runner = await self._start_runner(self._classifier, owns_model)
        try:
            routes = await self._subscribe(announcement.name, announcement.version)
            # Announced once consuming: a gateway that learns the model can send it requests.
            await self._announce("live")
        except BaseException:
            for subscription in self._subscriptions:
                await subscription.aclose()
            await runner.close()
            raise
        loop = asyncio.get_running_loop()
        name = announcement.name
        self._consumers = [
            loop.create_task(self._consume(sub), name=f"fmnist-worker-{self.worker_id}-{name}")
            for sub in self._subscriptions
        ]
        self._heartbeat = loop.create_task(self._beat(), name=f"fmnist-heartbeat-{name}")
        self._log_ready(announcement, runner, *routes[0])

    async def _start_runner(self, classifier: BatchPredictor, owns_model: bool) -> ModelRunner:
        runner = await start_runner(self.settings, classifier, owns_model=owns_model)
        self._runner = runner
        return runner

    async def _subscribe(self, name: str, version: str) -> list[tuple[str, str]]:
        """Create the topics and join the model's group and the version's; the (topic, group) pairs."""
        settings = self.settings
        model_topic = requests_topic_for(settings.requests_topic, name)
        version_topic = requests_topic_for(settings.requests_topic, name, version)
        routes = [
            (model_topic, worker_group_for(settings.worker_group, name)),
            (version_topic, worker_group_for(settings.worker_group, name, version)),
        ]
        await self.pubsub.ensure_topics(
            model_topic,
            version_topic,
            settings.results_topic,
            settings.deadletter_topic,
            settings.control_topic,
        )
        for topic, group in routes:
            subscription = self.pubsub.subscribe(
                topic, group=group, start="earliest", max_in_flight=self.max_unacked
            )
            self._subscriptions.append(subscription)
            await subscription.start()
        return routes

    def _log_ready(
        self, announcement: ModelAnnouncement, runner: ModelRunner, topic: str, group: str
    ) -> None:
        logger.info(
            kv(
                "worker_ready",
                worker_id=self.worker_id,
                broker=self.pubsub.url,
                model=announcement.name,
                model_version=announcement.version,
                tag=announcement.tag,
                input_shape=protocol.encode_shape(announcement.input_shape),
                device=announcement.device,
                topic=topic,
                group=group,
                max_batch_size=runner.max_batch_size,
                preferred_batch_size=runner.preferred_batch_size,
                max_wait_ms=runner.max_wait_ms,
                max_in_flight=self.max_unacked,
                concurrency=runner.concurrency,
                torch_threads=torch.get_num_threads(),
                precision=getattr(runner.classifier, "precision", "n/a"),
            )
        )

    @property
    def model_name(self) -> str:
        return self.announcement.name if self.announcement is not None else ""

    @property
    def model_version(self) -> str | None:
        return self.announcement.version if self.announcement is not None else None

    @property
    def max_unacked(self) -> int:
        """Requests delivered and not yet acked: enough for every pass the runner may hand to the
        model (2 per `concurrency`), one batch filling and one being published, but never more than
        the runner may queue."""
        concurrency = self._runner.concurrency if self._runner is not None else 1
        batches = 2 * concurrency + 2
        return max(1, min(batches * self.settings.max_batch_size, self.settings.max_queued_images))

    async def drain(self) -> None:
        """Stop taking requests, finish the ones in flight (compute, publish, ack), then stop. Idempotent."""
        if self._drained:
            return
        self._drained = True
        started = time.monotonic()
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
            await self._announce_leaving()
        for consumer in self._consumers:
            consumer.cancel()
        await asyncio.gather(*self._consumers, return_exceptions=True)
        in_flight = len(self._handlers)
        if self._handlers:
            await asyncio.gather(*self._handlers, return_exceptions=True)
        # Close the subscriptions only now: acks of the drained requests must reach the broker first.
        for subscription in self._subscriptions:
            await subscription.aclose()
        if self._runner is not None:
            await self._runner.close()
        logger.info(
            kv(
                "worker_drained",
                worker_id=self.worker_id,
                finished_in_flight=in_flight,
                drain_ms=f"{(time.monotonic() - started) * 1000:.0f}",
                **{f"total_{k}": v for k, v in sorted(self.outcomes.items())},
            )
        )

    async def wait(self) -> None:
        """Return when consuming stops (drained, or a subscription ended); re-raise its error."""
        if not self._consumers:
            raise RuntimeError("Worker not started; use `async with Worker(...)`")
        try:
            done, _ = await asyncio.shield(
                asyncio.wait(self._consumers, return_when=asyncio.FIRST_COMPLETED)
            )
            for task in done:
                task.result()
        except asyncio.CancelledError:
            if not self._drained:
                raise

    # --- announcing -----------------------------------------------------------------------------

    async def _announce(self, status: str) -> None:
        assert self.announcement is not None
        await announce(self.pubsub, self.settings, self.announcement, status)

    async def _beat(self) -> None:
        assert self.announcement is not None
        await heartbeat(self.pubsub, self.settings, self.announcement, self.worker_id)

    async def _announce_leaving(self) -> None:
        try:
            await self._announce("leaving")
        except MessagingError as exc:  # the gateways notice from the missing heartbeats instead
            logger.warning(kv("leaving_announcement_failed", worker_id=self.worker_id, error=exc))

    @property
    def stats(self) -> RunnerStats:
        """The runner's batching stats (batch sizes, queue wait, inference time, queue depth)."""
        if self._runner is None:
            raise RuntimeError("Worker not started; use `async with Worker(...)`")
        return self._runner.stats()

    # --- consuming ------------------------------------------------------------------------------

    async def _consume(self, subscription: Subscription) -> None:
        loop = asyncio.get_running_loop()
        chunk_size = self._runner.max_batch_size if self._runner is not None else 1
        while True:
            # One task per chunk of requests that arrived together: all of them are submitted to
            # the runner at once (it batches them), then answered in order. The subscription's
            # max_in_flight bounds how many requests are held at once.
            messages = await subscription.receive_batch(chunk_size)
            if not messages:
                break
            task = loop.create_task(self._handle_chunk(messages))
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)
        logger.info(kv("subscription_ended", worker_id=self.worker_id))

    async def _handle_chunk(self, messages: list[Message]) -> None:
        """Decode every request, submit the good ones to the runner together, answer each in order.

        Per request, the outcome is what it would get alone: a result or a failure published, then
        an ack; a dead letter for what cannot be decoded; a nack when the outcome
        could not be published (after one back-off for the whole chunk).
        """
        runner = self._runner
        assert runner is not None
        parsed = [(message, _parse_or_error(message)) for message in messages]
        submitted = [
            runner.submit(request.image, request.deadline)
            for _, request in parsed
            if isinstance(request, Request)
        ]
        # Plain futures, no task per request, each awaited by its request's `_finish` in order. The
        # results computed so far go out in one publish_many before waiting for the next batch, so
        # the first batch's results are published while the next batch computes. A full runner
        # answers Overloaded at once, and those requests then wait for room one by one in `_finish`.
        answers = iter(submitted)
        ready: list[Ready] = []
        failed: list[tuple[Message, BaseException]] = []
        try:
            for message, request in parsed:
                if isinstance(request, Request):
                    answer = next(answers)
                    if ready and not answer.done():
                        failed += await self._results.publish_ready(ready)
                        ready = []
                    if answer.done() and not answer.cancelled() and answer.exception() is None:
                        # Computed: its result joins `ready` here, without a coroutine per request
                        # (a failure to build it takes the guarded path below, which logs it).
                        try:
                            outgoing = self._results.completed(message, request, answer.result())
                        except Exception:
                            pass
                        else:
                            ready.append(Ready(message, outgoing, "completed"))
                            continue
                    work = self._finish(message, request, answer, ready)
                else:
                    work = self._refuse(message, request)
                if (error := await self._guarded(message, work)) is not None:
                    failed.append((message, error))
            failed += await self._results.publish_ready(ready)
            ready = []
        finally:  # cancelled midway: what was computed and not published goes back
            for item in ready:
                await item.message.nack()
        if failed:
            await self._give_back(failed)

    async def _give_back(self, failed: list[tuple[Message, BaseException]]) -> None:
        """Nack the requests whose outcome could not be published, after one back-off for them all."""
        # One line per chunk, not per request: an outage fails every request of every chunk.
        first_message, first = failed[0]
        logger.warning(
            kv(
                "publish_failed",
                count=len(failed),
                first=request_id_of(first_message),
                error=first,
                action="nack",
            )
        )
        await asyncio.sleep(_PUBLISH_FAILURE_BACKOFF_S)
        for message, _ in failed:
            await message.nack()

    async def _guarded(self, message: Message, work: Awaitable[None]) -> BaseException | None:
        """Run one request's outcome; the error when it must be given back (nack) after a back-off."""
        try:
            await work
        except asyncio.CancelledError:
            await message.nack()
            raise
        except Exception as exc:
            # A MessagingError could not publish the outcome; anything else is a bug, which must
            # not wedge the message: log it loudly. Either way the request goes back.
            if not isinstance(exc, MessagingError):
                logger.exception(
                    kv("handler_crashed", request_id=request_id_of(message), error=repr(exc))
                )
            self.outcomes["nacked"] += 1
            return exc
        return None

    async def _refuse(self, message: Message, exc: BaseException) -> None:
        """A request that cannot be decoded: dead-letter it, tell its client if it has an id, ack."""
        await self._results.refuse(message, exc)
        await message.ack()

    async def _finish(
        self,
        message: Message,
        request: Request,
        answer: asyncio.Future[Prediction],
        ready: list[Ready],
    ) -> None:
        """One request's outcome: a result or an expiry joins `ready`, to be published with the
        others and then acked; any other failure is published (dead letter, retry) and acked here."""
        results = self._results
        request_id, metadata = request.request_id, request.metadata
        try:
            if (
                answer.done()
                and not answer.cancelled()
                and isinstance(answer.exception(), Overloaded)
            ):
                prediction = await self._submit(request.image, request.deadline)
            else:
                prediction = await answer
        except DeadlineExceeded as exc:
            code = DeadlineExceeded.code
            ready.append(
                Ready(message, results.failure(message, request_id, metadata, code, str(exc)), code)
            )
            return
        except InvalidInput as exc:
            await results.dead_letter(message, InvalidInput.code, str(exc))
            await results.publish_failure(
                message, request_id, metadata, InvalidInput.code, str(exc)
            )
        except ModelError as exc:
            await results.retry_or_dead_letter(message, request_id, metadata, exc)
        else:
            ready.append(
                Ready(message, results.completed(message, request, prediction), "completed")
            )
            return
        await message.ack()

    async def _submit(self, image: np.ndarray, deadline: float | None) -> Prediction:
        runner = self._runner
        assert runner is not None
        while True:
            try:
                return await runner.submit(image, deadline)
            except Overloaded:
                # Backpressure: the subscription stops delivering while handlers wait here.
                await asyncio.sleep(_OVERLOAD_BACKOFF_S)


def _parse_or_error(message: Message) -> Request | BaseException:
    """The decoded request, or the error that says why it cannot be decoded."""
    try:
        return parse_request(message)
    # UndecodableRequest, bad metadata, or metadata nested past the parser's recursion limit.
    except (ValueError, RecursionError) as exc:
        return exc
