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

from prometheus_client import Counter

from app.broker import connect_broker
from app.gateway.auth import ApiKeys
from app.gateway.bodies import BodyBudget
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
    StoredResult,
    Submission,
)
from app.gateway.shared_state import SharedState
from app.gateway.submission import (
    Accepted,
    FreshImage,
    IdempotencyClaim,
    claim_idempotency_keys,
    new_request_ids,
    release_claims,
    repeat_of,
    request_attributes,
)
from app.logs import kv
from app.protocol import (
    COMPLETED_AT_ATTR,
    GATEWAY_ATTR,
    MODEL_ATTR,
    MODEL_VERSION_ATTR,
    OWNER_ATTR,
    REQUEST_ID_ATTR,
    ErrorInfo,
    ModelAnnouncement,
    ResultMessage,
    encode_shape,
    requests_topic_for,
)
from app.settings import Settings
from messaging import (
    BacklogFull,
    Message,
    MessagingError,
    Outgoing,
    PubSub,
    Subscription,
    parse_broker_url,
)

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
_SHARED_RETRY_S = 0.5  # between tries to write a chunk of results while Redis is down


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
        self.shared: SharedState | None = None
        if settings.shared_state_url:
            # One group for all gateways: each result is stored once, undecoded, by one of them;
            # each gateway decodes those that reach it on its channels (its requests, watched owners).
            self.results_group = settings.shared_results_group
            self.shared = SharedState(
                settings.shared_state_url,
                prefix=settings.shared_state_prefix,
                gateway_id=self.gateway_id,
                ttl_s=settings.result_ttl_s,
                timeout_s=settings.shared_state_timeout_s,
                sink=self._take_published,
            )
            self.shared.on_reconnect = self._resync_pending
        self.broker_url = parse_broker_url(settings.broker_url).redacted
        self.store = ResultStore(
            max_results=settings.result_store_size, ttl_s=settings.result_ttl_s
        )
        self.metrics = GatewayMetrics(in_flight=lambda: self.store.pending_count)
        self.results_decoded = Counter(
            "fmnist_results_decoded",
            "Results this gateway decoded (with shared state: those of its requests and watched owners).",
            registry=self.metrics.registry,
        )
        self.api_keys = ApiKeys(settings.api_keys)
        self.bodies = BodyBudget(settings.max_body_bytes_in_flight)
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
        self._repairs: set[asyncio.Task[None]] = set()  # malformed shared results being replaced
        self._stopping = False

    # --- lifecycle -------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        """Broker reachable, its link up (topics in place), the results consumer receiving and the
        models announced before this gateway started learned."""
        pubsub, results = self._pubsub, self._results
        return (
            pubsub is not None
            and (self.shared is None or self.shared.healthy)
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
        if self.shared is not None and not self.shared.healthy:
            return self.shared.last_error
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
        if self.shared is not None:
            await self.shared.start()
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
        if self.shared is not None:
            await self.shared.stop()

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
                # committed, so a restarted gateway serves what it accepted before. With shared
                # state Redis is the store: the shared group goes on where it committed.
                replay_from = time.time() - self.settings.result_ttl_s
                subscription = pubsub.subscribe(
                    self.settings.results_topic,
                    group=self.results_group,
                    start="earliest" if self.shared is not None else replay_from,
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
            quiet_s = _REPLAY_QUIET_S if pubsub.durable else 0.0
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
        progress = _ReadBack(replaying=self.shared is None)
        # An in-process broker queues its whole history at join: nothing ready means caught up.
        pubsub = self._pubsub
        quiet_s = 0.0 if pubsub is not None and not pubsub.durable else _REPLAY_QUIET_S
        self._check_caught_up(progress, live_since)  # with shared state there is no read-back
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
            if self.shared is not None:
                await self._share_results(messages)
            else:
                for message in messages:
                    await self._take_result(message, live_since, progress)
            if progress.replaying and time.monotonic() > replay_deadline:
                progress.replaying = False
            self._check_caught_up(progress, live_since)
        if not self._stopping:
            raise MessagingError("the results subscription ended")

    def _check_caught_up(self, progress: _ReadBack, live_since: float) -> None:
        """Turn ready (`_consuming`) once the read-back is over; log it once."""
        if progress.replaying or self._consuming:
            return
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

    async def _take_result(self, message: Message, live_since: float, progress: _ReadBack) -> None:
        """Store one message of the results topic (a result, or an accepted marker), then ack it."""
        if message.attributes.get(MARKER_KIND_ATTR) == ACCEPTED_KIND:
            progress.restored += self._restore_pending(message.data, live_since)
            await message.ack()
            return
        result = await self._decode(message)
        if result is None:
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

    async def _decode(self, message: Message) -> ResultMessage | None:
        """The result in a results-topic message, counted; None (and the message acked) if malformed."""
        self.results_decoded.inc()
        try:
            return ResultMessage.from_bytes(message.data)
        except ValueError as exc:
            # A malformed result can never become valid: drop it, loudly.
            log.warning(kv("malformed_result", key=message.key, error=exc))
            self.metrics.errors.labels("malformed_result").inc()
            await message.ack()
            return None

    async def _share_results(self, messages: Sequence[Message]) -> None:
        """Write this gateway's share of the results to Redis (first per id wins), then ack them.

        While Redis is down the chunk is retried and stays unacked: nothing taken is lost.
        """
        shared = self.shared
        assert shared is not None
        horizon = time.time() - self.settings.result_ttl_s
        batch: list[tuple[str, str, bytes, str]] = []
        for message in messages:
            if message.attributes.get(MARKER_KIND_ATTR) == ACCEPTED_KIND:
                continue  # markers serve the single-gateway read-back only
            routed = _routing(message)
            if routed is None:  # an older worker's result, without routing attributes
                result = await self._decode(message)
                if result is None or not _plain_id(result.request_id):
                    continue
                routed = (result.request_id, result.owner, result.completed_at, "")
            request_id, owner, completed_at, gateway = routed
            if completed_at >= horizon:
                batch.append((request_id, owner, message.data, gateway))
        while True:
            try:
                cursors = await shared.store_results(batch)
            except Exception as exc:
                log.debug(kv("shared_results_store_failed", error=exc))
                await asyncio.sleep(_SHARED_RETRY_S)
                continue
            break
        self.metrics.duplicate_results.inc(sum(1 for cursor in cursors if not cursor))
        for message in messages:
            await message.ack()

    def _take_published(self, cursor: int, request_id: str, data: bytes, own: bool) -> None:
        """Decode a result published by the shared state into the local store; count it here when
        it came on this gateway's own channel (this gateway accepted it)."""
        self.results_decoded.inc()
        try:
            result = ResultMessage.from_bytes(data)
        except ValueError as exc:
            failed = self._unparsable(request_id, exc)
            if failed is None:
                return
            result = failed
            if own and self.shared is not None:
                repair = asyncio.create_task(self.shared.replace_result(result, cursor))
                self._repairs.add(repair)
                repair.add_done_callback(self._repairs.discard)
        stored = self._take_shared(result, cursor)
        if stored is not None and own:
            self.metrics.record_result(result)

    def _unparsable(self, request_id: str, exc: ValueError) -> ResultMessage | None:
        """A failed result in place of a worker's result that cannot be parsed, for a request
        pending here; None (logged) when it is not pending here."""
        pending = self.store.get_pending(request_id)
        log.warning(
            kv("malformed_result", key=request_id, pending_here=pending is not None, error=exc)
        )
        if pending is None:
            return None
        return ResultMessage(
            request_id=request_id,
            status="failed",
            completed_at=time.time(),
            owner=pending.owner,
            metadata=pending.metadata,
            error=ErrorInfo(
                code="malformed_result",
                message="the worker's result for this request could not be parsed; submit it again",
            ),
        )

    def _take_shared(self, result: ResultMessage, cursor: int) -> StoredResult | None:
        """A result from Redis (a channel or a lookup) into the local store, under its shared cursor."""
        return self.store.add_result(result, completed_at=result.completed_at, cursor=cursor)

    async def _resync_pending(self) -> None:
        """After (re)subscribing: fetch results of local pending ids published while unsubscribed."""
        shared = self.shared
        if shared is None:
            return
        for cursor, result in await shared.get_results(self.store.pending_ids()):
            self._take_shared(result, cursor)

    # --- reading results (one gateway, or any of them with shared state) ------------------
    async def lookup(self, request_id: str) -> StoredResult | Submission | None:
        """The result of `request_id`, else its pending submission, else None: locally, then in Redis."""
        found = self.store.get_result(request_id) or self.store.get_pending(request_id)
        shared = self.shared
        if found is not None or shared is None:
            return found

        async def stored() -> StoredResult | None:
            for cursor, result in await shared.get_results([request_id]):
                return self._take_shared(result, cursor) or self.store.get_result(request_id)
            return None

        try:
            # The result may replace the pending entry between the two looks: then look again.
            return await stored() or await shared.get_pending(request_id) or await stored()
        except Exception as exc:
            raise self._shared_unavailable(exc) from None

    async def wait_for_all(self, owner: str, request_ids: list[str], wait_s: float) -> None:
        """Return once every id has a result (here or, with shared state, on any gateway), or after `wait_s`."""
        shared = self.shared
        if shared is None or wait_s <= 0:
            await self.store.wait_for_all(request_ids, wait_s)
            return
        # Ids this gateway accepted come on its own channel; others on their owner's.
        foreign = [rid for rid in request_ids if self.store.get_pending(rid) is None]
        if not foreign:
            await self.store.wait_for_all(request_ids, wait_s)
            return
        await self.watch(owner)
        try:
            missing = [rid for rid in foreign if self.store.get_result(rid) is None]
            for cursor, result in await shared.get_results(missing):
                self._take_shared(result, cursor)
            await self.store.wait_for_all(request_ids, wait_s)
        finally:
            await shared.unwatch(owner)

    async def watch(self, owner: str) -> None:
        """With shared state: receive `owner`'s results from any gateway until `shared.unwatch`."""
        if self.shared is not None:
            try:
                await self.shared.watch(owner)
            except Exception as exc:
                await self.shared.unwatch(owner)
                raise self._shared_unavailable(exc) from None

    async def stored_results(
        self, owner: str, request_ids: set[str] | None, after: int | None
    ) -> list[StoredResult]:
        """With shared state: `owner`'s results after the cursor, and those of `request_ids`, from Redis."""
        shared = self.shared
        if shared is None:
            return []
        found: list[tuple[int, ResultMessage]] = []
        try:
            if after is not None:
                found += await shared.results_after(owner, after)
            found += await shared.get_results(sorted(request_ids or ()))
        except Exception as exc:
            raise self._shared_unavailable(exc) from None
        stored = []
        for cursor, result in found:
            # The local copy when there is one, else a view under the shared cursor (not stored:
            # an old result would reach every stream of this gateway as new).
            local = self.store.get_result(result.request_id)
            stored.append(local or StoredResult(cursor, result, time.monotonic()))
        return stored

    def _shared_unavailable(self, exc: BaseException) -> ApiError:
        return ApiError(
            503,
            "shared_state_unavailable",
            f"the gateways' shared state is unreachable ({exc}); retry later",
            headers={"Retry-After": str(RETRY_AFTER_BROKER_S)},
        )

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
        (error,) = await pubsub.publish_many(
            self.settings.results_topic,
            [Outgoing(marker.to_bytes(), self.gateway_id, {MARKER_KIND_ATTR: ACCEPTED_KIND})],
            timeout_s=self.settings.publish_timeout_s,
        )
        if error is not None:
            # The requests stand without it: only a restart before their results answers 404.
            log.warning(kv("accepted_marker_failed", broker=self.broker_url, error=error))

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
            if expired and self.shared is not None:
                # Other gateways answer these ids too; a real result already there still wins.
                with contextlib.suppress(Exception):
                    await self.shared.store_results(
                        [
                            (r.request_id, r.owner, r.to_bytes(), self.gateway_id)
                            for r in (stored.result for stored in expired)
                        ]
                    )
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
        pending_cap = self.settings.max_pending_requests  # requests accepted and not yet answered
        if in_flight + count > pending_cap:
            raise ApiError(
                429,
                "too_many_requests",
                f"{in_flight} requests in flight, {count} more would exceed the limit of {pending_cap} "
                "(FMNIST_MAX_PENDING_REQUESTS); retry later",
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
        if self.shared is None:
            outcomes, fresh = claim_idempotency_keys(self.store, owner, payloads, ids, idempotency)
        else:
            outcomes, fresh = await self._claim_shared(owner, payloads, ids, idempotency)
        if not fresh:
            return outcomes
        try:
            self.check_capacity(len(fresh))
            if self.shared is not None:
                await self._add_shared_pending(owner, metadata or {}, fresh)
        except ApiError:
            await self._release_claims(owner, fresh)
            raise
        results = await self._publish(pubsub, owner, model, pinned, metadata or {}, fresh)
        await self._settle(owner, fresh, results, outcomes)
        return outcomes

    async def _claim_shared(
        self,
        owner: str,
        payloads: Sequence[bytes],
        request_ids: Sequence[str],
        claims: Sequence[IdempotencyClaim | None] | None,
    ) -> tuple[list[Accepted | ApiError], list[FreshImage]]:
        """`claim_idempotency_keys` against Redis: a key is honoured across gateways."""
        shared = self.shared
        assert shared is not None
        outcomes: list[Accepted | ApiError] = []
        fresh: list[FreshImage] = []
        for index, payload in enumerate(payloads):
            request_id = request_ids[index]
            claim = claims[index] if claims else None
            if claim is not None:
                try:
                    earlier = await shared.claim_idempotency_key(
                        owner, claim[0], claim[1], request_id
                    )
                except Exception as exc:
                    await self._release_claims(owner, fresh)
                    raise self._shared_unavailable(exc) from None
                if earlier is not None:
                    outcomes.append(repeat_of(earlier, claim))
                    continue
            outcomes.append(Accepted(request_id))
            fresh.append(FreshImage(index, request_id, payload, claim))
        return outcomes, fresh

    async def _add_shared_pending(
        self, owner: str, metadata: dict[str, str], fresh: list[FreshImage]
    ) -> None:
        """Record the ids in Redis before publishing, so any gateway answers `pending` for them."""
        shared = self.shared
        assert shared is not None
        deadline = time.time() + self.settings.request_deadline_s
        try:
            await shared.add_pending(
                [Submission(image.request_id, owner, deadline, metadata) for image in fresh]
            )
        except Exception as exc:
            raise self._shared_unavailable(exc) from None

    async def _release_claims(self, owner: str, images: Sequence[FreshImage]) -> None:
        if self.shared is None:
            release_claims(self.store, owner, images)
            return
        claimed = [(image.claim[0], image.request_id) for image in images if image.claim]
        await self.shared.release_idempotency_keys(owner, claimed)

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
        if self.shared is not None:  # results are routed back here without being decoded
            common[GATEWAY_ATTR] = self.gateway_id
        if pinned:
            common[MODEL_VERSION_ATTR] = model.version
        topic = requests_topic_for(
            self.settings.requests_topic, model.name, model.version if pinned else None
        )
        for image in fresh:
            self.store.add_pending(Submission(image.request_id, owner, deadline, metadata))
        sends = pubsub.publish_many(
            topic,
            [
                Outgoing(
                    image.payload, image.request_id, {**common, REQUEST_ID_ATTR: image.request_id}
                )
                for image in fresh
            ],
            timeout_s=self.settings.publish_timeout_s,
        )
        # No marker where pending ids live in Redis, or where the broker's log dies with this process.
        if self.shared is not None or not pubsub.durable:
            return list(await sends)
        marker = self._mark_accepted(pubsub, owner, submitted_at, deadline, metadata, fresh)
        results, _ = await asyncio.gather(sends, marker)
        return list(results)

    async def _settle(
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
        await self._release_claims(owner, [image for image, _ in failed])
        if failed and self.shared is not None:
            await self.shared.discard_pending([image.request_id for image, _ in failed])
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


def _plain_id(request_id: str) -> bool:
    """Whether a request id can travel in a published "CURSOR REQUEST_ID JSON" value."""
    return bool(request_id) and not any(c.isspace() for c in request_id)


def _routing(message: Message) -> tuple[str, str, float, str] | None:
    """(request id, owner, completed_at, accepting gateway or "") from a result's key and
    attributes, without decoding it; None when a worker did not add them."""
    attributes = message.attributes
    owner = attributes.get(OWNER_ATTR)
    completed_at = attributes.get(COMPLETED_AT_ATTR)
    request_id = message.key or ""
    if owner is None or completed_at is None or not _plain_id(request_id):
        return None
    try:
        completed = float(completed_at)
    except ValueError:
        return None
    return request_id, owner, completed, attributes.get(GATEWAY_ATTR, "")
