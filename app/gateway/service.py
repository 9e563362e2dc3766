"""The gateway runtime behind the routes: broker link (connect, reconnect, results consumer), limits, publishing.

One `Gateway` per app, created by `create_app` and reached by routes through `app.gateway.deps`. It survives a
broker that is down at start or goes away later: routes answer 503 + Retry-After meanwhile, a background
loop reconnects, and the gateway serves again without a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from app.broker import connect_broker
from app.gateway.auth import ApiKeys
from app.gateway.errors import ApiError
from app.gateway.images import ImagePolicy
from app.gateway.metrics import GatewayMetrics
from app.gateway.registry import LIVENESS_INTERVALS, ModelRegistry, ModelVersion
from app.gateway.results import (
    ACCEPTED_KIND,
    EXPIRY_GRACE_S,
    MARKER_KIND_ATTR,
    AcceptedMarker,
    ResultStore,
    Submission,
)
from app.gateway.submission import (
    Accepted,
    FreshImage,
    IdempotencyClaim,
    claim_idempotency_keys,
    new_request_ids,
    outcome_of,
    publish_within_timeout,
    release_claims,
    request_attributes,
)
from app.logs import kv
from app.protocol import (
    MODEL_ATTR,
    MODEL_VERSION_ATTR,
    REQUEST_ID_ATTR,
    ModelAnnouncement,
    ResultMessage,
    encode_shape,
    requests_topic_for,
)
from app.settings import Settings
from messaging import BacklogFull, Message, MessagingError, PubSub, Subscription, parse_broker_url

log = logging.getLogger(__name__)

PubSubFactory = Callable[[Settings], PubSub]

RETRY_AFTER_BROKER_S = 2
RETRY_AFTER_OVERLOAD_S = 1
_PING_INTERVAL_S = 2.0
_SWEEP_INTERVAL_S = 1.0
_MAX_BACKOFF_S = 5.0
_RESULTS_CHUNK = 512  # results taken from the subscription in one go
_RESULTS_MAX_UNACKED = 4096  # results delivered to the gateway and not yet stored and acked
# The results read-back counts as caught up once a receive waits this long for nothing.
_REPLAY_QUIET_S = 0.5


_CONTROL_CHUNK = 256


@dataclass(slots=True)
class _ReadBack:
    """Where the read-back of the results topic stands (`Gateway._consume`)."""

    replaying: bool = True
    replayed: int = 0
    restored: int = 0


class Gateway:
    """Settings, result store, metrics, auth and the broker link of one gateway app."""

    def __init__(self, settings: Settings, pubsub_factory: PubSubFactory | None = None) -> None:
        self.settings = settings
        self.gateway_id = settings.gateway_id or secrets.token_hex(4)
        self.results_group = f"gateway-{self.gateway_id}"
        self.broker_url = parse_broker_url(settings.broker_url).redacted
        self.store = ResultStore(
            max_results=settings.result_store_size, ttl_s=settings.result_ttl_s
        )
        self.metrics = GatewayMetrics(in_flight=lambda: self.store.pending_count)
        self.api_keys = ApiKeys(settings.api_keys)
        self.registry = ModelRegistry(settings.default_model)
        self._factory = pubsub_factory or connect_broker
        self._pubsub: PubSub | None = None
        self._results: Subscription | None = None
        self._broker_reachable = False
        self._consuming = False
        self._models_known = (
            asyncio.Event()
        )  # set once the read-back of the control topic caught up
        self._last_broker_error = "not connected yet"
        self._first_attempt = (
            asyncio.Event()
        )  # set once the first connection attempt ended, either way
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    # --- lifecycle -------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        """Broker reachable, its link up (topics in place), the results consumer receiving and the
        models announced before this gateway started learned."""
        pubsub, results = self._pubsub, self._results
        return (
            pubsub is not None
            and self._consuming
            and self._models_known.is_set()
            and self._broker_reachable
            and pubsub.link_up
            and results is not None
            and results.healthy
        )

    @property
    def broker_status(self) -> str:
        if self.ready:
            return "ok"
        pubsub, results = self._pubsub, self._results
        if pubsub is not None and self._broker_reachable and self._consuming:
            if not pubsub.link_up:
                return (
                    f"broker {self.broker_url}: link recovering (reconnecting, re-creating topics)"
                )
            if results is not None and not results.healthy:
                return f"broker {self.broker_url}: results consumer rejoining its group"
        return self._last_broker_error

    async def start(self, wait_s: float) -> None:
        """Start the broker link in the background; wait up to `wait_s` for the first attempt to end.

        A stopped gateway can be started again (an app may run its lifespan more than once).
        """
        self._stopping = False
        self._first_attempt.clear()
        self._last_broker_error = "not connected yet"
        self._tasks = [
            asyncio.create_task(self._maintain_link(), name="fmnist-broker-link"),
            asyncio.create_task(self._sweep(), name="fmnist-result-sweeper"),
        ]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait_s):
                await self._first_attempt.wait()
                if self._consuming:
                    await self._models_known.wait()
        if not self.ready:
            log.warning(
                kv(
                    "broker_unavailable_at_start",
                    broker=self.broker_url,
                    error=self._last_broker_error,
                )
            )

    async def stop(self) -> None:
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    async def _maintain_link(self) -> None:
        backoff = 0.2
        while not self._stopping:
            pubsub = self._factory(self.settings)
            try:
                await pubsub.connect()
                await pubsub.ensure_topics(
                    self.settings.results_topic,
                    self.settings.deadletter_topic,
                    self.settings.control_topic,
                )
                control = await self._subscribe_control(pubsub)
                # The log is the store: re-read the results of the last TTL, whatever the group
                # committed, so a restarted gateway serves what it accepted before.
                replay_from = time.time() - self.settings.result_ttl_s
                subscription = pubsub.subscribe(
                    self.settings.results_topic,
                    group=self.results_group,
                    start=replay_from,
                    max_in_flight=_RESULTS_MAX_UNACKED,
                )
                await subscription.start()
            except asyncio.CancelledError:
                await _close_quietly(pubsub)
                raise
            except Exception as exc:  # any failure to connect means: retry later, never crash
                self._last_broker_error = f"broker {self.broker_url} unavailable: {exc}"
                log.warning(
                    kv("broker_connect_failed", broker=self.broker_url, error=exc, retry_s=backoff)
                )
                await _close_quietly(pubsub)
                self._first_attempt.set()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF_S)
                continue
            backoff = 0.2
            self._pubsub = pubsub
            self._results = subscription
            self._broker_reachable = True
            self.metrics.broker_up.set(1)
            log.info(kv("broker_connected", broker=self.broker_url, group=self.results_group))
            monitor = asyncio.create_task(self._monitor(pubsub), name="fmnist-broker-ping")
            quiet_s = 0.0 if pubsub.publishes_in_process else _REPLAY_QUIET_S
            learner = asyncio.create_task(
                self._learn_models(control, quiet_s), name="fmnist-models"
            )
            try:
                await self._consume(subscription)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._last_broker_error = f"results consumer stopped: {exc}"
                log.warning(kv("results_consumer_failed", broker=self.broker_url, error=exc))
            finally:
                self._consuming = False
                self._models_known.clear()
                self._pubsub = None
                self._results = None
                self.metrics.broker_up.set(0)
                for task in (monitor, learner):
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                await _close_quietly(pubsub)
            if not self._stopping:
                await asyncio.sleep(backoff)

    async def _subscribe_control(self, pubsub: PubSub) -> Subscription:
        """The control topic from a few heartbeats back, in a group of this gateway's own, so a
        (re)started gateway learns the live models at once."""
        since = time.time() - LIVENESS_INTERVALS * self.settings.heartbeat_interval_s
        control = pubsub.subscribe(
            self.settings.control_topic, group=f"gateway-{self.gateway_id}-control", start=since
        )
        try:
            await control.start()
        except BaseException:
            await control.aclose()
            raise
        return control

    async def _learn_models(self, control: Subscription, quiet_s: float) -> None:
        """Feed the registry from the workers' announcements until the subscription ends; the read-back
        has caught up (`_models_known`) once a receive waited `quiet_s` for nothing."""
        live_since = time.time()
        try:
            while True:
                try:
                    caught_up = self._models_known.is_set()
                    async with asyncio.timeout(None if caught_up else quiet_s):
                        messages = await control.receive_batch(_CONTROL_CHUNK)
                except TimeoutError:
                    self._models_known.set()
                    continue
                if not messages:
                    break
                for message in messages:
                    self._learn(message.data, live_since)
                    await message.ack()
        finally:
            await control.aclose()

    def _learn(self, data: bytes, live_since: float) -> None:
        try:
            announcement = ModelAnnouncement.from_bytes(data)
        except ValueError as exc:
            log.warning(kv("malformed_announcement", error=exc))
            return
        # Read back from before this gateway subscribed: live from when it was sent, not from now.
        received_at = (
            min(time.time(), announcement.sent_at) if announcement.sent_at < live_since else None
        )
        if self.registry.learn(announcement, received_at):
            log.info(
                kv(
                    "model_worker_" + ("left" if announcement.status == "leaving" else "joined"),
                    model=announcement.name,
                    version=announcement.version,
                    tag=announcement.tag,
                    worker_id=announcement.worker_id,
                    input_shape=encode_shape(announcement.input_shape),
                )
            )

    async def _consume(self, subscription: Subscription) -> None:
        """Store results as they come; ready (`_consuming`) once the read-back of the last TTL caught up.

        Caught up means: a receive found nothing for `_REPLAY_QUIET_S` (at once in process), or a result completed after
        the read-back began arrived (live traffic reached us), or `result_replay_timeout_s` passed.
        """
        live_since = time.time()
        replay_deadline = time.monotonic() + self.settings.result_replay_timeout_s
        progress = _ReadBack()
        # An in-process broker queues its whole history at join: nothing ready means caught up.
        pubsub = self._pubsub
        quiet_s = 0.0 if pubsub is not None and pubsub.publishes_in_process else _REPLAY_QUIET_S
        while True:
            try:
                async with asyncio.timeout(quiet_s if progress.replaying else None):
                    messages = await subscription.receive_batch(_RESULTS_CHUNK)
            except TimeoutError:
                messages = []
                progress.replaying = False
            else:
                if not messages:
                    break  # the subscription ended
            for message in messages:
                await self._take_result(message, live_since, progress)
            if progress.replaying and time.monotonic() > replay_deadline:
                progress.replaying = False
            if not progress.replaying and not self._consuming:
                self._consuming = True
                self._first_attempt.set()
                log.info(
                    kv(
                        "results_caught_up",
                        group=self.results_group,
                        replayed=progress.replayed,
                        pending_restored=progress.restored,
                        took_s=round(time.time() - live_since, 3),
                    )
                )
        if not self._stopping:
            raise MessagingError("the results subscription ended")

    async def _take_result(self, message: Message, live_since: float, progress: _ReadBack) -> None:
        """Store one message of the results topic (a result, or an accepted marker), then ack it."""
        if message.attributes.get(MARKER_KIND_ATTR) == ACCEPTED_KIND:
            progress.restored += self._restore_pending(message.data, live_since)
            await message.ack()
            return
        try:
            result = ResultMessage.from_bytes(message.data)
        except ValueError as exc:
            # A malformed result can never become valid: drop it, loudly.
            log.warning(kv("malformed_result", key=message.key, error=exc))
            self.metrics.errors.labels("malformed_result").inc()
            await message.ack()
            return
        read_back = result.completed_at < live_since
        if read_back:
            progress.replayed += 1
        else:
            progress.replaying = False
        stored = self.store.add_result(
            result, completed_at=result.completed_at, read_back=read_back
        )
        if stored is not None:
            self.metrics.record_result(result)
        elif not progress.replaying:  # during the read-back, known results are expected again
            self.metrics.duplicate_results.inc()
        await message.ack()

    async def _mark_accepted(
        self,
        pubsub: PubSub,
        owner: str,
        accepted_at: float,
        deadline: float,
        metadata: dict[str, str],
        fresh: Sequence[FreshImage],
    ) -> None:
        """Publish the marker that lets this gateway, restarted, answer `pending` for these ids."""
        marker = AcceptedMarker(
            gateway_id=self.gateway_id,
            owner=owner,
            accepted_at=accepted_at,
            deadline=deadline,
            metadata=metadata,
            request_ids=[image.request_id for image in fresh],
        )
        try:
            await pubsub.publish(
                self.settings.results_topic,
                marker.to_bytes(),
                key=self.gateway_id,
                attributes={MARKER_KIND_ATTR: ACCEPTED_KIND},
            )
        except Exception as exc:
            # The requests stand without it: only a restart before their results answers 404.
            log.warning(kv("accepted_marker_failed", broker=self.broker_url, error=exc))

    def _restore_pending(self, data: bytes, live_since: float) -> int:
        """This gateway's requests from before a restart: `pending` again until their results come."""
        try:
            marker = AcceptedMarker.from_bytes(data)
        except ValueError as exc:
            log.warning(kv("malformed_marker", error=exc))
            return 0
        # Markers of this process are for requests it knows; expired ones could only turn into a
        # `failed` that beats their real result, still further along the log.
        if (
            marker.gateway_id != self.gateway_id
            or marker.accepted_at >= live_since
            or marker.deadline + EXPIRY_GRACE_S < time.time()
        ):
            return 0
        return self.store.add_pending_from_marker(marker)

    async def _monitor(self, pubsub: PubSub) -> None:
        while True:
            await asyncio.sleep(_PING_INTERVAL_S)
            try:
                await pubsub.ping()
            except Exception as exc:
                if self._broker_reachable:
                    log.warning(kv("broker_unreachable", broker=self.broker_url, error=exc))
                self._last_broker_error = f"broker {self.broker_url} unreachable: {exc}"
                self._broker_reachable = False
                self.metrics.broker_up.set(0)
            else:
                if not self._broker_reachable:
                    log.info(kv("broker_reachable_again", broker=self.broker_url))
                self._broker_reachable = True
                self.metrics.broker_up.set(1)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(_SWEEP_INTERVAL_S)
            expired = self.store.expire()
            for stored in expired:
                self.metrics.record_result(stored.result)
            if expired:
                # One line per sweep, not per request: an outage can expire thousands at once.
                log.warning(
                    kv("requests_expired", count=len(expired), first=expired[0].result.request_id)
                )

    # --- submitting ------------------------------------------------------------------------
    def policy_for(self, model: ModelVersion | None) -> ImagePolicy:
        """The image policy that fits uploads to `model`'s input (None: the default model, resolved)."""
        if model is None:
            model = self.registry.resolve(None)
        channels, height, width = model.input_shape
        return ImagePolicy(
            channels=channels,
            height=height,
            width=width,
            max_upload_bytes=self.settings.max_upload_bytes,
            max_pixels=self.settings.max_image_pixels,
            max_aspect_ratio=self.settings.max_image_aspect_ratio,
            auto_invert=self.settings.auto_invert
            and bool(model.preprocessing.get("auto_invert", False)),
        )

    def require_ready(self) -> PubSub:
        pubsub = self._pubsub
        if pubsub is None or not self.ready:
            raise ApiError(
                503,
                "broker_unavailable",
                f"{self.broker_status}; the gateway reconnects by itself, retry later",
                headers={"Retry-After": str(RETRY_AFTER_BROKER_S)},
            )
        return pubsub

    def check_capacity(self, count: int) -> None:
        in_flight = self.store.pending_count
        pending_cap = self.settings.max_in_flight  # requests accepted and not yet answered
        if in_flight + count > pending_cap:
            raise ApiError(
                429,
                "too_many_requests",
                f"{in_flight} requests in flight, {count} more would exceed the limit of {pending_cap} "
                "(FMNIST_MAX_IN_FLIGHT); retry later",
                headers={"Retry-After": str(RETRY_AFTER_OVERLOAD_S)},
            )

    async def submit(
        self,
        owner: str,
        payloads: Sequence[bytes],
        *,
        model: ModelVersion | None = None,
        metadata: dict[str, str] | None = None,
        idempotency: Sequence[IdempotencyClaim | None] | None = None,
        request_ids: Sequence[str] | None = None,
        pinned: bool = False,
    ) -> list[Accepted | ApiError]:
        """Publish normalised images; one `Accepted` (or the error that refused it) per payload, in order.

        `idempotency[i]` is `(key, body fingerprint)` or None; a key seen before (for this owner)
        returns the earlier request id without publishing, or 422 when the earlier request had
        another body. `request_ids` lets a caller choose the ids (the websocket must know them
        before publishing). `model` (None: the default model's newest live version) is the model
        the payloads were normalised for; `pinned` sends them to that version's own topic. Raises
        503 when the broker is down and 429 when the cap on requests in flight would be exceeded.
        """
        pubsub = self.require_ready()
        if model is None:
            model = self.registry.resolve(None)
        ids = request_ids or new_request_ids(len(payloads))
        outcomes, fresh = claim_idempotency_keys(self.store, owner, payloads, ids, idempotency)
        if not fresh:
            return outcomes
        try:
            self.check_capacity(len(fresh))
        except ApiError:
            release_claims(self.store, owner, fresh)
            raise
        results = await self._publish(pubsub, owner, model, pinned, metadata or {}, fresh)
        self._settle(owner, fresh, results, outcomes)
        return outcomes

    async def _publish(
        self,
        pubsub: PubSub,
        owner: str,
        model: ModelVersion,
        pinned: bool,
        metadata: dict[str, str],
        fresh: list[FreshImage],
    ) -> list[object]:
        """Publish the images as pending requests; per image None, or the exception that failed it."""
        submitted_at = time.time()
        deadline = submitted_at + self.settings.request_deadline_s
        common = request_attributes(
            shape=encode_shape(model.input_shape),
            owner=owner,
            submitted_at=submitted_at,
            deadline=deadline,
            metadata=metadata,
        )
        common[MODEL_ATTR] = model.name
        if pinned:
            common[MODEL_VERSION_ATTR] = model.version
        topic = requests_topic_for(
            self.settings.requests_topic, model.name, model.version if pinned else None
        )
        for image in fresh:
            self.store.add_pending(Submission(image.request_id, owner, deadline, metadata))
        sends = [
            pubsub.publish(
                topic,
                image.payload,
                key=image.request_id,
                attributes={**common, REQUEST_ID_ATTR: image.request_id},
            )
            for image in fresh
        ]
        if pubsub.publishes_in_process:
            return [await outcome_of(send) for send in sends]
        marker = self._mark_accepted(pubsub, owner, submitted_at, deadline, metadata, fresh)
        *results, _ = await publish_within_timeout(
            [*sends, marker], self.settings.publish_timeout_s
        )
        return results

    def _settle(
        self,
        owner: str,
        fresh: list[FreshImage],
        results: list[object],
        outcomes: list[Accepted | ApiError],
    ) -> None:
        """Turn failed publishes into errors (pending entry and idempotency key released), log, count."""
        failed = [
            (image, outcome)
            for image, outcome in zip(fresh, results, strict=True)
            if isinstance(outcome, BaseException)
        ]
        for image, outcome in failed:
            self.store.discard_pending(image.request_id)
            outcomes[image.position] = self._publish_error(outcome, image.request_id)
        release_claims(self.store, owner, [image for image, _ in failed])
        if failed:
            log.warning(
                kv(
                    "publish_failed",
                    broker=self.broker_url,
                    count=len(failed),
                    error=outcomes[fresh[0].position],
                )
            )
        self.metrics.record_accepted(len(fresh) - len(failed))

    def _publish_error(self, exc: BaseException, request_id: str) -> ApiError:
        if isinstance(exc, BacklogFull):
            return ApiError(
                429,
                "too_many_requests",
                f"the workers' backlog is full ({exc}); retry later",
                request_id=request_id,
                headers={"Retry-After": str(RETRY_AFTER_OVERLOAD_S)},
            )
        if not isinstance(exc, MessagingError | OSError | TimeoutError):
            # A client library failing in a way it does not document (e.g. a producer closed
            # mid-publish) is still the broker path failing: the client gets a retryable 503, never
            # a 500 that leaves the rest of its batch unanswered.
            log.error(kv("publish_crashed", broker=self.broker_url, error=repr(exc)))
        self._broker_reachable = False
        self._last_broker_error = f"publishing to {self.broker_url} failed: {exc}"
        self.metrics.broker_up.set(0)
        return ApiError(
            503,
            "broker_unavailable",
            f"the broker did not accept the request ({exc}); retry later",
            request_id=request_id,
            headers={"Retry-After": str(RETRY_AFTER_BROKER_S)},
        )


async def _close_quietly(pubsub: PubSub) -> None:
    try:
        await pubsub.close()
    except Exception as exc:  # closing a broken connection may fail in many ways; we drop it anyway
        log.debug(kv("broker_close_failed", error=exc))
