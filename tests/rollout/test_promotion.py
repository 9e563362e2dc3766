"""The promotion state machine: the gate, the steps, rollback and abort, with the figures it records."""

from __future__ import annotations

from typing import Any

import pytest

from app.rollout.compare import Answer, Comparison
from app.rollout.promotion import (
    GateFigures,
    Observation,
    Promotion,
    PromotionError,
    PromotionPolicy,
    VersionStats,
    choose_live,
    parse_steps,
    resolve_version,
)

LIVE, CANDIDATE = "aaaa11112222", "bbbb33334444"
POLICY = PromotionPolicy(
    min_agreement=0.9,
    min_accuracy=0.8,
    min_samples=100,
    steps=(10, 50, 100),
    max_error_rate=0.02,
    max_p99_ratio=1.5,
)
GOOD_GATE = GateFigures(
    source="shadow", samples=200, agreement=0.97, labelled=200, candidate_accuracy=0.91
)
HEALTHY = Observation(
    live=VersionStats(requests=100, failed=0, p99_ms=10.0),
    candidate=VersionStats(requests=20, failed=0, p99_ms=11.0),
)


def gated(policy: PromotionPolicy = POLICY) -> Promotion:
    promotion = Promotion(model="fmnist", live=LIVE, candidate=CANDIDATE, policy=policy)
    promotion.start()
    promotion.gate(GOOD_GATE)
    return promotion


def test_start_records_the_policy_and_leaves_the_weights() -> None:
    """`started` carries the policy's figures and the split in force before the promotion."""
    promotion = Promotion(
        model="fmnist",
        live=LIVE,
        candidate=CANDIDATE,
        policy=POLICY,
        initial_weights={LIVE: 100},
    )
    decision = promotion.start()
    assert decision.action == "started"
    assert decision.weights == {LIVE: 100}
    assert decision.figures["min_agreement"] == 0.9 and decision.figures["min_samples"] == 100


@pytest.mark.parametrize(
    ("figures", "reason"),
    [
        (
            GateFigures("shadow", 200, agreement=0.6, labelled=200, candidate_accuracy=0.91),
            "agreement 60.00% below 90.00%",
        ),
        (
            GateFigures("shadow", 200, agreement=0.95, labelled=200, candidate_accuracy=0.5),
            "candidate accuracy 50.00% below 80.00% on 200 labelled",
        ),
        (
            GateFigures("shadow", 40, agreement=0.99, labelled=40, candidate_accuracy=0.95),
            "40 samples, fewer than 100",
        ),
        (
            GateFigures("replay", 200, agreement=0.99, labelled=0, candidate_accuracy=None),
            "accuracy unknown",
        ),
        (
            GateFigures("shadow", 200, agreement=None, labelled=0, candidate_accuracy=None),
            "agreement unknown below",
        ),
    ],
    ids=["agreement", "accuracy", "samples", "no-labels", "nothing-answered"],
)
def test_gate_refuses_a_candidate_below_a_bound(figures: GateFigures, reason: str) -> None:
    """A gate below any bound is `gate_failed` with the reason, and the promotion is over unchanged."""
    promotion = Promotion(model="fmnist", live=LIVE, candidate=CANDIDATE, policy=POLICY)
    promotion.start()
    decision = promotion.gate(figures)
    assert decision.action == "gate_failed"
    assert reason in decision.detail
    assert decision.figures["samples"] == figures.samples
    assert decision.weights == {} and promotion.state == "refused" and promotion.done
    assert not promotion.moved_traffic


def test_gate_without_an_accuracy_bound_passes_unlabelled_traffic() -> None:
    """`min_accuracy` 0 lets a candidate through on agreement alone when no request had a label."""
    policy = PromotionPolicy(min_agreement=0.9, min_accuracy=0.0, min_samples=10)
    promotion = Promotion(model="fmnist", live=LIVE, candidate=CANDIDATE, policy=policy)
    promotion.start()
    figures = GateFigures("replay", 50, agreement=0.95, labelled=0, candidate_accuracy=None)
    assert promotion.gate(figures).action == "gate_passed"


def test_a_promotion_that_holds_walks_every_step_to_promoted() -> None:
    """Gate passed, then 10 → 50 → 100 with the live version taking the rest, then promoted."""
    promotion = Promotion(model="fmnist", live=LIVE, candidate=CANDIDATE, policy=POLICY)
    actions = [promotion.start().action, promotion.gate(GOOD_GATE).action]
    splits = []
    while not promotion.done:
        decision = promotion.next_step()
        actions.append(decision.action)
        splits.append(decision.weights)
        if decision.action == "step":
            assert promotion.observe(HEALTHY) is None
    assert actions == ["started", "gate_passed", "step", "step", "step", "promoted"]
    assert splits == [
        {CANDIDATE: 10, LIVE: 90},
        {CANDIDATE: 50, LIVE: 50},
        {CANDIDATE: 100},
        {CANDIDATE: 100},
    ]
    assert promotion.state == "promoted"


def test_an_error_rate_regression_rolls_back_to_the_live_version() -> None:
    """Candidate errors above live's plus the bound: rolled_back with the figures, live at 100."""
    promotion = gated()
    promotion.next_step()
    promotion.next_step()
    bad = Observation(
        live=VersionStats(requests=100, failed=1, p99_ms=10.0),
        candidate=VersionStats(requests=50, failed=3, p99_ms=10.0),
    )
    decision = promotion.observe(bad)
    assert decision is not None and decision.action == "rolled_back"
    assert decision.weights == {LIVE: 100}
    assert "error rate 6.00% (3/50) exceeds live 1.00%" in decision.detail
    assert decision.figures["candidate_error_rate"] == 0.06
    assert decision.figures["percent"] == 50
    assert promotion.state == "rolled_back" and promotion.done


def test_an_error_rate_within_the_bound_holds() -> None:
    """Candidate errors no more than the bound above live's keep the step."""
    promotion = gated()
    promotion.next_step()
    close = Observation(
        live=VersionStats(requests=100, failed=1, p99_ms=10.0),
        candidate=VersionStats(requests=50, failed=1, p99_ms=10.0),
    )
    assert promotion.observe(close) is None


def test_a_p99_regression_rolls_back() -> None:
    """Candidate p99 above the ratio times live's: rolled_back naming the ratio."""
    promotion = gated()
    promotion.next_step()
    slow = Observation(
        live=VersionStats(requests=100, failed=0, p99_ms=10.0),
        candidate=VersionStats(requests=30, failed=0, p99_ms=16.0),
    )
    decision = promotion.observe(slow)
    assert decision is not None and decision.action == "rolled_back"
    assert "1.60× live 10.0 ms, above 1.5×" in decision.detail
    assert decision.figures["candidate_p99_ms"] == 16.0


def test_a_p99_over_too_few_requests_is_not_judged() -> None:
    """A slow p99 over fewer than `min_p99_requests` candidate results (a cold start) holds."""
    promotion = gated()
    promotion.next_step()
    cold = Observation(
        live=VersionStats(requests=100, failed=0, p99_ms=10.0),
        candidate=VersionStats(requests=19, failed=0, p99_ms=150.0),
    )
    assert promotion.observe(cold) is None


def test_a_candidate_without_traffic_yet_holds() -> None:
    """No candidate result in the window is no evidence of a regression."""
    promotion = gated()
    promotion.next_step()
    quiet = Observation(live=VersionStats(100, 0, 10.0), candidate=VersionStats())
    assert promotion.observe(quiet) is None


def test_a_step_without_enough_candidate_traffic_stops_the_promotion() -> None:
    """Fewer candidate requests than `min_step_requests` by a step's end: aborted, live at 100."""
    policy = PromotionPolicy(
        min_agreement=0.9, min_accuracy=0.8, min_samples=1, min_step_requests=5
    )
    promotion = gated(policy)
    promotion.next_step()
    few = Observation(live=VersionStats(100, 0, 10.0), candidate=VersionStats(4, 0, 10.0))
    decision = promotion.step_watched(few)
    assert decision is not None and decision.action == "aborted"
    assert decision.weights == {LIVE: 100} and decision.figures["candidate_requests"] == 4
    assert "answered 4 requests at 10%, fewer than 5" in decision.detail


def test_a_step_with_enough_candidate_traffic_goes_on() -> None:
    """As many candidate requests as `min_step_requests`: the step counts, the next may follow."""
    policy = PromotionPolicy(
        min_agreement=0.9, min_accuracy=0.8, min_samples=1, min_step_requests=5
    )
    promotion = gated(policy)
    promotion.next_step()
    enough = Observation(live=VersionStats(100, 0, 10.0), candidate=VersionStats(5, 0, 10.0))
    assert promotion.step_watched(enough) is None
    assert promotion.next_step().weights == {CANDIDATE: 50, LIVE: 50}


def test_abort_during_a_step_puts_the_live_version_back() -> None:
    """Ctrl-C after a step moved traffic: aborted with the live version at 100."""
    promotion = gated()
    promotion.next_step()
    decision = promotion.abort("interrupted (Ctrl-C)")
    assert decision.action == "aborted" and decision.weights == {LIVE: 100}
    assert "interrupted" in decision.detail and promotion.done


def test_abort_before_any_step_leaves_the_split_as_it_was() -> None:
    """Ctrl-C at the gate: aborted with the split that was in force, nothing moved."""
    promotion = Promotion(
        model="fmnist", live=LIVE, candidate=CANDIDATE, policy=POLICY, initial_weights={}
    )
    promotion.start()
    decision = promotion.abort("interrupted (Ctrl-C)")
    assert decision.weights == {} and not promotion.moved_traffic


def test_steps_must_rise_and_end_at_100() -> None:
    """`--steps` that fall, leave 1..100 or stop short of 100 are refused."""
    assert parse_steps("10,50,100") == (10, 50, 100)
    for text in ("50,10,100", "10,50", "0,100", "10,x"):
        with pytest.raises(PromotionError):
            parse_steps(text)


def test_gate_figures_from_a_replay_summary() -> None:
    """A replay's comparison gives the gate its samples, agreement and accuracy."""
    comparison = Comparison(("a", "b"))
    for index, (live, candidate) in enumerate([(0, 0), (1, 1), (1, 0), (0, 0)]):
        comparison.add_live(f"r{index}", Answer(live), truth=live)
        comparison.add_candidate(f"r{index}", Answer(candidate))
    figures = GateFigures.from_replay(comparison.summary())
    assert (figures.samples, figures.agreement, figures.labelled) == (4, 0.75, 4)
    assert figures.candidate_accuracy == 0.75 and figures.source == "replay"


def test_gate_figures_from_a_shadow_entry_keep_unknowns_out_of_the_record() -> None:
    """null figures of the shadow endpoint stay unknown and are left out of the recorded figures."""
    entry = {"version": CANDIDATE, "samples": 3, "agreement": 1.0, "labelled": 0}
    figures = GateFigures.from_shadow({**entry, "candidate_accuracy": None})
    assert figures.candidate_accuracy is None
    assert figures.figures() == {"samples": 3.0, "agreement": 1.0, "labelled": 0.0}


VERSIONS: list[dict[str, Any]] = [
    {"version": LIVE, "tag": "v1", "role": "serving"},
    {"version": CANDIDATE, "tag": "v2", "role": "serving"},
    {"version": "cccc55556666", "tag": None, "role": "shadow"},
]


def test_resolve_version_takes_an_id_a_prefix_or_a_tag() -> None:
    """A full id, a unique prefix and a tag all name the same version."""
    assert {resolve_version(VERSIONS, text) for text in (CANDIDATE, "bbbb", "v2")} == {CANDIDATE}


def test_resolve_version_refuses_unknown_and_ambiguous_names() -> None:
    """No match lists the known versions; several matches name them."""
    with pytest.raises(PromotionError, match="known versions: aaaa11112222 \\(v1\\)"):
        resolve_version(VERSIONS, "zzz")
    with pytest.raises(PromotionError, match="names several versions"):
        resolve_version([*VERSIONS, {"version": "bbbb99999999"}], "bbbb")


def test_the_live_version_is_the_largest_weight_else_the_only_other_serving_one() -> None:
    """With a split the heaviest version is live; without one, the only other serving version."""
    assert choose_live(VERSIONS, {LIVE: 30, "cccc55556666": 70}, CANDIDATE) == "cccc55556666"
    assert choose_live(VERSIONS, {}, CANDIDATE) == LIVE
    assert choose_live(VERSIONS, {CANDIDATE: 100}, CANDIDATE) == LIVE


def test_no_single_live_version_is_an_error() -> None:
    """Several serving versions without a split, or none besides the candidate, are refused."""
    two = [*VERSIONS, {"version": "dddd77778888", "role": "serving"}]
    with pytest.raises(PromotionError, match="several serving versions"):
        choose_live(two, {}, CANDIDATE)
    with pytest.raises(PromotionError, match="nothing to promote it over"):
        choose_live(VERSIONS[1:], {}, CANDIDATE)
