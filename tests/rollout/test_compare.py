"""The live-vs-candidate comparison: joining by request id, agreement, confusion, accuracy, latency."""

from __future__ import annotations

import math

import pytest

from app.rollout.compare import (
    Answer,
    Comparison,
    JoinedPair,
    accuracy,
    agreement,
    disagreement_matrix,
    true_label,
)

NAMES = ("a", "b", "c")


def pair(live: int | None, candidate: int | None, truth: int | None = None) -> JoinedPair:
    return JoinedPair("r", Answer(live), Answer(candidate), truth)


def test_agreement_is_the_share_of_equal_top1_classes() -> None:
    """Agreement counts the pairs whose classes are equal among those both sides answered."""
    assert agreement([pair(0, 0), pair(1, 2), pair(2, 2), pair(0, None)]) == pytest.approx(2 / 3)


def test_agreement_without_answered_pairs_is_nan() -> None:
    """No pair answered by both sides gives NaN, not a made-up figure."""
    assert math.isnan(agreement([pair(None, 1)]))


def test_disagreement_matrix_rows_are_live_columns_candidate() -> None:
    """matrix[live][candidate] counts each answered pair once; failed pairs are left out."""
    matrix = disagreement_matrix([pair(0, 1), pair(0, 1), pair(2, 2), pair(1, None)], 3)
    assert matrix == [[0, 2, 0], [0, 0, 0], [0, 0, 1]]


def test_accuracy_counts_only_labelled_pairs_and_failures_as_wrong() -> None:
    """Accuracy is over pairs with a true class; a failed answer is wrong."""
    pairs = [pair(0, 1, truth=0), pair(1, None, truth=1), pair(2, 2)]
    assert accuracy(pairs, "live") == (1.0, 2)
    assert accuracy(pairs, "candidate") == (0.0, 2)


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ({"label": "3"}, 3),
        ({}, None),
        ({"label": "x"}, None),
        ({"label": "-1"}, None),
        ({"label": "10"}, None),
    ],
)
def test_true_label_reads_a_class_index_from_metadata(
    metadata: dict[str, str], expected: int | None
) -> None:
    """`label` in the metadata is the true class only when it is a class index."""
    assert true_label(metadata, num_classes=10) == expected


def test_comparison_joins_either_order_and_keeps_the_first_answer() -> None:
    """Candidate-first and live-first both join; a second answer for the same id is ignored."""
    comparison = Comparison(NAMES)
    comparison.add_candidate("r1", Answer(1))
    comparison.add_live("r1", Answer(1), truth=1)
    comparison.add_live("r2", Answer(0), truth=2)
    comparison.add_live("r2", Answer(2), truth=2)
    comparison.add_candidate("r2", Answer(2))
    comparison.add_candidate("r2", Answer(0))
    summary = comparison.summary()
    assert summary.pairs == 2
    assert summary.agreement == 0.5
    assert summary.disagreements[0][2] == 1
    assert (summary.live_accuracy, summary.candidate_accuracy, summary.labelled) == (0.5, 1.0, 2)


def test_comparison_bounds_answers_waiting_for_their_other_side() -> None:
    """Past max_pending the oldest unjoined answer is dropped and counted."""
    comparison = Comparison(NAMES, max_pending=2)
    for index in range(5):
        comparison.add_candidate(f"r{index}", Answer(0))
    comparison.add_live("r0", Answer(0))
    summary = comparison.summary()
    assert summary.pairs == 0
    assert summary.unmatched == {"live": 1, "candidate": 2, "dropped": 3}


def test_summary_reports_latency_percentiles_per_side() -> None:
    """Inference ms percentiles come from each side's own answers."""
    comparison = Comparison(NAMES)
    for index in range(100):
        comparison.add_live(f"r{index}", Answer(0, inference_ms=10.0))
        comparison.add_candidate(f"r{index}", Answer(0, inference_ms=float(index)))
    summary = comparison.summary()
    assert summary.live_inference_ms.p99 == 10.0
    assert summary.candidate_inference_ms.p50 == pytest.approx(49.5)
    assert summary.candidate_inference_ms.count == 100


def test_headline_names_agreement_accuracy_and_the_top_disagreement() -> None:
    """The printed headline carries agreement, both accuracies and the most frequent disagreement."""
    comparison = Comparison(NAMES)
    for index, (live, candidate) in enumerate([(0, 0), (0, 1), (0, 1), (2, 2)]):
        comparison.add_live(f"r{index}", Answer(live), truth=live)
        comparison.add_candidate(f"r{index}", Answer(candidate))
    text = "\n".join(comparison.summary().headline())
    assert "agreement      50.00% (2/4 same top-1 class)" in text
    assert "accuracy       live 100.00%, candidate 50.00% (4 labelled)" in text
    assert "a -> b (2)" in text
