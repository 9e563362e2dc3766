"""The gateway runtime behind the routes: the broker link (connect, reconnect, readiness) and the facade routes call.

One `Gateway` per app, created by `create_app` and reached by routes through `app.gateway.deps`. It survives a
broker that is down at start or goes away later: routes answer 503 + Retry-After meanwhile, a background
loop reconnects, and the gateway serves again without a restart. The work behind its methods lives beside
it: the results feed and the reads of results in `app.gateway.feed`, the submit path in
`app.gateway.publishing`, the models learned from the control topic in `app.gateway.control`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from app.broker import connect_broker
from app.gateway.auth import ApiKeys
from app.gateway.bodies import BodyBudget
from app.gateway.control import learn_models, subscribe_control
from app.gateway.errors import ApiError
from app.gateway.feed import REPLAY_QUIET_S, ResultsFeed
from app.gateway.images import ImagePolicy
from app.gateway.metrics import GatewayMetrics
from app.gateway.publishing import Publisher
from app.gateway.refusals import RETRY_AFTER_BROKER_S, RETRY_AFTER_OVERLOAD_S, broker_unavailable
from app.gateway.registry import ModelRegistry, ModelVersion
from app.gateway.results import EXPIRY_GRACE_S, ResultStore, StoredResult, Submission
from app.gateway.rollout import RolloutState, follow_rollout, subscribe_rollout
from app.gateway.shadow import ShadowMonitor
from app.gateway.shared_state import SharedState
from app.gateway.submission import Accepted, IdempotencyClaim
from app.logs import kv
from app.protocol import ResultMessage
from app.settings import Settings
from messaging import MessagingError, PubSub, Subscription, parse_broker_url

__all__ = ["RETRY_AFTER_BROKER_S", "RETRY_AFTER_OVERLOAD_S", "Gateway", "PubSubFactory"]

log = logging.getLogger(__name__)

PubSubFactory = Callable[[Settings], PubSub]

_PING_INTERVAL_S = 2.0
_SWEEP_INTERVAL_S = 1.0
_MAX_BACKOFF_S = 5.0
_RESULTS_MAX_UNACKED = 4096  # results delivered to the gateway and not yet stored and acked


class Gateway:
    """Settings, result store, metrics, auth and the broker link of one gateway app."""

    def __init__(self, settings: Settings, pubsub_factory: PubSubFactory | None = None) -> None:
        self.settings = settings
        self.gateway_id = settings.gateway_id or secrets.token_hex(4)
        self.broker_url = parse_broker_url(settings.broker_url).redacted
        # With shared state, one group for all gateways: each result is stored once, undecoded, by
        # one of them; each gateway decodes those that reach it on its channels.
        self.results_group = (
            settings.shared_results_group
            if settings.shared_state_url
            else f"gateway-{self.gateway_id}"
        )
        self.store = ResultStore(
            max_results=settings.result_store_size, ttl_s=settings.result_ttl_s
        )
        self.metrics = GatewayMetrics(in_flight=lambda: self.store.pending_count)
        self.registry = ModelRegistry(settings.default_model)
        self.rollout = RolloutState(
            history_size=settings.rollout_history_size,
            window_s=settings.rollout_window_s,
            routed_horizon_s=settings.request_deadline_s + EXPIRY_GRACE_S,
        )
        self.feed = ResultsFeed(
            settings,
            self.store,
            self.metrics,
            rollout=self.rollout,
            gateway_id=self.gateway_id,
            results_group=self.results_group,
        )
        self.results_decoded = self.feed.results_decoded
        self.shared: SharedState | None = None
        if settings.shared_state_url:
            self.shared = SharedState(
                settings.shared_state_url,
                prefix=settings.shared_state_prefix,
                gateway_id=self.gateway_id,
                ttl_s=settings.result_ttl_s,
                timeout_s=settings.shared_state_timeout_s,
                sink=self.feed.take_published,
            )
            self.shared.on_reconnect = self.feed.resync_pending
            self.feed.shared = self.shared
        self.publisher = Publisher(
            settings,
            self.store,
            self.metrics,
            self.shared,
            registry=self.registry,
            rollout=self.rollout,
            gateway_id=self.gateway_id,
            broker_url=self.broker_url,
            on_broker_failure=self._broker_failed,
        )
        self.api_keys = ApiKeys(settings.api_keys, settings.admin_api_keys)
        self.bodies = BodyBudget(settings.max_body_bytes_in_flight)
        self._factory = pubsub_factory or connect_broker
        self.shadow = ShadowMonitor(
            settings,
            self.registry,
            self.metrics,
            gateway_id=self.gateway_id,
            live_result=self._stored_result,
        )
        self.feed.result_listeners.append(self.shadow.add_live)
        self._pubsub: PubSub | None = None
        self._results: Subscription | None = None
        self._broker_reachable = False
        self._consuming = False
        self._models_known = asyncio.Event()  # the read-back of the control topic caught up
        self._rollout_known = asyncio.Event()  # the read-back of the rollout topic caught up
        self._last_broker_error = "not connected yet"
        self._first_attempt = asyncio.Event()  # the first connection attempt ended, either way
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    def _stored_result(self, request_id: str) -> ResultMessage | None:
        stored = self.store.get_result(request_id)
        return stored.result if stored is not None else None

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
        await self.shadow.start()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait_s):
                await self._first_attempt.wait()
                if self._consuming:
                    await self._models_known.wait()
                    await self._rollout_known.wait()
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
        await self.shadow.stop()
        if self.shared is not None:
            await self.shared.stop()

    async def _maintain_link(self) -> None:
        backoff = 0.2
        while not self._stopping:
            pubsub = self._factory(self.settings)
            try:
                control, rollout, results = await self._connect(pubsub)
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
            await self._serve(pubsub, control, rollout, results)
            if not self._stopping:
                await asyncio.sleep(backoff)

    async def _connect(self, pubsub: PubSub) -> tuple[Subscription, Subscription, Subscription]:
        """Connect, create the topics, subscribe to the control, rollout and results topics."""
        await pubsub.connect()
        await pubsub.ensure_topics(
            self.settings.results_topic, self.settings.deadletter_topic, self.settings.control_topic
        )
        control, rollout = await _both(
            subscribe_control(
                pubsub,
                self.settings.control_topic,
                self.gateway_id,
                self.settings.heartbeat_interval_s,
            ),
            subscribe_rollout(
                pubsub, self.settings.rollout_topic, f"gateway-{self.gateway_id}-rollout"
            ),
        )
        # The log is the store: re-read the results of the last TTL, whatever the group
        # committed, so a restarted gateway serves what it accepted before. With shared
        # state Redis is the store: the shared group goes on where it committed.
        replay_from = time.time() - self.settings.result_ttl_s
        results = pubsub.subscribe(
            self.settings.results_topic,
            group=self.results_group,
            start="earliest" if self.shared is not None else replay_from,
            max_in_flight=_RESULTS_MAX_UNACKED,
        )
        await results.start()
        return control, rollout, results

    async def _serve(
        self, pubsub: PubSub, control: Subscription, rollout: Subscription, results: Subscription
    ) -> None:
        """Serve on a connected broker until its results subscription ends or fails; then close it."""
        self._pubsub = pubsub
        self._results = results
        self._broker_reachable = True
        self.metrics.broker_up.set(1)
        log.info(kv("broker_connected", broker=self.broker_url, group=self.results_group))
        monitor = asyncio.create_task(self._monitor(pubsub), name="fmnist-broker-ping")
        quiet_s = REPLAY_QUIET_S if pubsub.durable else 0.0
        learner = asyncio.create_task(
            learn_models(self.registry, control, self._models_known, quiet_s), name="fmnist-models"
        )
        follower = asyncio.create_task(
            self._follow_rollout(rollout, quiet_s), name="fmnist-rollout"
        )
        shadow_reader = asyncio.create_task(self.shadow.read(pubsub), name="fmnist-shadow-results")
        try:
            await self.feed.consume(results, pubsub.durable, self._caught_up)
            if not self._stopping:
                raise MessagingError("the results subscription ended")
        except Exception as exc:
            self._last_broker_error = f"results consumer stopped: {exc}"
            log.warning(kv("results_consumer_failed", broker=self.broker_url, error=exc))
        finally:
            self._consuming = False
            self._models_known.clear()
            self._rollout_known.clear()
            self._pubsub = None
            self._results = None
            self.metrics.broker_up.set(0)
            for task in (monitor, learner, follower, shadow_reader):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await _close_quietly(pubsub)

    async def _follow_rollout(self, subscription: Subscription, quiet_s: float) -> None:
        try:
            await follow_rollout(subscription, self.rollout, self._rollout_known, quiet_s)
        except Exception as exc:  # the weights in force stay; the next reconnect reads again
            log.warning(kv("rollout_follow_failed", broker=self.broker_url, error=exc))
            self._rollout_known.set()

    def _caught_up(self) -> None:
        """The results read-back caught up: the gateway can serve."""
        self._consuming = True
        self._first_attempt.set()

    def _broker_failed(self, reason: str) -> None:
        """A publish the broker refused: unready until the next ping answers."""
        self._broker_reachable = False
        self._last_broker_error = reason
        self.metrics.broker_up.set(0)

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
            self.metrics.record_results([stored.result for stored in expired])
            for stored in expired:
                self.rollout.record_result(stored.result)
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
        """The broker link; 503 + Retry-After while the gateway is not ready."""
        pubsub = self._pubsub
        if pubsub is None or not self.ready:
            raise broker_unavailable(
                f"{self.broker_status}; the gateway reconnects by itself, retry later"
            )
        return pubsub

    def check_capacity(self, count: int) -> None:
        """429 when `count` more requests would exceed FMNIST_MAX_PENDING_REQUESTS."""
        self.publisher.check_capacity(count)

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
        return await self.publisher.submit(
            pubsub,
            model or self.registry.resolve(None),
            owner,
            payloads,
            metadata=metadata or {},
            idempotency=idempotency,
            request_ids=request_ids,
            pinned=pinned,
        )

    # --- reading results (one gateway, or any of them with shared state) ------------------
    async def lookup(self, request_id: str) -> StoredResult | Submission | None:
        """The result of `request_id`, else its pending submission, else None: locally, then in Redis."""
        return await self.feed.lookup(request_id)

    async def wait_for_all(self, owner: str, request_ids: list[str], wait_s: float) -> None:
        """Return once every id has a result (here or, with shared state, on any gateway), or after `wait_s`."""
        await self.feed.wait_for_all(owner, request_ids, wait_s)

    async def watch(self, owner: str) -> None:
        """With shared state: receive `owner`'s results from any gateway until `shared.unwatch`."""
        await self.feed.watch(owner)

    async def stored_results(
        self, owner: str, request_ids: set[str] | None, after: int | None
    ) -> list[StoredResult]:
        """With shared state: `owner`'s results after the cursor, and those of `request_ids`, from Redis."""
        return await self.feed.stored_results(owner, request_ids, after)


async def _both(
    first: Coroutine[Any, Any, Subscription], second: Coroutine[Any, Any, Subscription]
) -> tuple[Subscription, Subscription]:
    """Start two subscriptions side by side (each joins its group meanwhile); when one fails, the
    other is closed."""
    results = await asyncio.gather(first, second, return_exceptions=True)
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:
        for started in results:
            if isinstance(started, Subscription):
                await started.aclose()
        raise failed[0]
    a, b = results
    assert isinstance(a, Subscription) and isinstance(b, Subscription)
    return a, b


async def _close_quietly(pubsub: PubSub) -> None:
    try:
        await pubsub.close()
    except Exception as exc:  # closing a broken connection may fail in many ways; we drop it anyway
        log.debug(kv("broker_close_failed", error=exc))
