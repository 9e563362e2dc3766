"""The report's figures as PNG files: training curves, confusion matrix, reliability diagrams."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ml.calibration import ECE_BINS, CalibrationReport
from ml.training import EvaluationResult

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["curves_figure", "plot_confusion", "plot_curves", "plot_reliability"]


def plot_curves(history: dict[str, Any], path: Path) -> None:
    """Training/validation loss and accuracy per epoch, as a PNG."""
    curves_figure(history).savefig(path)


def curves_figure(history: dict[str, Any]) -> Figure:
    """The figure `plot_curves` saves: loss and accuracy against whole epochs."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    epochs = [e["epoch"] for e in history["epochs"]]
    figure = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(figure)
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    loss_axes.plot(
        epochs, [e["train_loss"] for e in history["epochs"]], label="train (augmented, smoothed)"
    )
    accuracy_axes.plot(
        epochs, [e["train_accuracy"] for e in history["epochs"]], label="train (augmented)"
    )
    if any(e["val_loss"] is not None for e in history["epochs"]):
        loss_axes.plot(epochs, [e["val_loss"] for e in history["epochs"]], label="validation")
        accuracy_axes.plot(
            epochs, [e["val_accuracy"] for e in history["epochs"]], label="validation"
        )
    for axes, title in ((loss_axes, "loss"), (accuracy_axes, "accuracy")):
        axes.set_xlabel("epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # no epoch 1.5 on short runs
        axes.set_title(title)
        axes.grid(alpha=0.3)
        axes.legend()
    figure.tight_layout()
    return figure


def plot_confusion(
    result: EvaluationResult, class_names: Sequence[str], path: Path, title: str
) -> None:
    """The confusion matrix (rows: true class, columns: predicted), counts annotated, as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    matrix = result.confusion_matrix
    size = len(class_names)
    figure = Figure(figsize=(max(6, 0.7 * size + 2), max(5, 0.6 * size + 2)), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    image = axes.imshow(matrix, cmap="Blues")
    figure.colorbar(image, ax=axes)
    axes.set_xticks(range(size), class_names, rotation=45, ha="right")
    axes.set_yticks(range(size), class_names)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title)
    if size <= 20:
        peak = max(max(row) for row in matrix) or 1
        for row in range(size):
            for col in range(size):
                colour = "white" if matrix[row][col] > peak / 2 else "black"
                axes.text(
                    col,
                    row,
                    str(matrix[row][col]),
                    ha="center",
                    va="center",
                    color=colour,
                    fontsize=7,
                )
    figure.tight_layout()
    figure.savefig(path)


def plot_reliability(report: CalibrationReport, path: Path, title: str) -> None:
    """Reliability diagrams before and after the temperature (accuracy against confidence per bin), as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    panels = (
        (report.before, "softmax(logits), T = 1"),
        (report.after, f"softmax(logits / T), T = {report.temperature:.3f}"),
    )
    width = 1.0 / ECE_BINS
    centres = [(b + 0.5) * width for b in range(ECE_BINS)]
    for axes, (bins, label) in zip(figure.subplots(1, 2, sharey=True), panels, strict=True):
        used = [b for b, count in enumerate(bins.counts) if count]
        axes.bar(
            [centres[b] for b in used],
            [bins.accuracy[b] for b in used],
            width=width,
            edgecolor="black",
            label="accuracy",
        )
        axes.bar(
            [centres[b] for b in used],
            [bins.confidence[b] - bins.accuracy[b] for b in used],
            bottom=[bins.accuracy[b] for b in used],
            width=width,
            facecolor="none",
            edgecolor="red",
            hatch="//",
            label="gap to mean confidence",
        )
        axes.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
        axes.set_xlim(0, 1)
        axes.set_ylim(0, 1)
        axes.set_xlabel("confidence (top probability)")
        axes.set_title(f"{label}\nECE {bins.ece:.4f} ({ECE_BINS} bins)")
        axes.grid(alpha=0.3)
    figure.axes[0].set_ylabel("accuracy")
    figure.axes[0].legend(loc="upper left")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path)
