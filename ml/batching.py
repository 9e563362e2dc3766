"""The batching policy: which queued images form the next forward passes, and when.

A pure decision, so it can be tested with a queue state and a clock alone; `ModelRunner` only moves
images and futures around it. Given the queue and the passes running, `BatchingPolicy.decide` says:

1. a batch is **full** at `preferred_batch_size` images, or at this pass's share of a deeper queue
   (everything waiting over `concurrency` passes), never more than `max_batch_size`: bursts then
   compute in large passes, which cost less per image, while a steady trickle keeps the small
   batches that answer soonest;
2. a full batch goes at once, even while every pass is busy (up to `concurrency` more wait in the
   executor's queue), so the thread that finishes a pass starts it without waiting for the event loop;
3. a batch that is not full goes when `max_wait_ms` has passed since its OLDEST image arrived (or
   the runner is closing) **and** a pass is free: while the model is busy, waiting costs nothing,
   so the batch keeps filling;
4. ... except when every pass is idle: then whatever waits goes at once, since no pass is there to
   finish and bring company, and a lone image would only idle for `max_wait_ms` (unless
   `fill_when_idle`, for a worker whose cores are busy with other work, where fuller batches save
   CPU);
5. a due batch smaller than `preferred_batch_size` is split into one part per free pass, at least
   `MIN_SHARED_BATCH` images each, so two free cores compute two halves side by side instead of one
   core computing all of it; the parts beyond the free passes stay at the head of the queue.

Dropping images whose deadline has passed happens when a pass starts (`ModelRunner`), since it
needs the wall clock and each image's future, not the queue's shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

__all__ = ["MIN_SHARED_BATCH", "BatchingPolicy", "Decision", "QueueState"]

# The smallest part a due batch is split into to share it among free passes: per image, small passes
# are dear, so sharing stops before the parts get small (figures in docs/benchmarks.md).
MIN_SHARED_BATCH = 16


class QueueState(NamedTuple):
    """What the policy looks at: the queue, the passes running, and the clock."""

    waiting: int
    """Images queued and not yet handed to a forward pass."""
    oldest_arrival: float | None
    """`time.monotonic()` when the oldest queued image arrived; None when nothing waits."""
    passes_running: int
    """Forward passes handed to the executor: computing, or queued behind one that is."""
    closing: bool
    """The runner is closing: nothing more will arrive, so nothing waits for the timer."""
    now: float
    """`time.monotonic()` now."""


class Decision(NamedTuple):
    """What to do now: start passes, or wait (until `due_at`, or until something changes), or stop."""

    passes: tuple[int, ...] = ()
    """Sizes of the passes to start now, each taken in turn from the head of the queue."""
    due_at: float | None = None
    """When waiting: the monotonic time the oldest image falls due; None when only a submit or a
    finished pass can change the decision."""
    stop: bool = False
    """Closing and nothing queued: the batching loop ends."""


@dataclass(frozen=True, slots=True)
class BatchingPolicy:
    """The batch sizes and waits of one `ModelRunner`; validated at construction."""

    max_batch_size: int = 64
    max_wait_ms: float = 5.0
    concurrency: int = 1
    preferred_batch_size: int | None = None
    """None: `max_batch_size` (batches never grow past the preferred size)."""
    fill_when_idle: bool = False
    """Wait `max_wait_ms` for company even when every pass is idle (rule 4 off)."""

    def __post_init__(self) -> None:
        _require_positive_int("max_batch_size (FMNIST_MAX_BATCH_SIZE)", self.max_batch_size)
        _require_positive_int("concurrency (FMNIST_INFERENCE_CONCURRENCY)", self.concurrency)
        wait = self.max_wait_ms
        if isinstance(wait, bool) or not isinstance(wait, int | float) or not math.isfinite(wait):
            wait = -1.0
        if wait < 0:
            raise ValueError(
                f"max_wait_ms (FMNIST_BATCH_FILL_WAIT_MS) must be a finite number >= 0, got {self.max_wait_ms!r}"
            )
        if not isinstance(self.fill_when_idle, bool):
            raise ValueError(
                f"fill_when_idle (FMNIST_BATCH_FILL_WHEN_IDLE) must be True or False, got {self.fill_when_idle!r}"
            )
        preferred = self.preferred_batch_size
        if preferred is None:
            object.__setattr__(self, "preferred_batch_size", self.max_batch_size)
        elif (
            isinstance(preferred, bool)
            or not isinstance(preferred, int)
            or not 1 <= preferred <= self.max_batch_size
        ):
            raise ValueError(
                "preferred_batch_size (FMNIST_PREFERRED_BATCH_SIZE) must be an integer from 1 to "
                f"max_batch_size ({self.max_batch_size}), got {preferred!r}"
            )

    @property
    def preferred(self) -> int:
        """`preferred_batch_size`, resolved (never None after construction)."""
        return self.preferred_batch_size or self.max_batch_size

    @property
    def max_wait_s(self) -> float:
        return self.max_wait_ms / 1000.0

    def full_size(self, waiting: int) -> int:
        """Images that make a batch full with `waiting` images queued (rule 1)."""
        preferred = self.preferred
        if preferred >= self.max_batch_size:
            return preferred
        share = -(-waiting // self.concurrency)  # ceil
        return min(self.max_batch_size, max(preferred, share))

    def decide(self, state: QueueState) -> Decision:
        """The next step for this queue state (rules 1-5 of the module docstring)."""
        if state.waiting == 0 or state.oldest_arrival is None:
            return Decision(stop=state.closing)
        full = self.full_size(state.waiting)
        size = min(state.waiting, full)
        if size >= full and state.passes_running < 2 * self.concurrency:
            return Decision(passes=(size,))
        due_at = state.oldest_arrival + self.max_wait_s
        due = state.now >= due_at
        idle = state.passes_running == 0 and not self.fill_when_idle
        if state.passes_running < self.concurrency and (due or state.closing or idle):
            return Decision(passes=self.shares(size, state.passes_running))
        # A batch already due needs no timer: only a free pass or a full batch can release it, and
        # both wake the runner; a zero-delay timer there would spin the event loop.
        return Decision(due_at=None if due else due_at)

    def shares(self, size: int, passes_running: int) -> tuple[int, ...]:
        """A due batch of `size` images as the passes to start now (rule 5)."""
        parts = min(self.concurrency, size // MIN_SHARED_BATCH)
        if size >= self.preferred or parts <= 1:
            return (size,)
        part_size = -(-size // parts)  # ceil
        sizes = [min(part_size, size - start) for start in range(0, size, part_size)]
        free = max(1, self.concurrency - passes_running)
        return tuple(sizes[:free])


def _require_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
