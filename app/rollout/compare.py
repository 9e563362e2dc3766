"""Live against candidate: answers joined by request id, and what they agree on.

```python
comparison = Comparison(class_names)
comparison.add_live("r1", Answer(label=3, inference_ms=2.1), truth=3)
comparison.add_candidate("r1", Answer(label=5, inference_ms=1.4))
summary = comparison.summary()  # agreement, live-vs-candidate confusion, accuracy, latency
```

Either side may come first; a pair counts once both have answered, and only the first answer per
request id and side counts (a redelivered request may be answered twice). Answers still waiting for
their other side are bounded (`max_pending`): the oldest is dropped first, and counted, so a side
that never answers cannot grow the memory of a long-running shadow comparison.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ml.runner_stats import LatencySummary

__all__ = [
    "Answer",
    "Comparison",
    "ComparisonSummary",
    "JoinedPair",
    "accuracy",
    "agreement",
    "disagreement_matrix",
    "true_label",
]

LABEL_KEY = "label"  # the metadata key `fmnist send-images` puts the true class in
DEFAULT_MAX_PENDING = 100_000  # answers waiting for their other side before the oldest is dropped

Side = Literal["live", "candidate"]


@dataclass(frozen=True, slots=True)
class Answer:
    """One side's answer to one request: the predicted class (None: the request failed there)."""

    label: int | None
    inference_ms: float | None = None


@dataclass(frozen=True, slots=True)
class JoinedPair:
    """Both sides' answers to one request, with its true class where the request carried one."""

    request_id: str
    live: Answer
    candidate: Answer
    truth: int | None = None


def true_label(metadata: Mapping[str, str], num_classes: int | None = None) -> int | None:
    """The true class in a request's metadata (`{"label": "3"}`), or None when it carries none, or
    one that is not a class index (not an integer, negative, or not below `num_classes`)."""
    text = metadata.get(LABEL_KEY)
    if text is None:
        return None
    try:
        label = int(text)
    except ValueError:
        return None
    if label < 0 or (num_classes is not None and label >= num_classes):
        return None
    return label


def _answered(pairs: Iterable[JoinedPair]) -> list[JoinedPair]:
    return [p for p in pairs if p.live.label is not None and p.candidate.label is not None]


def agreement(pairs: Iterable[JoinedPair]) -> float:
    """The share of pairs, among those both sides answered, whose top-1 classes are equal (NaN: none)."""
    answered = _answered(pairs)
    if not answered:
        return math.nan
    return sum(p.live.label == p.candidate.label for p in answered) / len(answered)


def disagreement_matrix(pairs: Iterable[JoinedPair], num_classes: int) -> list[list[int]]:
    """Counts of (live class, candidate class) over the pairs both sides answered: rows are the live
    class, columns the candidate's; the diagonal is where they agree."""
    matrix = [[0] * num_classes for _ in range(num_classes)]
    for pair in _answered(pairs):
        live, candidate = pair.live.label, pair.candidate.label
        assert live is not None and candidate is not None  # _answered kept only these
        if 0 <= live < num_classes and 0 <= candidate < num_classes:
            matrix[live][candidate] += 1
    return matrix


def accuracy(pairs: Iterable[JoinedPair], side: Side) -> tuple[float, int]:
    """`side`'s accuracy on the pairs that carry a true class, and how many those are; a failed
    answer counts as wrong (NaN when no pair is labelled)."""
    labelled = [p for p in pairs if p.truth is not None]
    if not labelled:
        return math.nan, 0
    correct = sum(getattr(p, side).label == p.truth for p in labelled)
    return correct / len(labelled), len(labelled)


@dataclass(frozen=True)
class ComparisonSummary:
    """What a comparison found: the headline figures and the live-vs-candidate confusion matrix."""

    class_names: tuple[str, ...]
    pairs: int
    """Requests both sides answered or failed."""
    agreement: float
    """Share of the pairs both sides answered with the same top-1 class (NaN: none)."""
    disagreements: list[list[int]]
    """Rows: the live class; columns: the candidate's class."""
    labelled: int
    live_accuracy: float
    candidate_accuracy: float
    live_failed: int
    candidate_failed: int
    live_inference_ms: LatencySummary
    candidate_inference_ms: LatencySummary
    unmatched: dict[str, int] = field(default_factory=dict)
    """Answers with no other side yet (`live`, `candidate`), and those dropped past `max_pending`."""

    @property
    def agreed(self) -> int:
        return sum(self.disagreements[i][i] for i in range(len(self.disagreements)))

    def agreement_by_class(self) -> list[float]:
        """For each live class, the share of its pairs the candidate put in the same class (NaN: none)."""
        return [
            row[i] / sum(row) if sum(row) else math.nan for i, row in enumerate(self.disagreements)
        ]

    def top_disagreements(self, limit: int = 5) -> list[tuple[str, str, int]]:
        """The most frequent (live class, candidate class, count) off the diagonal, largest first."""
        cells = [
            (self.class_names[i], self.class_names[j], count)
            for i, row in enumerate(self.disagreements)
            for j, count in enumerate(row)
            if i != j and count
        ]
        return sorted(cells, key=lambda cell: -cell[2])[:limit]

    def to_json(self) -> dict[str, Any]:
        """The summary as JSON-ready data (NaN becomes null)."""

        def number(value: float) -> float | None:
            return None if math.isnan(value) else value

        def latency(summary: LatencySummary) -> dict[str, float | int]:
            return {
                "count": summary.count,
                "p50": summary.p50,
                "p90": summary.p90,
                "p99": summary.p99,
                "max": summary.max,
            }

        return {
            "class_names": list(self.class_names),
            "pairs": self.pairs,
            "agreement": number(self.agreement),
            "disagreements": self.disagreements,
            "labelled": self.labelled,
            "live_accuracy": number(self.live_accuracy),
            "candidate_accuracy": number(self.candidate_accuracy),
            "live_failed": self.live_failed,
            "candidate_failed": self.candidate_failed,
            "live_inference_ms": latency(self.live_inference_ms),
            "candidate_inference_ms": latency(self.candidate_inference_ms),
            "unmatched": dict(self.unmatched),
        }

    def headline(self) -> list[str]:
        """The figures a person reads first, one per line."""

        def percent(value: float) -> str:
            return "n/a" if math.isnan(value) else f"{value:.2%}"

        def ms(summary: LatencySummary) -> str:
            if not summary.count:
                return "n/a"
            return f"p50 {summary.p50:.2f}  p90 {summary.p90:.2f}  p99 {summary.p99:.2f}"

        answered = sum(sum(row) for row in self.disagreements)
        lines = [
            f"compared       {self.pairs} requests ({self.live_failed} failed live, "
            f"{self.candidate_failed} failed on the candidate)",
            f"agreement      {percent(self.agreement)} ({self.agreed}/{answered} same top-1 class)",
            f"accuracy       live {percent(self.live_accuracy)}, candidate "
            f"{percent(self.candidate_accuracy)} ({self.labelled} labelled)",
            f"inference ms   live {ms(self.live_inference_ms)}",
            f"               candidate {ms(self.candidate_inference_ms)}",
        ]
        top = self.top_disagreements(3)
        if top:
            cells = ", ".join(f"{live} -> {candidate} ({n})" for live, candidate, n in top)
            lines.append(f"disagree most  {cells}")
        return lines


class Comparison:
    """Accumulates live and candidate answers, joins them by request id, and summarises the pairs.

    Either side may arrive first; the first answer per request id and side counts. At most
    `max_pending` answers wait for their other side: past it the oldest is dropped (and counted)."""

    def __init__(
        self, class_names: Sequence[str], *, max_pending: int = DEFAULT_MAX_PENDING
    ) -> None:
        if not class_names:
            raise ValueError("class_names must name at least one class")
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self.class_names = tuple(class_names)
        self.max_pending = max_pending
        self.pairs: list[JoinedPair] = []
        self._joined: set[str] = set()
        self._live: OrderedDict[str, tuple[Answer, int | None]] = OrderedDict()
        self._candidate: OrderedDict[str, Answer] = OrderedDict()
        self.dropped = 0

    def add_live(self, request_id: str, answer: Answer, truth: int | None = None) -> None:
        """The live version's answer to `request_id`, with the request's true class if it has one."""
        if request_id in self._joined or request_id in self._live:
            return
        candidate = self._candidate.pop(request_id, None)
        if candidate is None:
            self._live[request_id] = (answer, truth)
            self._bound(self._live)
        else:
            self._join(JoinedPair(request_id, answer, candidate, truth))

    def add_candidate(self, request_id: str, answer: Answer) -> None:
        """The candidate's answer to `request_id`."""
        if request_id in self._joined or request_id in self._candidate:
            return
        waiting = self._live.pop(request_id, None)
        if waiting is None:
            self._candidate[request_id] = answer
            self._bound(self._candidate)
        else:
            live, truth = waiting
            self._join(JoinedPair(request_id, live, answer, truth))

    def _join(self, pair: JoinedPair) -> None:
        self._joined.add(pair.request_id)
        self.pairs.append(pair)

    def _bound(self, waiting: OrderedDict[str, Any]) -> None:
        while len(waiting) > self.max_pending:
            waiting.popitem(last=False)
            self.dropped += 1

    def waiting_for_live(self) -> set[str]:
        """Request ids the candidate answered that have no live answer yet."""
        return set(self._candidate)

    def summary(self) -> ComparisonSummary:
        pairs = self.pairs
        live_accuracy, labelled = accuracy(pairs, "live")
        candidate_accuracy, _ = accuracy(pairs, "candidate")
        return ComparisonSummary(
            class_names=self.class_names,
            pairs=len(pairs),
            agreement=agreement(pairs),
            disagreements=disagreement_matrix(pairs, len(self.class_names)),
            labelled=labelled,
            live_accuracy=live_accuracy,
            candidate_accuracy=candidate_accuracy,
            live_failed=sum(p.live.label is None for p in pairs),
            candidate_failed=sum(p.candidate.label is None for p in pairs),
            live_inference_ms=_latency(p.live.inference_ms for p in pairs),
            candidate_inference_ms=_latency(p.candidate.inference_ms for p in pairs),
            unmatched={
                "live": len(self._live),
                "candidate": len(self._candidate),
                "dropped": self.dropped,
            },
        )


def _latency(values: Iterable[float | None]) -> LatencySummary:
    return LatencySummary.of([v for v in values if v is not None])
