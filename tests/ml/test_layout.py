"""The inference layout: passes side by side and torch threads for each, from the cores."""

from __future__ import annotations

from ml.layout import MAX_DEFAULT_PASSES, InferenceLayout, inference_layout


def test_cpu_runs_one_single_threaded_pass_per_core() -> None:
    """Two cores: two passes of one thread each."""
    assert inference_layout(2, on_gpu=False) == InferenceLayout(concurrency=2, threads=1)


def test_cpu_passes_stop_at_the_default_maximum_and_share_the_cores() -> None:
    """Sixteen cores: MAX_DEFAULT_PASSES passes, the cores shared out as threads."""
    assert inference_layout(16, on_gpu=False) == InferenceLayout(
        MAX_DEFAULT_PASSES, 16 // MAX_DEFAULT_PASSES
    )


def test_a_gpu_runs_one_pass() -> None:
    """On a GPU one pass at a time, with every core's thread for it."""
    assert inference_layout(8, on_gpu=True) == InferenceLayout(concurrency=1, threads=8)


def test_explicit_settings_win_and_zero_chooses() -> None:
    """A given concurrency and threads are kept; 0 means choose, as the FMNIST_ settings do."""
    assert inference_layout(8, on_gpu=False, concurrency=3, threads=2) == InferenceLayout(3, 2)
    assert inference_layout(8, on_gpu=False, concurrency=0, threads=0) == InferenceLayout(4, 2)
