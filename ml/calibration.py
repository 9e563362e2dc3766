"""Calibration: a temperature fitted on held-out logits, expected calibration error, reliability bins.

A network trained with label smoothing is under-confident (its top probability stays near
1 - smoothing even on easy images), one trained without is often over-confident. Temperature
scaling (Guo et al., 2017) divides the logits by one scalar T fitted to minimise the negative
log-likelihood on held-out data: probabilities then mean what they say, and the argmax, hence the
accuracy, does not change.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

ECE_BINS = 15
# T is searched as exp(log T) within these bounds: beyond them the logits are degenerate.
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.05, 20.0


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature T > 0 minimising the mean NLL of `softmax(logits / T)` against `labels`.

    One parameter, log T (so T stays positive), optimised with LBFGS in float64 from T = 1.
    """
    if logits.ndim != 2 or labels.shape != (logits.shape[0],) or logits.shape[0] == 0:
        raise ValueError(
            f"need N×K logits and N labels with N > 0, got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    held_out = logits.detach().double().cpu()
    target = labels.detach().long().cpu()
    log_temperature = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [log_temperature], lr=0.5, max_iter=100, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(held_out / log_temperature.exp(), target)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    temperature = float(log_temperature.detach().exp())
    if not torch.isfinite(torch.tensor(temperature)):
        return 1.0
    return min(max(temperature, MIN_TEMPERATURE), MAX_TEMPERATURE)


@dataclass(frozen=True)
class Reliability:
    """Confidence against accuracy in equal-width confidence bins (the reliability diagram's data)."""

    # Per bin: how many predictions, their mean top probability, and the share of them that were right.
    counts: list[int]
    confidence: list[float]
    accuracy: list[float]

    @property
    def num_samples(self) -> int:
        return sum(self.counts)

    @property
    def ece(self) -> float:
        """Expected calibration error: the count-weighted mean |accuracy - confidence| over bins."""
        total = max(self.num_samples, 1)
        return (
            sum(
                count * abs(acc - conf)
                for count, conf, acc in zip(
                    self.counts, self.confidence, self.accuracy, strict=True
                )
            )
            / total
        )

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "ece": self.ece}


def reliability(
    probabilities: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS
) -> Reliability:
    """Bin the top probability of each row of `probabilities` into `bins` equal-width bins over (0, 1]."""
    if probabilities.ndim != 2 or labels.shape != (probabilities.shape[0],):
        raise ValueError(
            f"need N×K probabilities and N labels, got {tuple(probabilities.shape)} and {tuple(labels.shape)}"
        )
    confidence, predicted = probabilities.detach().double().cpu().max(1)
    correct = (predicted == labels.detach().cpu()).double()
    # Bin b holds confidences in (b/bins, (b+1)/bins]; a confidence of exactly 0 cannot occur.
    index = (confidence * bins).ceil().long().clamp(1, bins) - 1
    counts = torch.bincount(index, minlength=bins)
    confidence_sum = torch.bincount(index, weights=confidence, minlength=bins)
    correct_sum = torch.bincount(index, weights=correct, minlength=bins)
    denominator = counts.clamp_min(1).double()
    return Reliability(
        counts=counts.tolist(),
        confidence=(confidence_sum / denominator).tolist(),
        accuracy=(correct_sum / denominator).tolist(),
    )


def expected_calibration_error(
    probabilities: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS
) -> float:
    """ECE of `probabilities` (N×K rows summing to 1) against `labels`, over `bins` confidence bins."""
    return reliability(probabilities, labels, bins).ece


@dataclass(frozen=True)
class CalibrationReport:
    """The same logits before (T = 1) and after dividing by `temperature`: NLL and reliability."""

    temperature: float
    num_samples: int
    nll_before: float
    nll_after: float
    before: Reliability
    after: Reliability

    def to_json(self) -> dict[str, Any]:
        return {
            "temperature": self.temperature,
            "num_samples": self.num_samples,
            "nll_before": self.nll_before,
            "nll_after": self.nll_after,
            "ece_before": self.before.ece,
            "ece_after": self.after.ece,
        }


def calibration_report(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float
) -> CalibrationReport:
    """How well `softmax(logits)` and `softmax(logits / temperature)` are calibrated on `labels`."""
    raw = logits.detach().double().cpu()
    target = labels.detach().long().cpu()
    scaled = raw / temperature
    return CalibrationReport(
        temperature=temperature,
        num_samples=int(raw.shape[0]),
        nll_before=float(F.cross_entropy(raw, target)),
        nll_after=float(F.cross_entropy(scaled, target)),
        before=reliability(raw.softmax(1), target),
        after=reliability(scaled.softmax(1), target),
    )
