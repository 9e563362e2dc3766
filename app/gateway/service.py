"""The gateway runtime behind the routes: broker link (connect, reconnect, results consumer), limits, publishing.

One `Gateway` per app, created by `create_app` and reached by routes through `app.gateway.deps`. It survives a
broker that is down at start or goes away later: routes answer 503 + Retry-After meanwhile, a background
loop reconnects, and the gateway serves again without a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from app.broker import connect_broker
from app.gateway.auth import ApiKeys
from app.gateway.errors import ApiError
from app.gateway.images import ImagePolicy
from app.gateway.metrics import GatewayMetrics
from app.gateway.results import (
    ACCEPTED_KIND,
    EXPIRY_GRACE_S,
    MARKER_KIND_ATTR,
    AcceptedMarker,
    ResultStore,
    Submission,
)
from app.logs import kv
from app.protocol import (
    DEADLINE_ATTR,
    METADATA_ATTR,
    OWNER_ATTR,
    REQUEST_ID_ATTR,
    SHAPE_ATTR,
    SUBMITTED_AT_ATTR,
    ResultMessage,
    decode_shape,
    encode_metadata,
    encode_shape,
)
from app.settings import Settings
from messaging import BacklogFull, MessagingError, PubSub, Subscription, parse_broker_url

log = logging.getLogger(__name__)

PubSubFactory = Callable[[Settings], PubSub]

RETRY_AFTER_BROKER_S = 2
RETRY_AFTER_OVERLOAD_S = 1
_PING_INTERVAL_S = 2.0
_SWEEP_INTERVAL_S = 1.0
_MAX_BACKOFF_S = 5.0
_RESULTS_CHUNK = 512  # results taken from the subscription in one go
# The results read-back counts as caught up once a receive waits this long for nothing.
_REPLAY_QUIET_S = 0.5


def input_shape_of(settings: Settings) -> tuple[int, int, int]:
    """The model's input shape (C, H, W) from `FMNIST_INPUT_SHAPE`."""
    return decode_shape(settings.input_shape)


def new_request_ids(count: int) -> list[str]:
    """`count` random 128-bit ids as 32 hex characters, from one read of the OS's random source."""
    pool = os.urandom(16 * count).hex()
    return [pool[i : i + 32] for i in range(0, 32 * count, 32)]


@dataclass(frozen=True, slots=True)
class Accepted:
    """One image taken in: its request id, and whether it repeats an earlier submit (idempotency)."""

    request_id: str
    repeated: bool = False


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
        channels, height, width = input_shape_of(settings)
        self.policy = ImagePolicy(
            channels=channels,
            height=height,
            width=width,
            max_upload_bytes=settings.max_upload_bytes,
            max_pixels=settings.max_image_pixels,
            max_aspect_ratio=settings.max_image_aspect_ratio,
            auto_invert=settings.auto_invert,
        )
        self.shape_attr = encode_shape(self.policy.shape)
        self._factory = pubsub_factory or connect_broker
        self._pubsub: PubSub | None = None
        self._results: Subscription | None = None
        self._broker_reachable = False
        self._consuming = False
        self._last_broker_error = "not connected yet"
        self._first_attempt = (
            asyncio.Event()
        )  # set once the first connection attempt ended, either way
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    # --- lifecycle -------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        """Broker reachable, its link up (topics in place) and the results consumer receiving."""
        pubsub, results = self._pubsub, self._results
        return (
            pubsub is not None
            and self._consuming
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
                    self.settings.requests_topic,
                    self.settings.results_topic,
                    self.settings.deadletter_topic,
                )
                # The log is the store: re-read the results of the last TTL, whatever the group
                # committed, so a restarted gateway serves what it accepted before.
                replay_from = time.time() - self.settings.result_ttl_s
                subscription = pubsub.subscribe(
                    self.settings.results_topic,
                    group=self.results_group,
                    start=replay_from,
                    max_in_flight=4096,
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
            try:
                await self._consume(subscription)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._last_broker_error = f"results consumer stopped: {exc}"
                log.warning(kv("results_consumer_failed", broker=self.broker_url, error=exc))
            finally:
                self._consuming = False
                self._pubsub = None
                self._results = None
                self.metrics.broker_up.set(0)
                monitor.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await monitor
                await _close_quietly(pubsub)
            if not self._stopping:
                await asyncio.sleep(backoff)

    async def _consume(self, subscription: Subscription) -> None:
        """Store results as they come; ready (`_consuming`) once the read-back of the last TTL caught up.

        Caught up means: a receive found nothing for `_REPLAY_QUIET_S` (at once in process), or a result completed after
        the read-back began arrived (live traffic reached us), or `result_replay_timeout_s` passed.
        """
        store = self.store
        metrics = self.metrics
        live_since = time.time()
        replay_deadline = time.monotonic() + self.settings.result_replay_timeout_s
        replaying = True
        replayed = restored = 0
        # An in-process broker queues its whole history at join: nothing ready means caught up.
        pubsub = self._pubsub
        quiet_s = 0.0 if pubsub is not None and pubsub.publishes_in_process else _REPLAY_QUIET_S
        while True:
            try:
                async with asyncio.timeout(quiet_s if replaying else None):
                    messages = await subscription.receive_batch(_RESULTS_CHUNK)
            except TimeoutError:
                messages = []
                replaying = False
            else:
                if not messages:
                    break  # the subscription ended
            for message in messages:
                if message.attributes.get(MARKER_KIND_ATTR) == ACCEPTED_KIND:
                    restored += self._restore_pending(message.data, live_since)
                    await message.ack()
                    continue
                try:
                    result = ResultMessage.from_bytes(message.data)
                except ValueError as exc:
                    # A malformed result can never become valid: drop it, loudly.
                    log.warning(kv("malformed_result", key=message.key, error=exc))
                    metrics.errors.labels("malformed_result").inc()
                    await message.ack()
                    continue
                read_back = result.completed_at < live_since
                if read_back:
                    replayed += 1
                else:
                    replaying = False
                if (
                    store.add_result(result, completed_at=result.completed_at, read_back=read_back)
                    is not None
                ):
                    metrics.record_result(result)
                elif not replaying:  # during the read-back, known results are expected again
                    metrics.duplicate_results.inc()
                await message.ack()
            if replaying and time.monotonic() > replay_deadline:
                replaying = False
            if not replaying and not self._consuming:
                self._consuming = True
                self._first_attempt.set()
                log.info(
                    kv(
                        "results_caught_up",
                        group=self.results_group,
                        replayed=replayed,
                        pending_restored=restored,
                        took_s=round(time.time() - live_since, 3),
                    )
                )
        if not self._stopping:
            raise MessagingError("the results subscription ended")

    async def _mark_accepted(
        self,
        pubsub: PubSub,
        owner: str,
        accepted_at: float,
        deadline: float,
        metadata: dict[str, str],
        fresh: Sequence[tuple[int, str, bytes, object]],
    ) -> None:
        """Publish the marker that lets this gateway, restarted, answer `pending` for these ids."""
        marker = AcceptedMarker(
            gateway_id=self.gateway_id,
            owner=owner,
            accepted_at=accepted_at,
            deadline=deadline,
            metadata=metadata,
            request_ids=[request_id for _, request_id, _, _ in fresh],
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
        limit = self.settings.max_in_flight
        if in_flight + count > limit:
            raise ApiError(
                429,
                "too_many_requests",
                f"{in_flight} requests in flight, {count} more would exceed the limit of {limit} "
                "(FMNIST_MAX_IN_FLIGHT); retry later",
                headers={"Retry-After": str(RETRY_AFTER_OVERLOAD_S)},
            )

    async def submit(
        self,
        owner: str,
        payloads: Sequence[bytes],
        *,
        metadata: dict[str, str] | None = None,
        idempotency: Sequence[tuple[str, str] | None] | None = None,
        request_ids: Sequence[str] | None = None,
    ) -> list[Accepted | ApiError]:
        """Publish normalised images; one `Accepted` (or the error that refused it) per payload, in order.

        `idempotency[i]` is `(key, fingerprint)` or None; a key seen before (for this owner) returns the
        earlier request id without publishing, or 422 when the earlier request had another body.
        `request_ids` lets a caller choose the ids (the websocket must know them before publishing).
        Raises 503 when the broker is down and 429 when the in-flight cap would be exceeded.
        """
        pubsub = self.require_ready()
        store = self.store
        outcomes: list[Accepted | ApiError] = []
        fresh: list[tuple[int, str, bytes, tuple[str, str] | None]] = []
        ids = request_ids or new_request_ids(len(payloads))
        for index, payload in enumerate(payloads):
            request_id = ids[index]
            claim = idempotency[index] if idempotency else None
            if claim is not None:
                earlier = store.claim_idempotency_key(owner, claim[0], claim[1], request_id)
                if earlier is not None:
                    earlier_id, earlier_fingerprint = earlier
                    if earlier_fingerprint != claim[1]:
                        outcomes.append(
                            ApiError(
                                422,
                                "idempotency_key_reused",
                                "this Idempotency-Key was already used with a different request body; "
                                "use a new key for a new request",
                                request_id=earlier_id,
                            )
                        )
                    else:
                        outcomes.append(Accepted(earlier_id, repeated=True))
                    continue
            outcomes.append(Accepted(request_id))
            fresh.append((index, request_id, payload, claim))
        if not fresh:
            return outcomes
        try:
            self.check_capacity(len(fresh))
        except ApiError:
            for _, request_id, _, claim in fresh:
                if claim is not None:
                    store.release_idempotency_key(owner, claim[0], request_id)
            raise

        submitted_at = time.time()
        deadline = submitted_at + self.settings.request_deadline_s
        common = {
            SHAPE_ATTR: self.shape_attr,
            SUBMITTED_AT_ATTR: repr(submitted_at),
            DEADLINE_ATTR: repr(deadline),
            OWNER_ATTR: owner,
        }
        if metadata:
            common[METADATA_ATTR] = encode_metadata(metadata)
        meta = metadata or {}
        topic = self.settings.requests_topic
        for _, request_id, _, _ in fresh:
            store.add_pending(Submission(request_id, owner, deadline, meta))
        sends = [
            pubsub.publish(
                topic, payload, key=request_id, attributes={**common, REQUEST_ID_ATTR: request_id}
            )
            for _, request_id, payload, _ in fresh
        ]
        results: list[object]
        if pubsub.publishes_in_process:
            results = []
            for send in sends:
                try:
                    await send
                except Exception as exc:
                    results.append(exc)
                else:
                    results.append(None)
        else:
            marker = self._mark_accepted(pubsub, owner, submitted_at, deadline, meta, fresh)
            *results, _ = await self._publish_within_timeout([*sends, marker])
        failures = 0
        for (index, request_id, _, claim), outcome in zip(fresh, results, strict=True):
            if isinstance(outcome, BaseException):
                failures += 1
                store.discard_pending(request_id)
                if claim is not None:
                    store.release_idempotency_key(owner, claim[0], request_id)
                outcomes[index] = self._publish_error(outcome, request_id)
        if failures:
            log.warning(
                kv(
                    "publish_failed",
                    broker=self.broker_url,
                    count=failures,
                    error=outcomes[fresh[0][0]],
                )
            )
        self.metrics.record_accepted(len(fresh) - failures)
        return outcomes

    async def _publish_within_timeout(self, sends: list[Coroutine[Any, Any, None]]) -> list[object]:
        """Run the publishes concurrently (the broker batches them and one slow ack does not
        serialise the rest); those not accepted within `publish_timeout_s` fail with TimeoutError,
        so that a client waits a bounded time for its 503 and never gets a late 202."""
        tasks = [asyncio.ensure_future(send) for send in sends]
        _, pending = await asyncio.wait(tasks, timeout=self.settings.publish_timeout_s)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
        timeout = TimeoutError(
            f"not accepted within {self.settings.publish_timeout_s:g} s (FMNIST_PUBLISH_TIMEOUT_S)"
        )
        return [
            timeout if task in pending or task.cancelled() else (task.exception() or None)
            for task in tasks
        ]

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
