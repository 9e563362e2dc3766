"""The model card's pieces: durations and the epoch axis of the training curves."""

from __future__ import annotations

from ml.plots import curves_figure
from ml.report import duration


def test_duration_uses_seconds_under_a_minute_and_minutes_above() -> None:
    """42 s reads "42.0 s" (not "0.7 min"); 606 s reads "10.1 min"."""
    assert duration(42.0) == "42.0 s"
    assert duration(606.0) == "10.1 min"


def test_curves_mark_only_whole_epochs() -> None:
    """A two-epoch history gets epoch ticks 1 and 2 only, no 1.2 or 1.5."""
    record = {"train_loss": 1.0, "train_accuracy": 0.5, "val_loss": 0.9, "val_accuracy": 0.6}
    history = {"epochs": [{"epoch": 1, **record}, {"epoch": 2, **record}]}
    figure = curves_figure(history)
    figure.canvas.draw()
    for axes in figure.axes:
        visible = [t for t in axes.get_xticks() if axes.get_xlim()[0] <= t <= axes.get_xlim()[1]]
        assert visible and all(float(t).is_integer() for t in visible), visible
