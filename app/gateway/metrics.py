"""Gateway telemetry: Prometheus series (one registry per app) and the `/v1/stats` snapshot for the demo page."""

from __future__ import annotations

import math
import time
from collections import Counter as TallyCounter
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from app.protocol import ResultMessage
from app.rollout.compare import ComparisonSummary, JoinedPair
from ml.runner_stats import LatencySummary

ShadowSummaries = Callable[[], Iterable[tuple[str, str, ComparisonSummary]]]

_LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
_FEW = 16  # values below which `observe_many` observes one by one
_SAMPLE_WINDOW = 2048  # recent results kept for percentiles
_RATE_WINDOW_S = 10  # throughput is averaged over this many whole seconds


class GatewayMetrics:
    """Everything the gateway counts. `record_results` is O(results); snapshots do the sorting."""

    def __init__(
        self, in_flight: Callable[[], int], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._clock = clock
        self._in_flight = in_flight
        r = self.registry
        self.http_requests = Counter(
            "fmnist_http_requests",
            "HTTP requests by route, method and status.",
            ["route", "method", "status"],
            registry=r,
        )
        self.http_latency = Histogram(
            "fmnist_http_request_duration_seconds",
            "Time to answer an HTTP request.",
            ["route", "method"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.predictions = Counter(
            "fmnist_predictions",
            "Prediction requests by outcome: accepted, completed, failed, rejected.",
            ["outcome"],
            registry=r,
        )
        self.errors = Counter(
            "fmnist_errors",
            "Errors answered to clients or reported by workers, by code.",
            ["code"],
            registry=r,
        )
        self.in_flight_gauge = Gauge(
            "fmnist_in_flight",
            "Requests accepted by this gateway and not yet answered.",
            registry=r,
        )
        self.in_flight_gauge.set_function(lambda: float(self._in_flight()))
        self.broker_up = Gauge(
            "fmnist_broker_up",
            "1 when the broker is reachable and the results consumer runs.",
            registry=r,
        )
        self.websockets = Gauge("fmnist_websocket_connections", "Open result streams.", registry=r)
        self.batch_size = Histogram(
            "fmnist_batch_size",
            "Batch size that computed each result, as reported by workers.",
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.queue_seconds = Histogram(
            "fmnist_queue_seconds",
            "Time a request waited for its batch, as reported by workers.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_seconds = Histogram(
            "fmnist_inference_seconds",
            "Forward-pass time of the batch that computed each result.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.model_results = Counter(
            "fmnist_model_results",
            "Results by model, version (content hash) and outcome (completed, failed).",
            ["model", "version", "outcome"],
            registry=r,
        )
        self._model_children: dict[tuple[str, str, str], Any] = {}
        self.duplicate_results = Counter(
            "fmnist_duplicate_results",
            "Results dropped because the request id already had one.",
            registry=r,
        )
        self.shadow_samples = Counter(
            "fmnist_shadow_samples",
            "Requests both the live version and a shadow candidate answered (or failed), joined here.",
            ["model", "candidate"],
            registry=r,
        )
        self.shadow_disagreements = Counter(
            "fmnist_shadow_disagreements",
            "Joined requests whose top-1 class differs, by the live and the candidate's class.",
            ["model", "candidate", "live_class", "candidate_class"],
            registry=r,
        )
        self.shadow_inference_seconds = Histogram(
            "fmnist_shadow_inference_seconds",
            "Forward-pass time of joined requests, by side (live, candidate), as workers report it.",
            ["model", "candidate", "side"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        # Bound children, resolved once: `labels()` costs more than the increment itself.
        self._completed = self.predictions.labels("completed")
        self._failed = self.predictions.labels("failed")
        self._accepted = self.predictions.labels("accepted")
        self._rejected = self.predictions.labels("rejected")
        # For /v1/stats.
        self.completed = 0
        self.failed = 0
        self._queue_ms: deque[float] = deque(maxlen=_SAMPLE_WINDOW)
        self._inference_ms: deque[float] = deque(maxlen=_SAMPLE_WINDOW)
        self._batches: TallyCounter[int] = TallyCounter()
        self._recent_batch_ids: deque[str] = deque(maxlen=4096)
        self._recent_batch_set: set[str] = set()
        self._per_second: deque[list[int]] = deque(maxlen=_RATE_WINDOW_S + 1)  # [second, count]

    def record_result(self, result: ResultMessage) -> None:
        """Count one stored (first) result."""
        self.record_results((result,))

    def record_results(self, results: Sequence[ResultMessage]) -> None:
        """Count stored (first) results: one increment per series for the whole chunk, not one per
        result, because the batch path stores thousands a second."""
        by_key: dict[tuple[str, str, str], int] = {}
        failed_codes: dict[str, int] = {}
        queue_s: list[float] = []
        inference_s: list[float] = []
        batch_sizes: list[int] = []
        for result in results:
            key = (result.model or "", result.model_version or "", result.status)
            by_key[key] = by_key.get(key, 0) + 1
            if result.status != "completed" and result.error is not None:
                code = result.error.code
                failed_codes[code] = failed_codes.get(code, 0) + 1
            if result.queue_ms is not None:
                queue_s.append(result.queue_ms / 1000)
            if result.inference_ms is not None:
                inference_s.append(result.inference_ms / 1000)
            if result.batch_size is not None:
                batch_sizes.append(result.batch_size)
                self._count_batch(result.batch_id, result.batch_size)
        completed = 0
        for series, count in by_key.items():
            child = self._model_children.get(series)
            if child is None:
                child = self._model_children[series] = self.model_results.labels(*series)
            child.inc(count)
            if series[2] == "completed":
                completed += count
        failed = len(results) - completed
        if completed:
            self.completed += completed
            self._completed.inc(completed)
        if failed:
            self.failed += failed
            self._failed.inc(failed)
        for code, count in failed_codes.items():
            self.errors.labels(code).inc(count)
        self._queue_ms.extend(value * 1000 for value in queue_s)
        self._inference_ms.extend(value * 1000 for value in inference_s)
        observe_many(self.queue_seconds, queue_s)
        observe_many(self.inference_seconds, inference_s)
        observe_many(self.batch_size, batch_sizes)
        if results:
            self._count_second(len(results))

    def _count_batch(self, batch_id: str | None, batch_size: int) -> None:
        """Every result of a batch carries its size: count each batch once for the distribution."""
        if batch_id is not None and batch_id in self._recent_batch_set:
            return
        self._batches[batch_size] += 1
        if batch_id is not None:
            if len(self._recent_batch_ids) == self._recent_batch_ids.maxlen:
                self._recent_batch_set.discard(self._recent_batch_ids[0])
            self._recent_batch_ids.append(batch_id)
            self._recent_batch_set.add(batch_id)

    def _count_second(self, count: int) -> None:
        second = int(self._clock())
        if self._per_second and self._per_second[-1][0] == second:
            self._per_second[-1][1] += count
        else:
            self._per_second.append([second, count])

    def record_shadow_pair(
        self, model: str, candidate: str, class_names: tuple[str, ...], pair: JoinedPair
    ) -> None:
        """Count one request joined between the live version and `candidate`."""
        self.shadow_samples.labels(model, candidate).inc()
        live, shadow = pair.live.label, pair.candidate.label
        if live is not None and shadow is not None and live != shadow:
            self.shadow_disagreements.labels(
                model, candidate, _class_name(class_names, live), _class_name(class_names, shadow)
            ).inc()
        for side, answer in (("live", pair.live), ("candidate", pair.candidate)):
            if answer.inference_ms is not None:
                self.shadow_inference_seconds.labels(model, candidate, side).observe(
                    answer.inference_ms / 1000
                )

    def watch_shadow(self, summaries: ShadowSummaries) -> None:
        """Serve the shadow gauges (agreement, accuracies) from `summaries`, computed per scrape."""
        self.registry.register(_ShadowGauges(summaries))

    def record_rejection(self, code: str) -> None:
        self._rejected.inc()
        self.errors.labels(code).inc()

    def record_accepted(self, count: int = 1) -> None:
        self._accepted.inc(count)

    def throughput_per_s(self) -> float:
        now = int(self._clock())
        window_start = now - _RATE_WINDOW_S
        total = sum(count for second, count in self._per_second if window_start <= second < now)
        return total / _RATE_WINDOW_S

    def stats_snapshot(self) -> dict[str, Any]:
        """The `/v1/stats` body."""
        return {
            "in_flight": self._in_flight(),
            "completed": self.completed,
            "failed": self.failed,
            "throughput_per_s": round(self.throughput_per_s(), 2),
            "batch_sizes": {str(size): n for size, n in sorted(self._batches.items())},
            "queue_ms": _percentiles(self._queue_ms),
            "inference_ms": _percentiles(self._inference_ms),
        }

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def observe_many(histogram: Histogram, values: Sequence[float]) -> None:
    """`histogram.observe(v)` for each of `values`, with one increment per bucket: prometheus_client
    finds each value's bucket in a Python loop and takes a lock per call, which cost more than the
    rest of a result's bookkeeping. Falls back to `observe` on a client without these internals."""
    if not values:
        return
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if (
        len(values) < _FEW  # numpy's fixed cost pays for a chunk, not for a few values
        or bounds is None
        or buckets is None
        or total is None
        or len(bounds) != len(buckets)
    ):
        for value in values:
            histogram.observe(value)
        return
    # The first bound >= value, as `Histogram.observe` picks it (`value <= bound`).
    indices = np.searchsorted(bounds, values, side="left")
    # A NaN belongs to no bucket (it is <= no bound), as with `observe`.
    counts = np.bincount(indices, minlength=len(bounds))[: len(bounds)]
    for index in np.flatnonzero(counts):
        buckets[index].inc(int(counts[index]))
    total.inc(math.fsum(values))


def _class_name(class_names: tuple[str, ...], label: int) -> str:
    return class_names[label] if 0 <= label < len(class_names) else str(label)


class _ShadowGauges(Collector):
    """`fmnist_shadow_agreement` and the accuracy gauges, over each comparison's window."""

    def __init__(self, summaries: ShadowSummaries) -> None:
        self._summaries = summaries

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(self._families())

    def collect(self) -> Iterator[GaugeMetricFamily]:
        families = self._families()
        agreement, live_accuracy, candidate_accuracy = families
        for model, candidate, summary in self._summaries():
            for family, value in (
                (agreement, summary.agreement),
                (live_accuracy, summary.live_accuracy),
                (candidate_accuracy, summary.candidate_accuracy),
            ):
                if not math.isnan(value):
                    family.add_metric([model, candidate], value)
        return iter(families)

    @staticmethod
    def _families() -> list[GaugeMetricFamily]:
        labels = ["model", "candidate"]
        return [
            GaugeMetricFamily(
                "fmnist_shadow_agreement",
                "Share of the recent joined requests (FMNIST_SHADOW_WINDOW) where the candidate's "
                "top-1 class equals the live version's.",
                labels=labels,
            ),
            GaugeMetricFamily(
                "fmnist_shadow_live_accuracy",
                "The live version's accuracy on the recent joined requests that carry a label.",
                labels=labels,
            ),
            GaugeMetricFamily(
                "fmnist_shadow_candidate_accuracy",
                "The candidate's accuracy on the recent joined requests that carry a label.",
                labels=labels,
            ),
        ]


def _percentiles(samples: deque[float]) -> dict[str, float | None]:
    if not samples:
        return {"p50": None, "p99": None}
    summary = LatencySummary.of(samples)
    return {"p50": round(summary.p50, 3), "p99": round(summary.p99, 3)}
