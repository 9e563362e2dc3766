"""Canary rollout in one gateway: the traffic weights in force per model, the history of rollout
decisions, the version each unpinned request goes to, and live figures per version.

Fed by the rollout topic (`settings.rollout_topic`, read from its beginning by `follow_rollout`) and by
the admin routes (`app.gateway.rollout_routes`), which apply what they publish at once. A request goes
to the version picked by a stable hash of its `Idempotency-Key` (per owner), else of its request id,
mapped onto the cumulative weights in sorted version order; versions without a live worker give
their share to the others. The live figures count the results of requests this gateway routed.
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import logging
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Collection, Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field

from app.gateway.errors import ApiError
from app.gateway.registry import ModelRegistry, ModelVersion
from app.gateway.submission import FreshImage
from app.logs import kv
from app.protocol import (
    EVENT_KIND,
    KIND_ATTR,
    WEIGHTS_KIND,
    ResultMessage,
    RolloutEvent,
    TrafficWeights,
)
from messaging import Outgoing, PubSub, Subscription

log = logging.getLogger(__name__)

HistoryEntry = TrafficWeights | RolloutEvent
# One weights total: percent.
TOTAL_PERCENT = 100
# Results kept per version for the live figures: a bound on memory whatever the request rate.
_MAX_SAMPLES_PER_VERSION = 100_000
_ROLLOUT_CHUNK = 256


def routing_key(owner: str, idempotency_key: str | None, request_id: str) -> str:
    """What a request's version is chosen by: its Idempotency-Key (per owner), else its request id."""
    if idempotency_key is not None:
        return f"key\x00{owner}\x00{idempotency_key}"
    return f"id\x00{request_id}"


def hash_point(key: str) -> float:
    """A stable point in [0, 1) for `key`, the same on every gateway and every run."""
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def choose_version(weights: Mapping[str, int], eligible: Collection[str], key: str) -> str | None:
    """The version `key` goes to: [0, 100) mapped onto the cumulative weights of the `eligible`
    versions in sorted order, their weights renormalised; None when no weighted version is eligible."""
    candidates = sorted(v for v, w in weights.items() if w > 0 and v in eligible)
    total = sum(weights[v] for v in candidates)
    if not candidates:
        return None
    target = hash_point(key) * total
    cumulative = 0
    for version in candidates:
        cumulative += weights[version]
        if target < cumulative:
            return version
    return candidates[-1]  # unreachable but for rounding at the top end


def resolve_weights(
    model: str, requested: Mapping[str, int], versions: Sequence[ModelVersion]
) -> dict[str, int]:
    """Full version ids for `requested` (keyed by full id, unique prefix or tag); 422 when a version
    is unknown or ambiguous, a percent negative, or the total is not 100. `{}` clears the split."""
    if not requested:
        return {}
    # A shadow version never answers clients, so it can take no share of live traffic.
    versions = [v for v in versions if v.role == "serving"]
    resolved: dict[str, int] = {}
    for given, percent in requested.items():
        if percent < 0:
            raise ApiError(422, "invalid_weights", f"weight of {given!r} is negative ({percent})")
        matches = _matching_versions(given, versions)
        known = ", ".join(_label(v) for v in versions) or "none"
        if not matches:
            raise ApiError(
                422,
                "invalid_weights",
                f"model {model!r} has no version {given!r}; known versions: {known}",
            )
        if len(matches) > 1:
            raise ApiError(
                422,
                "invalid_weights",
                f"{given!r} matches several versions of {model!r} "
                f"({', '.join(sorted(matches))}); give more of the id",
            )
        (version,) = matches
        if version in resolved:
            raise ApiError(422, "invalid_weights", f"version {version} is given twice")
        resolved[version] = percent
    total = sum(resolved.values())
    if total != TOTAL_PERCENT:
        raise ApiError(
            422,
            "invalid_weights",
            f"weights sum to {total}; they must sum to {TOTAL_PERCENT} (or send {{}} to clear the split)",
        )
    return resolved


def _matching_versions(given: str, versions: Sequence[ModelVersion]) -> set[str]:
    exact = {v.version for v in versions if given in (v.version, v.tag)}
    if exact:
        return exact
    return {v.version for v in versions if given and v.version.startswith(given)}


def _label(version: ModelVersion) -> str:
    return version.version if version.tag is None else f"{version.version} ({version.tag})"


class LiveStats(BaseModel):
    """One version's results that this gateway routed in the last `window_s`."""

    model_config = ConfigDict(frozen=True)

    window_s: float = Field(examples=[60.0])
    requests: int
    failed: int
    error_rate: float = Field(description="failed / requests; 0 without requests.")
    p50_ms: float | None = Field(
        description="Median of completed_at - submitted_at over the completed results."
    )
    p99_ms: float | None


def percentile(sorted_values: Sequence[float], fraction: float) -> float | None:
    """The nearest-rank percentile of sorted values; None when there are none."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(fraction * len(sorted_values) - 1e-9))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def _entry_time(entry: HistoryEntry) -> float:
    return entry.set_at if isinstance(entry, TrafficWeights) else entry.at


class RolloutState:
    """The weights in force, the bounded history and the live figures of every model, in one gateway."""

    def __init__(
        self,
        *,
        history_size: int,
        window_s: float,
        routed_horizon_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.history_size = history_size
        self.window_s = window_s
        # How long a routed request may wait for its result before it is forgotten here.
        self._routed_horizon_s = routed_horizon_s
        self._clock = clock
        self._weights: dict[str, TrafficWeights] = {}
        self._history: dict[str, list[HistoryEntry]] = {}
        self._seen: dict[str, set[bytes]] = {}  # per model: the entries in its history, as sent
        # request id -> (submitted_at, model, version chosen or None)
        # Ordered so the oldest is found at once: a plain dict's first key is found by skipping
        # every slot its popped results left behind.
        self._routed: OrderedDict[str, tuple[float, str, str | None]] = OrderedDict()
        self._samples: dict[tuple[str, str], deque[tuple[float, bool, float]]] = {}

    # --- weights and history -----------------------------------------------------------------
    def apply(self, entry: HistoryEntry) -> bool:
        """Take one weights change or event (from the topic or an admin call); False when already known."""
        model = entry.model
        data = entry.to_bytes()
        seen = self._seen.setdefault(model, set())
        if data in seen:
            return False
        history = self._history.setdefault(model, [])
        times = [_entry_time(e) for e in history]
        history.insert(bisect.bisect_right(times, _entry_time(entry)), entry)
        seen.add(data)
        while len(history) > self.history_size:
            seen.discard(history.pop(0).to_bytes())
        if isinstance(entry, TrafficWeights):
            current = self._weights.get(model)
            if current is None or entry.set_at >= current.set_at:
                self._weights[model] = entry
                log.info(
                    kv(
                        "traffic_weights_applied",
                        model=model,
                        weights=",".join(f"{v}={w}" for v, w in sorted(entry.weights.items()))
                        or "none",
                        set_at=entry.set_at,
                        set_by=entry.set_by,
                    )
                )
        return True

    def take(self, data: bytes, kind: str | None) -> bool:
        """One message of the rollout topic; a malformed one is logged and skipped."""
        try:
            if kind == WEIGHTS_KIND:
                return self.apply(TrafficWeights.from_bytes(data))
            if kind == EVENT_KIND:
                return self.apply(RolloutEvent.from_bytes(data))
        except ValueError as exc:
            log.warning(kv("malformed_rollout_message", kind=kind, error=exc))
            return False
        log.warning(kv("unknown_rollout_message", kind=kind))
        return False

    def weights(self, model: str) -> dict[str, int]:
        """The split in force for `model` ({}: none)."""
        current = self._weights.get(model)
        return dict(current.weights) if current is not None else {}

    def history(self, model: str) -> list[HistoryEntry]:
        """`model`'s weights changes and events, oldest first (the last `history_size`)."""
        return list(self._history.get(model, ()))

    def choose(self, model: ModelVersion, eligible: Collection[str], key: str) -> str | None:
        """The version of `model` a request with routing `key` goes to, among the `eligible` ones
        (live, serving); None: no split in force, or no weighted version eligible."""
        current = self._weights.get(model.name)
        if current is None or not current.weights:
            return None
        return choose_version(current.weights, eligible, key)

    # --- live figures ------------------------------------------------------------------------
    def routed(self, request_id: str, submitted_at: float, model: str, version: str | None) -> None:
        """Remember a request this gateway published, to count its result in the live figures."""
        self._routed[request_id] = (submitted_at, model, version)
        horizon = self._clock() - self._routed_horizon_s
        # Insertion order is submission order: the oldest come first.
        while self._routed:
            oldest = next(iter(self._routed))
            if self._routed[oldest][0] >= horizon:
                break
            del self._routed[oldest]

    def record_result(self, result: ResultMessage) -> bool:
        """Count `result` in its version's live figures when this gateway routed its request."""
        routed = self._routed.pop(result.request_id, None)
        if routed is None:
            return False
        submitted_at, model, chosen = routed
        # A result the gateway made (an expired request) names no version: the one chosen counts.
        version = result.model_version or chosen
        if version is None:
            return False
        samples = self._samples.get((model, version))
        if samples is None:
            samples = self._samples[(model, version)] = deque(maxlen=_MAX_SAMPLES_PER_VERSION)
        latency_ms = max(0.0, (result.completed_at - submitted_at) * 1000.0)
        samples.append((self._clock(), result.status == "failed", latency_ms))
        return True

    def live(self, model: str, version: str) -> LiveStats:
        """`version`'s results in the last `window_s`: counts, error rate and latency percentiles."""
        samples = self._samples.get((model, version))
        horizon = self._clock() - self.window_s
        while samples and samples[0][0] < horizon:
            samples.popleft()
        requests = len(samples) if samples else 0
        failed = sum(1 for _, bad, _ in samples or () if bad)
        latencies = sorted(ms for _, bad, ms in samples or () if not bad)
        return LiveStats(
            window_s=self.window_s,
            requests=requests,
            failed=failed,
            error_rate=failed / requests if requests else 0.0,
            p50_ms=percentile(latencies, 0.50),
            p99_ms=percentile(latencies, 0.99),
        )


def eligible_versions(registry: ModelRegistry, model: ModelVersion) -> set[str]:
    """The versions of `model` a split may send its requests to: live, and taking the same input
    (the images were fitted to `model`'s)."""
    return {
        v.version
        for v in registry.versions(model.name)
        if v.ready and v.input_shape == model.input_shape and v.dtype == model.dtype
    }


def versions_for(
    rollout: RolloutState,
    registry: ModelRegistry,
    model: ModelVersion,
    owner: str,
    fresh: Sequence[FreshImage],
    pinned: bool,
) -> list[str | None]:
    """The version each image goes to: `model`'s when pinned, else the split's choice (None: the
    model's topic, no split)."""
    if pinned:
        return [model.version] * len(fresh)
    if not rollout.weights(model.name):
        return [None] * len(fresh)
    eligible = eligible_versions(registry, model)
    return [
        rollout.choose(
            model,
            eligible,
            routing_key(owner, image.claim[0] if image.claim else None, image.request_id),
        )
        for image in fresh
    ]


async def publish_by_topic(
    pubsub: PubSub, items: Sequence[tuple[str, Outgoing]], *, timeout_s: float
) -> list[object]:
    """`publish_many` per topic, side by side; per item None or its exception, in `items`' order."""
    by_topic: dict[str, list[int]] = {}
    for index, (topic, _) in enumerate(items):
        by_topic.setdefault(topic, []).append(index)
    if len(by_topic) == 1:  # no split, or all to one version: the plain call
        (topic,) = by_topic
        return list(
            await pubsub.publish_many(topic, [item for _, item in items], timeout_s=timeout_s)
        )
    answers = await asyncio.gather(
        *(
            pubsub.publish_many(topic, [items[i][1] for i in indexes], timeout_s=timeout_s)
            for topic, indexes in by_topic.items()
        )
    )
    outcomes: list[object] = [None] * len(items)
    for indexes, answer in zip(by_topic.values(), answers, strict=True):
        for index, outcome in zip(indexes, answer, strict=True):
            outcomes[index] = outcome
    return outcomes


def rollout_message(entry: HistoryEntry) -> tuple[bytes, str, dict[str, str]]:
    """(payload, key, attributes) of `entry` on the rollout topic."""
    kind = WEIGHTS_KIND if isinstance(entry, TrafficWeights) else EVENT_KIND
    return entry.to_bytes(), entry.model, {KIND_ATTR: kind}


async def subscribe_rollout(pubsub: PubSub, topic: str, group: str) -> Subscription:
    """The rollout topic from its beginning at every start, whatever the group committed: the
    newest weights are in force, and the history is rebuilt."""
    await pubsub.ensure_topics(topic)
    subscription = pubsub.subscribe(topic, group=group, start=0.0)
    try:
        await subscription.start()
    except BaseException:
        await subscription.aclose()
        raise
    return subscription


async def follow_rollout(
    subscription: Subscription, state: RolloutState, caught_up: asyncio.Event, quiet_s: float
) -> None:
    """Apply the rollout topic until cancelled or the subscription ends; `caught_up` is set once
    a receive waited `quiet_s` for nothing (the read-back is done)."""
    try:
        while True:
            try:
                async with asyncio.timeout(None if caught_up.is_set() else quiet_s):
                    messages = await subscription.receive_batch(_ROLLOUT_CHUNK)
            except TimeoutError:
                caught_up.set()
                continue
            if not messages:
                return
            for message in messages:
                state.take(message.data, message.attributes.get(KIND_ATTR))
                await message.ack()
    finally:
        await subscription.aclose()
