"""Temperature fitting and expected calibration error on logits whose true calibration is known."""

from __future__ import annotations

import pytest
import torch

from ml.calibration import calibration_report, expected_calibration_error, fit_temperature


def sampled_labels(logits: torch.Tensor, temperature: float, seed: int) -> torch.Tensor:
    """Labels drawn from softmax(logits / temperature): the temperature that truly calibrates them."""
    generator = torch.Generator().manual_seed(seed)
    return torch.multinomial((logits / temperature).softmax(1), 1, generator=generator).flatten()


def test_fit_temperature_recovers_the_temperature_behind_the_labels() -> None:
    """Labels drawn from softmax(z / 2) give a fitted temperature within 10% of 2."""
    logits = torch.randn(20_000, 10, generator=torch.Generator().manual_seed(0)) * 4
    labels = sampled_labels(logits, 2.0, seed=1)
    assert fit_temperature(logits, labels) == pytest.approx(2.0, rel=0.1)


def test_fitted_temperature_lowers_nll_and_ece_on_fresh_labels() -> None:
    """A temperature fitted on one draw of labels lowers NLL and ECE on another draw."""
    logits = torch.randn(20_000, 10, generator=torch.Generator().manual_seed(2)) * 4
    temperature = fit_temperature(logits[:10_000], sampled_labels(logits[:10_000], 0.5, seed=3))
    report = calibration_report(
        logits[10_000:], sampled_labels(logits[10_000:], 0.5, seed=4), temperature
    )
    assert report.nll_after < report.nll_before
    assert report.after.ece < report.before.ece / 3


def test_ece_is_the_gap_between_confidence_and_accuracy() -> None:
    """Top probability 0.9 everywhere with 60% right is an ECE of 0.3; with 90% right, 0."""
    probabilities = torch.full((10, 2), 0.1)
    probabilities[:, 0] = 0.9
    six_right = torch.tensor([0] * 6 + [1] * 4)
    nine_right = torch.tensor([0] * 9 + [1])
    assert expected_calibration_error(probabilities, six_right) == pytest.approx(0.3)
    assert expected_calibration_error(probabilities, nine_right) == pytest.approx(0.0, abs=1e-6)


def test_fit_temperature_rejects_logits_and_labels_of_different_lengths() -> None:
    """Three logit rows and two labels are refused with both shapes in the message."""
    with pytest.raises(ValueError, match=r"\(3, 4\) and \(2,\)"):
        fit_temperature(torch.zeros(3, 4), torch.zeros(2, dtype=torch.long))
