"""How forward passes spread over the machine: passes side by side, and torch threads for each."""

from __future__ import annotations

import os
from typing import NamedTuple

__all__ = ["MAX_DEFAULT_PASSES", "InferenceLayout", "inference_layout", "usable_cores"]

# Passes past this many add memory and latency without throughput on the CPUs measured
# (docs/benchmarks.md); set the concurrency explicitly to go higher.
MAX_DEFAULT_PASSES = 4


class InferenceLayout(NamedTuple):
    concurrency: int
    """Forward passes at once (`ModelRunner(concurrency=...)`)."""
    threads: int
    """torch intra-op threads for each pass."""


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. under `taskset` or a cgroup cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def inference_layout(
    cores: int, *, on_gpu: bool, concurrency: int | None = None, threads: int | None = None
) -> InferenceLayout:
    """The layout for `cores` usable cores: `concurrency` and `threads` when given (0 or None
    chooses), else one pass per core (at most `MAX_DEFAULT_PASSES`) with the cores shared out.

    On CPU, passes side by side on one thread each beat one pass on many threads, whose threads
    wait for each other at every op; a GPU runs one pass at a time."""
    passes = concurrency or (1 if on_gpu else max(1, min(cores, MAX_DEFAULT_PASSES)))
    return InferenceLayout(passes, threads or max(1, cores // passes))
