"""Shadow comparison in the gateway: candidate versions' results joined with the live ones by request id.

    fmnist.results.shadow ──subscribe (group `gateway-<id>-shadow`, from now)──▶ add_shadow ─┐
    live results this gateway stores (ResultsFeed.result_listeners) ─────────▶ add_live ───┤
                                                      one ShadowComparison per (model, candidate)
                                                                                            ▼
                           GET /v1/models/{name}/shadow, fmnist_shadow_* metrics, the demo page

Shadow workers (`app.worker.shadow`) publish to their own topic, so nothing here is on the way of a
client's request: a shadow result is never stored as a result. With shared state each gateway
compares only the results of the requests it accepted (the `gateway` attribute), as live results
are routed. A gateway that is not compared against any shadow pays one dict lookup per live result.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

from app.gateway.metrics import GatewayMetrics
from app.gateway.registry import ModelRegistry
from app.logs import kv
from app.protocol import GATEWAY_ATTR, ResultMessage
from app.rollout.compare import Answer, Comparison, ComparisonSummary, JoinedPair, true_label
from app.settings import Settings
from messaging import PubSub, Subscription

log = logging.getLogger(__name__)

_CHUNK = 512
_MAX_BACKOFF_S = 5.0
_REFRESH_S = 1.0  # how often the candidates fed with live results follow the registry
_MAX_UNACKED = 4096
# A live result read back from before the gateway started can still pair with a shadow result the
# gateway reads, when the shadow answered a little later than the live version.
_READ_BACK_MARGIN_S = 30.0


class ShadowComparison(Comparison):
    """A `Comparison` for a long-running gateway: it keeps about the newest `window` pairs (trimmed
    in steps, so a join stays O(1) on average) and reports each join to `on_pair`."""

    def __init__(
        self,
        model: str,
        candidate: str,
        class_names: tuple[str, ...],
        *,
        window: int,
        on_pair: Callable[[ShadowComparison, JoinedPair], None] | None = None,
    ) -> None:
        super().__init__(class_names, max_pending=window)
        self.model = model
        self.candidate = candidate
        self.since = time.time()
        self.window = window
        self._on_pair = on_pair

    def _join(self, pair: JoinedPair) -> None:
        super()._join(pair)
        if self._on_pair is not None:
            self._on_pair(self, pair)
        if len(self.pairs) > self.window + max(1, self.window // 10):
            del self.pairs[: len(self.pairs) - self.window]
            # A redelivered answer to a pair trimmed here could pair again: rare, and only counted.
            self._joined = {p.request_id for p in self.pairs}

    def to_json(self) -> dict[str, Any]:
        """The candidate's entry of `GET /v1/models/{name}/shadow`."""
        return candidate_json(self.candidate, self.summary(), self.since)


def candidate_json(candidate: str, summary: ComparisonSummary, since: float) -> dict[str, Any]:
    """One candidate's figures, as the shadow endpoint serves them (NaN becomes null)."""

    def number(value: float) -> float | None:
        return None if math.isnan(value) else round(value, 6)

    def latency(count: int, p50: float, p99: float) -> dict[str, float | None]:
        if not count:
            return {"p50": None, "p99": None}
        return {"p50": round(p50, 3), "p99": round(p99, 3)}

    names = summary.class_names
    disagreement: dict[str, dict[str, int]] = {}
    for i, row in enumerate(summary.disagreements):
        cells = {names[j]: n for j, n in enumerate(row) if j != i and n}
        if cells:
            disagreement[names[i]] = cells
    live, candidate_ms = summary.live_inference_ms, summary.candidate_inference_ms
    return {
        "version": candidate,
        "samples": summary.pairs,
        "agreement": number(summary.agreement),
        "disagreement": disagreement,
        "labelled": summary.labelled,
        "live_accuracy": number(summary.live_accuracy),
        "candidate_accuracy": number(summary.candidate_accuracy),
        "live_latency_ms": latency(live.count, live.p50, live.p99),
        "candidate_latency_ms": latency(candidate_ms.count, candidate_ms.p50, candidate_ms.p99),
        "dropped": summary.unmatched.get("dropped", 0),
        "since": since,
    }


class ShadowMonitor:
    """Every candidate version compared on this gateway: reads the shadow results, takes the live
    results this gateway stores (`add_live`), and summarises each pair of versions."""

    def __init__(
        self,
        settings: Settings,
        registry: ModelRegistry,
        metrics: GatewayMetrics,
        *,
        gateway_id: str,
        live_result: Callable[[str], ResultMessage | None] = lambda request_id: None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.metrics = metrics
        self.gateway_id = gateway_id
        self.group = f"gateway-{gateway_id}-shadow"
        # With shared state a gateway sees only its own requests' live results: compare only those.
        self.own_only = bool(settings.shared_state_url)
        self._live_result = live_result
        self._comparisons: dict[str, dict[str, ShadowComparison]] = {}  # model -> candidate -> it
        # What a live result feeds: the comparisons of candidates with a live shadow worker.
        self._fed: dict[str, list[ShadowComparison]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.reading = False
        self._reading_since = time.time()  # shadow results are read from this time on
        metrics.watch_shadow(self.summaries)

    # --- the join -------------------------------------------------------------------------------

    def add_live(self, result: ResultMessage) -> None:
        """A live result this gateway stored: the live side of every running candidate of its model."""
        fed = self._fed.get(result.model or "")
        if not fed or result.completed_at < self._reading_since - _READ_BACK_MARGIN_S:
            return  # no candidate, or read back from before the shadow results are read
        for comparison in fed:
            if comparison.candidate == result.model_version:
                continue  # the candidate answering live traffic itself (a canary) is no baseline
            truth = true_label(result.metadata, len(comparison.class_names))
            comparison.add_live(result.request_id, _answer(result), truth)

    def add_shadow(self, result: ResultMessage) -> None:
        """A candidate's result: its side of the comparison of its model and version."""
        model, candidate = result.model or "", result.model_version or ""
        comparison = self._comparison(model, candidate)
        if comparison is None:
            log.warning(kv("shadow_result_unknown_model", model=model, version=candidate))
            return
        if comparison not in self._fed.setdefault(model, []):
            self._fed[model].append(comparison)
        # The live answer may have been stored before this comparison was fed (a shadow that just
        # started): take it from the result store. A live answer already taken is not taken twice.
        live = self._live_result(result.request_id)
        if live is not None and live.model == model and live.model_version != candidate:
            truth = true_label(live.metadata, len(comparison.class_names))
            comparison.add_live(live.request_id, _answer(live), truth)
        comparison.add_candidate(result.request_id, _answer(result))

    def _comparison(self, model: str, candidate: str) -> ShadowComparison | None:
        """The comparison of `candidate` of `model`, created with the candidate's classes (None
        while the registry has not learned it)."""
        comparisons = self._comparisons.setdefault(model, {})
        comparison = comparisons.get(candidate)
        if comparison is not None:
            return comparison
        versions = self.registry.versions(model)
        # The live version's class names, which the true labels use too; else the candidate's.
        known = (
            [v for v in versions if v.ready]
            or [v for v in versions if v.version == candidate]
            or versions
        )
        if not known:
            return None
        comparison = ShadowComparison(
            model,
            candidate,
            known[0].class_names,
            window=self.settings.shadow_window,
            on_pair=self._count_pair,
        )
        comparisons[candidate] = comparison
        log.info(kv("shadow_comparison_started", model=model, candidate=candidate))
        return comparison

    def _count_pair(self, comparison: ShadowComparison, pair: JoinedPair) -> None:
        self.metrics.record_shadow_pair(
            comparison.model, comparison.candidate, comparison.class_names, pair
        )

    def follow_registry(self) -> None:
        """Feed live results to the candidates with a live shadow worker (and only those)."""
        fed: dict[str, list[ShadowComparison]] = {}
        for model in self.registry.names():
            for version in self.registry.versions(model):
                if version.shadow_workers:
                    comparison = self._comparison(model, version.version)
                    if comparison is not None:
                        fed.setdefault(model, []).append(comparison)
        self._fed = fed

    # --- reports --------------------------------------------------------------------------------

    def candidates(self, model: str) -> list[dict[str, Any]]:
        """`model`'s candidates, newest comparison first, as `GET /v1/models/{name}/shadow` lists them."""
        comparisons = sorted(self._comparisons.get(model, {}).values(), key=lambda c: -c.since)
        return [comparison.to_json() for comparison in comparisons]

    def summaries(self) -> Iterator[tuple[str, str, ComparisonSummary]]:
        """(model, candidate, summary) of every comparison, for the gauges."""
        for model, comparisons in self._comparisons.items():
            for candidate, comparison in comparisons.items():
                yield model, candidate, comparison.summary()

    # --- reading the shadow results --------------------------------------------------------------

    async def start(self) -> None:
        self._reading_since = time.time()
        self._tasks = [asyncio.create_task(self._refresh(), name="fmnist-shadow-registry")]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    async def _refresh(self) -> None:
        while True:
            self.follow_registry()
            await asyncio.sleep(_REFRESH_S)

    async def read(self, pubsub: PubSub) -> None:
        """Read the shadow results topic from now on the gateway's broker connection, until it is
        cancelled; a failure is logged and ends only the comparison (the next connection reads again),
        never the live path."""
        try:
            await pubsub.ensure_topics(self.settings.shadow_results_topic)
            subscription = pubsub.subscribe(
                self.settings.shadow_results_topic,
                group=self.group,
                start=time.time(),
                max_in_flight=_MAX_UNACKED,
            )
            async with subscription:
                self.reading = True
                await self._consume(subscription)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the live path goes on; the comparison resumes on reconnect
            log.warning(kv("shadow_results_unavailable", error=exc))
        finally:
            self.reading = False

    async def _consume(self, subscription: Subscription) -> None:
        while messages := await subscription.receive_batch(_CHUNK):
            for message in messages:
                gateway = message.attributes.get(GATEWAY_ATTR)
                if not self.own_only or gateway == self.gateway_id:
                    try:
                        result = ResultMessage.from_bytes(message.data)
                    except ValueError as exc:
                        log.warning(kv("malformed_shadow_result", key=message.key, error=exc))
                    else:
                        self.add_shadow(result)
                await message.ack()


def _answer(result: ResultMessage) -> Answer:
    label = result.label if result.status == "completed" else None
    return Answer(label=label, inference_ms=result.inference_ms)
