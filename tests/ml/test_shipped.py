"""The shipped checkpoint: loads, is small, and scores what its card and metadata claim on the real test set."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from ml import ImageClassifier, expected_calibration_error, load_fashion_mnist

pytestmark = pytest.mark.data

# Evaluation order and batch size may differ from training time; beyond this the model is not the one described.
TOLERANCE = 0.002


def test_shipped_checkpoint_scores_its_recorded_accuracy(
    shipped_checkpoint: Path, fashion_mnist_dir: Path
) -> None:
    """Accuracy on the 10k real test images is at least the recorded test accuracy minus 0.2 points."""
    classifier = ImageClassifier.load(shipped_checkpoint, device="cpu")
    recorded = classifier.metrics["test_accuracy"]
    result = classifier.evaluate(load_fashion_mnist("test", fashion_mnist_dir))
    assert result.num_samples == 10_000
    assert result.accuracy >= recorded - TOLERANCE, (result.accuracy, recorded)


def test_card_states_the_recorded_accuracy(shipped_checkpoint: Path) -> None:
    """The model card beside the checkpoint quotes the same test accuracy and version as the metadata."""
    classifier = ImageClassifier.load(shipped_checkpoint, device="cpu")
    card = shipped_checkpoint.with_suffix(".md").read_text()
    match = re.search(r"\*\*test accuracy\*\* \| \*\*([0-9.]+)%\*\*", card)
    assert match is not None, "card has no test-accuracy row"
    assert float(match.group(1)) == pytest.approx(
        100 * classifier.metrics["test_accuracy"], abs=0.005
    )
    assert classifier.version in card
    assert "fmnist train" in card


def test_shipped_checkpoint_is_small_and_describes_fashion_mnist(shipped_checkpoint: Path) -> None:
    """Under 10 MB, 1×28×28 input, the ten Fashion-MNIST class names, and fast enough to serve."""
    assert shipped_checkpoint.stat().st_size < 10 * 1024 * 1024
    classifier = ImageClassifier.load(shipped_checkpoint, device="cpu")
    assert classifier.input_shape == (1, 28, 28)
    assert classifier.class_names[0] == "T-shirt/top" and len(classifier.class_names) == 10
    probabilities = classifier.predict(torch.zeros(3, 1, 28, 28, dtype=torch.uint8))
    torch.testing.assert_close(probabilities.sum(1), torch.ones(3))


# The raw softmax of the shipped model has an ECE near 0.08 on these images; calibrated, near 0.01.
SERVED_ECE_BOUND = 0.03


def test_shipped_checkpoint_serves_calibrated_probabilities(
    shipped_checkpoint: Path, fashion_mnist_dir: Path
) -> None:
    """`predict` (the served graph) on 2,000 real test images has an ECE below 0.03 (15 bins)."""
    classifier = ImageClassifier.load(shipped_checkpoint, device="cpu")
    test = load_fashion_mnist("test", fashion_mnist_dir).subset(torch.arange(2_000))
    probabilities = classifier.predict(test.images)
    assert expected_calibration_error(probabilities, test.labels) < SERVED_ECE_BOUND


def test_card_states_the_calibration_the_checkpoint_serves(
    shipped_checkpoint: Path, fashion_mnist_dir: Path
) -> None:
    """The card's temperature and test ECE before/after are what the checkpoint gives on the test set."""
    classifier = ImageClassifier.load(shipped_checkpoint, device="cpu")
    report = classifier.calibration_report(load_fashion_mnist("test", fashion_mnist_dir))
    card = shipped_checkpoint.with_suffix(".md").read_text()
    row = re.search(r"\| ECE \(15 bins\) \| ([0-9.]+) \| \*\*([0-9.]+)\*\* \|", card)
    assert row is not None, "card has no ECE row"
    assert float(row.group(1)) == pytest.approx(report.before.ece, abs=5e-5)
    assert float(row.group(2)) == pytest.approx(report.after.ece, abs=5e-5)
    assert f"| temperature T | 1 | {classifier.temperature:.4f} |" in card
    assert (shipped_checkpoint.parent / "fmnist-reliability.png").stat().st_size > 0
