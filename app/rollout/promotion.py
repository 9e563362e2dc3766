"""Gated promotion as a state machine: observations in, decisions out, no I/O.

```python
promotion = Promotion(model="fmnist", live="c90190025781", candidate="5d0c2e9a41b7", policy=policy)
promotion.start()                        # started: the policy as figures
promotion.gate(GateFigures.from_shadow(entry))   # gate_passed, or gate_failed (then it is over)
while not promotion.done:
    decision = promotion.next_step()     # step: the weights to set (or promoted after the last one)
    for observation in watched_for_step_s:
        if rollback := promotion.observe(observation):   # rolled_back: the live version at 100
            break
```

`fmnist promote` (app/cli/promote.py) drives it over HTTP; every decision it returns becomes a
`RolloutEvent` on the rollout topic. The gate reads the candidate's figures from its shadow comparison
or from a replay (both `app.rollout.compare` summaries); each step watches both versions' live stats
and rolls back when the candidate's error rate or p99 regresses past the policy's bound.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from app.rollout.compare import ComparisonSummary

__all__ = [
    "Decision",
    "GateFigures",
    "Observation",
    "Promotion",
    "PromotionError",
    "PromotionPolicy",
    "VersionStats",
    "choose_live",
    "parse_steps",
    "resolve_version",
]

Action = Literal[
    "started", "gate_passed", "gate_failed", "step", "rolled_back", "promoted", "aborted"
]
State = Literal["new", "gating", "stepping", "promoted", "refused", "rolled_back", "aborted"]
DEFAULT_STEPS = (10, 50, 100)


class PromotionError(ValueError):
    """A promotion that cannot start or go on as asked: the message says what to change."""


@dataclass(frozen=True)
class PromotionPolicy:
    """The gates and the bounds of one promotion.

    The gate holds when the candidate was compared on at least `min_samples` requests, agrees with the
    live version on at least `min_agreement` of them, and is right on at least `min_accuracy` of the
    labelled ones. A step rolls back when the candidate's error rate exceeds the live version's by more
    than `max_error_rate`, or its p99 latency exceeds `max_p99_ratio` times the live version's (judged
    once each side has `min_p99_requests` results in the window: the p99 of a few is their slowest,
    often a cold start), and a
    step the candidate answered fewer than `min_step_requests` requests in is not evidence enough to
    go on (the promotion aborts, the live version back at 100)."""

    min_agreement: float
    min_accuracy: float
    min_samples: int
    steps: tuple[int, ...] = DEFAULT_STEPS
    max_error_rate: float = 0.01
    max_p99_ratio: float = 2.0
    min_step_requests: int = 0
    min_p99_requests: int = 20

    def __post_init__(self) -> None:
        for name in ("min_agreement", "min_accuracy", "max_error_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise PromotionError(f"{name} must be a share between 0 and 1, got {value}")
        if self.min_samples < 1:
            raise PromotionError(f"min_samples must be >= 1, got {self.min_samples}")
        for name in ("min_step_requests", "min_p99_requests"):
            if getattr(self, name) < 0:
                raise PromotionError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.max_p99_ratio > 0:
            raise PromotionError(f"max_p99_ratio must be > 0, got {self.max_p99_ratio}")
        check_steps(self.steps)

    def figures(self) -> dict[str, float]:
        return {
            "min_agreement": self.min_agreement,
            "min_accuracy": self.min_accuracy,
            "min_samples": float(self.min_samples),
            "max_error_rate": self.max_error_rate,
            "max_p99_ratio": self.max_p99_ratio,
            "min_step_requests": float(self.min_step_requests),
            "min_p99_requests": float(self.min_p99_requests),
        }


def check_steps(steps: Sequence[int]) -> tuple[int, ...]:
    """`steps` if they rise strictly within 1..100 and end at 100; else PromotionError."""
    steps = tuple(steps)
    if not steps or steps[-1] != 100:
        raise PromotionError(
            f"steps must end at 100 (the candidate takes all traffic), got {steps}"
        )
    if any(not 0 < step <= 100 for step in steps):
        raise PromotionError(f"steps are percents between 1 and 100, got {steps}")
    if any(a >= b for a, b in itertools.pairwise(steps)):
        raise PromotionError(f"steps must rise, got {steps}")
    return steps


def parse_steps(text: str) -> tuple[int, ...]:
    """`10,50,100` as (10, 50, 100); PromotionError on anything else."""
    try:
        steps = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise PromotionError(
            f"steps are comma-separated percents (10,50,100), got {text!r}"
        ) from None
    return check_steps(steps)


@dataclass(frozen=True)
class GateFigures:
    """What the gate judges: how the candidate compared with the live version on the same requests.
    None: unknown (no request both answered, or none carried a label)."""

    source: Literal["shadow", "replay"]
    samples: int
    agreement: float | None
    labelled: int
    candidate_accuracy: float | None
    live_accuracy: float | None = None

    @classmethod
    def from_shadow(cls, entry: Mapping[str, Any]) -> GateFigures:
        """From one candidate of `GET /v1/models/{name}/shadow`."""
        return cls(
            source="shadow",
            samples=int(entry.get("samples") or 0),
            agreement=_number(entry.get("agreement")),
            labelled=int(entry.get("labelled") or 0),
            candidate_accuracy=_number(entry.get("candidate_accuracy")),
            live_accuracy=_number(entry.get("live_accuracy")),
        )

    @classmethod
    def from_replay(cls, summary: ComparisonSummary) -> GateFigures:
        """From a replay's comparison (`fmnist replay`, `--replay-last`)."""
        return cls(
            source="replay",
            samples=summary.pairs,
            agreement=_number(summary.agreement),
            labelled=summary.labelled,
            candidate_accuracy=_number(summary.candidate_accuracy),
            live_accuracy=_number(summary.live_accuracy),
        )

    def figures(self) -> dict[str, float]:
        known = {
            "samples": float(self.samples),
            "agreement": self.agreement,
            "labelled": float(self.labelled),
            "candidate_accuracy": self.candidate_accuracy,
            "live_accuracy": self.live_accuracy,
        }
        return {key: value for key, value in known.items() if value is not None}


@dataclass(frozen=True)
class VersionStats:
    """One version's live results over the gateway's window (`versions[].live` of GET /v1/models)."""

    requests: int = 0
    failed: int = 0
    p99_ms: float | None = None

    @property
    def error_rate(self) -> float | None:
        return self.failed / self.requests if self.requests else None

    @classmethod
    def from_json(cls, live: Mapping[str, Any] | None) -> VersionStats:
        if not live:
            return cls()
        return cls(
            requests=int(live.get("requests") or 0),
            failed=int(live.get("failed") or 0),
            p99_ms=_number(live.get("p99_ms")),
        )


@dataclass(frozen=True)
class Observation:
    """The live version's and the candidate's live stats at one moment of a step."""

    live: VersionStats
    candidate: VersionStats

    def figures(self) -> dict[str, float]:
        known: dict[str, float | None] = {}
        for side, stats in (("live", self.live), ("candidate", self.candidate)):
            known[f"{side}_requests"] = float(stats.requests)
            known[f"{side}_error_rate"] = stats.error_rate
            known[f"{side}_p99_ms"] = stats.p99_ms
        return {key: value for key, value in known.items() if value is not None}


@dataclass(frozen=True)
class Decision:
    """One decision: what was done, the figures it was taken on, the split after it."""

    action: Action
    weights: dict[str, int]
    figures: dict[str, float] = field(default_factory=dict)
    detail: str = ""

    def event_body(self, model: str, candidate: str) -> dict[str, Any]:
        """The body of `POST /v1/models/{name}/history`: a `RolloutEvent` without `at` and `by`."""
        return {
            "model": model,
            "candidate": candidate,
            "action": self.action,
            "figures": dict(self.figures),
            "weights": dict(self.weights),
            "detail": self.detail,
        }


class Promotion:
    """One promotion of `candidate` over `live`: `start`, `gate`, then `next_step` / `observe` until
    `done`; `abort` at any time. Each call returns the decision to record (and the weights to set)."""

    def __init__(
        self,
        *,
        model: str,
        live: str,
        candidate: str,
        policy: PromotionPolicy,
        initial_weights: Mapping[str, int] | None = None,
    ) -> None:
        if live == candidate:
            raise PromotionError(f"the candidate {candidate} is already the live version")
        self.model = model
        self.live = live
        self.candidate = candidate
        self.policy = policy
        self.weights: dict[str, int] = dict(initial_weights or {})
        self.state: State = "new"
        self.step_index = -1  # index into policy.steps of the step in force

    @property
    def done(self) -> bool:
        return self.state in ("promoted", "refused", "rolled_back", "aborted")

    @property
    def percent(self) -> int:
        """The candidate's share of live traffic now."""
        return self.policy.steps[self.step_index] if self.step_index >= 0 else 0

    def _expect(self, *states: State) -> None:
        if self.state not in states:
            raise RuntimeError(f"promotion is {self.state}, expected {' or '.join(states)}")

    def start(self) -> Decision:
        self._expect("new")
        self.state = "gating"
        steps = "→".join(f"{step}%" for step in self.policy.steps)
        return Decision(
            "started",
            dict(self.weights),
            self.policy.figures(),
            f"promote {self.candidate} over {self.live} in steps {steps}",
        )

    def gate(self, figures: GateFigures) -> Decision:
        """Judge the candidate's comparison: gate_passed (stepping begins) or gate_failed (refused)."""
        self._expect("gating")
        failures = self._gate_failures(figures)
        all_figures = figures.figures()
        if failures:
            self.state = "refused"
            detail = f"{figures.source} gate failed: " + "; ".join(failures)
            return Decision("gate_failed", dict(self.weights), all_figures, detail)
        self.state = "stepping"
        return Decision(
            "gate_passed",
            dict(self.weights),
            all_figures,
            f"{figures.source} gate passed on {figures.samples} requests",
        )

    def _gate_failures(self, figures: GateFigures) -> list[str]:
        policy = self.policy
        failures = []
        if figures.samples < policy.min_samples:
            failures.append(
                f"{figures.samples} samples, fewer than {policy.min_samples}: send more traffic "
                "or wait for the comparison to grow"
            )
        if figures.agreement is None or figures.agreement < policy.min_agreement:
            failures.append(
                f"agreement {_share(figures.agreement)} below {_share(policy.min_agreement)}"
            )
        if figures.candidate_accuracy is None:
            if policy.min_accuracy > 0:
                failures.append(
                    "accuracy unknown: no compared request carried a `label` in its metadata"
                )
        elif figures.candidate_accuracy < policy.min_accuracy:
            failures.append(
                f"candidate accuracy {_share(figures.candidate_accuracy)} below "
                f"{_share(policy.min_accuracy)} on {figures.labelled} labelled requests"
            )
        return failures

    def next_step(self) -> Decision:
        """The next step's weights; after the last step was watched through, promoted."""
        self._expect("stepping")
        if self.step_index == len(self.policy.steps) - 1:
            self.state = "promoted"
            return Decision(
                "promoted",
                dict(self.weights),
                {"percent": 100.0},
                f"{self.candidate} takes all live traffic",
            )
        self.step_index += 1
        percent = self.percent
        self.weights = self._split(percent)
        return Decision(
            "step",
            dict(self.weights),
            {"percent": float(percent)},
            f"step {self.step_index + 1}/{len(self.policy.steps)}: {self.candidate} at {percent}%",
        )

    def _split(self, percent: int) -> dict[str, int]:
        weights = {self.candidate: percent}
        if percent < 100:
            weights[self.live] = 100 - percent
        return weights

    def observe(self, observation: Observation) -> Decision | None:
        """None while the step holds; rolled_back (the live version at 100) once a bound is crossed."""
        self._expect("stepping")
        reasons = self._regressions(observation)
        if not reasons:
            return None
        self.state = "rolled_back"
        self.weights = {self.live: 100}
        return Decision(
            "rolled_back",
            dict(self.weights),
            {"percent": float(self.percent), **observation.figures()},
            f"rolled back at {self.percent}%: " + "; ".join(reasons),
        )

    def _regressions(self, observation: Observation) -> list[str]:
        policy = self.policy
        candidate, live = observation.candidate, observation.live
        reasons = []
        candidate_rate = candidate.error_rate
        if candidate_rate is not None:
            # A live version that answered nothing in the window has no errors to compare with.
            live_rate = live.error_rate or 0.0
            if candidate_rate - live_rate > policy.max_error_rate:
                reasons.append(
                    f"candidate error rate {_share(candidate_rate)} ({candidate.failed}/"
                    f"{candidate.requests}) exceeds live {_share(live_rate)} by more than "
                    f"{_share(policy.max_error_rate)}"
                )
        enough = min(candidate.requests, live.requests) >= policy.min_p99_requests
        if enough and candidate.p99_ms is not None and live.p99_ms:
            ratio = candidate.p99_ms / live.p99_ms
            if ratio > policy.max_p99_ratio:
                reasons.append(
                    f"candidate p99 {candidate.p99_ms:.1f} ms is {ratio:.2f}× live "
                    f"{live.p99_ms:.1f} ms, above {policy.max_p99_ratio:g}×"
                )
        return reasons

    def step_watched(self, observation: Observation) -> Decision | None:
        """The step was watched through without regression: None to go on, or aborted when the
        candidate answered fewer than `min_step_requests` requests (no evidence either way)."""
        self._expect("stepping")
        answered, wanted = observation.candidate.requests, self.policy.min_step_requests
        if answered >= wanted:
            return None
        decision = self.abort(
            f"the candidate answered {answered} requests at {self.percent}%, fewer than "
            f"{wanted}: send traffic or watch longer (--step-s)"
        )
        return replace(decision, figures={**decision.figures, **observation.figures()})

    def abort(self, why: str) -> Decision:
        """Stop here: the live version back at 100 when a step had moved traffic, else as it was."""
        if self.done:
            raise RuntimeError(f"promotion is already {self.state}")
        if self.step_index >= 0:
            self.weights = {self.live: 100}
        self.state = "aborted"
        return Decision(
            "aborted", dict(self.weights), {"percent": float(self.percent)}, f"aborted: {why}"
        )

    @property
    def moved_traffic(self) -> bool:
        """Whether a step has set weights (so an abort must put them back)."""
        return self.step_index >= 0


def resolve_version(versions: Sequence[Mapping[str, Any]], text: str) -> str:
    """The full version id `text` names among `versions` (`versions[]` of GET /v1/models/{name}):
    the id itself, a unique prefix of one, or a tag. PromotionError when none or several match."""
    ids = [str(v["version"]) for v in versions]
    if text in ids:
        return text
    matches = {str(v["version"]) for v in versions if v.get("tag") == text}
    matches |= {version for version in ids if version.startswith(text)}
    if len(matches) == 1:
        return matches.pop()
    known = ", ".join(_label(v) for v in versions) or "none"
    if not matches:
        raise PromotionError(f"no version {text!r}; known versions: {known}")
    raise PromotionError(f"{text!r} names several versions ({', '.join(sorted(matches))})")


def choose_live(
    versions: Sequence[Mapping[str, Any]], weights: Mapping[str, int], candidate: str
) -> str:
    """The version the candidate replaces: the serving version with the largest weight now, or the
    only serving version other than the candidate. PromotionError when that is not one version."""
    serving = [
        str(v["version"])
        for v in versions
        if v.get("role", "serving") == "serving" and str(v["version"]) != candidate
    ]
    weighted = sorted(
        ((percent, version) for version, percent in weights.items() if version != candidate),
        reverse=True,
    )
    if weighted and weighted[0][0] > 0:
        top = [version for percent, version in weighted if percent == weighted[0][0]]
        if len(top) == 1:
            return top[0]
        raise PromotionError(f"versions {', '.join(sorted(top))} share the largest weight")
    if len(serving) == 1:
        return serving[0]
    if not serving:
        raise PromotionError(
            "no serving version other than the candidate: there is nothing to promote it over"
        )
    raise PromotionError(
        f"several serving versions ({', '.join(sorted(serving))}) and no split: set one "
        "to 100 with `fmnist models weights` first"
    )


def _label(version: Mapping[str, Any]) -> str:
    tag = version.get("tag")
    return f"{version['version']} ({tag})" if tag else str(version["version"])


def _number(value: object) -> float | None:
    if value is None:
        return None
    number = float(value)  # type: ignore[arg-type]
    return None if math.isnan(number) else number


def _share(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.2%}"
