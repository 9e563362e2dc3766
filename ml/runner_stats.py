"""What a `ModelRunner` reports about itself: counts, batch sizes, and latency percentiles."""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["TIMING_WINDOW", "LatencySummary", "RunnerCounters", "RunnerStats"]

# How many recent per-image timings the stats keep for percentiles: recent enough to follow the load.
TIMING_WINDOW = 8192


@dataclass(frozen=True, slots=True)
class LatencySummary:
    """Percentiles over the most recent images (window of a few thousand)."""

    count: int
    p50: float
    p90: float
    p99: float
    max: float

    @classmethod
    def of(cls, samples: Sequence[float]) -> LatencySummary:
        if not samples:
            return cls(0, 0.0, 0.0, 0.0, 0.0)
        ordered = np.asarray(samples, dtype=np.float64)
        p50, p90, p99 = np.percentile(ordered, [50, 90, 99])
        return cls(len(samples), float(p50), float(p90), float(p99), float(ordered.max()))


@dataclass(frozen=True, slots=True)
class RunnerStats:
    """A snapshot of the runner for metrics and `/v1/stats`."""

    queue_depth: int
    """Images submitted and not yet handed to the model."""
    computing: int
    """Images handed to the model: in passes computing now, or queued for a free executor thread."""
    submitted: int
    completed: int
    failed: dict[str, int]
    """Failed images by error code (`deadline_exceeded`, `model_error`, …)."""
    batches: int
    batch_sizes: dict[int, int]
    """How many forward passes ran at each batch size."""
    queue_ms: LatencySummary
    """Time from `submit` to the start of the image's forward pass."""
    inference_ms: LatencySummary
    """Duration of the forward pass each image was part of."""


@dataclass(slots=True)
class RunnerCounters:
    """What the runner counts as it goes; `snapshot` turns it into `RunnerStats`."""

    submitted: int = 0
    completed: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    batches: int = 0
    batch_sizes: Counter[int] = field(default_factory=Counter)
    queue_ms: deque[float] = field(default_factory=lambda: deque(maxlen=TIMING_WINDOW))
    inference_ms: deque[float] = field(default_factory=lambda: deque(maxlen=TIMING_WINDOW))

    def snapshot(self, queue_depth: int, computing: int) -> RunnerStats:
        return RunnerStats(
            queue_depth=queue_depth,
            computing=computing,
            submitted=self.submitted,
            completed=self.completed,
            failed=dict(self.failed),
            batches=self.batches,
            batch_sizes=dict(sorted(self.batch_sizes.items())),
            queue_ms=LatencySummary.of(self.queue_ms),
            inference_ms=LatencySummary.of(self.inference_ms),
        )
