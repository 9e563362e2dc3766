"""The batching policy alone: a queue state and a clock in, a decision out (no threads, no loop)."""

from __future__ import annotations

from typing import Any

import pytest

from ml.batching import MIN_SHARED_BATCH, BatchingPolicy, Decision, QueueState

WAIT = 0.005  # max_wait_ms=5 in seconds


def state(
    waiting: int,
    *,
    oldest: float = 0.0,
    running: int = 0,
    closing: bool = False,
    now: float = 0.0,
) -> QueueState:
    """A queue of `waiting` images, the oldest arrived at `oldest`, looked at `now`."""
    return QueueState(waiting, oldest if waiting else None, running, closing, now)


def test_an_empty_queue_waits_without_a_timer() -> None:
    """Nothing queued: wait for a submit, no timer to arm."""
    assert BatchingPolicy().decide(state(0)) == Decision()


def test_an_empty_queue_stops_when_closing() -> None:
    """Nothing queued while closing: the batching loop ends."""
    assert BatchingPolicy().decide(state(0, closing=True)) == Decision(stop=True)


def test_a_lone_image_waits_until_max_wait_while_a_pass_is_busy() -> None:
    """One of two passes busy, one image at t=1.0, max_wait_ms=5: a timer for 1.005, then a pass of 1."""
    policy = BatchingPolicy(max_batch_size=64, max_wait_ms=5, concurrency=2)
    assert policy.decide(state(1, oldest=1.0, running=1, now=1.001)) == Decision(due_at=1.0 + WAIT)
    assert policy.decide(state(1, oldest=1.0, running=1, now=1.0 + WAIT)) == Decision(passes=(1,))


def test_a_lone_image_goes_at_once_when_every_pass_is_idle() -> None:
    """No pass running: nothing will finish and bring company, so one image goes before it is due."""
    policy = BatchingPolicy(max_batch_size=64, max_wait_ms=5, concurrency=2)
    assert policy.decide(state(1, oldest=1.0, now=1.0)) == Decision(passes=(1,))


def test_what_waits_on_an_idle_runner_is_shared_among_its_passes() -> None:
    """No pass running: 40 images not yet due start at once as two passes of 20."""
    policy = BatchingPolicy(max_batch_size=128, max_wait_ms=1000, concurrency=2)
    assert policy.decide(state(40, oldest=1.0, now=1.0)) == Decision(passes=(20, 20))


def test_fill_when_idle_keeps_a_lone_image_waiting_on_an_idle_runner() -> None:
    """fill_when_idle: one image on an idle runner still waits max_wait_ms for company."""
    policy = BatchingPolicy(max_batch_size=64, max_wait_ms=5, fill_when_idle=True)
    assert policy.decide(state(1, oldest=1.0, now=1.001)) == Decision(due_at=1.0 + WAIT)
    assert policy.decide(state(1, oldest=1.0, now=1.0 + WAIT)) == Decision(passes=(1,))


def test_the_due_time_runs_from_the_oldest_image() -> None:
    """Ten images, the oldest 4 ms old, a pass busy: due 1 ms from now, however recent the others are."""
    policy = BatchingPolicy(max_batch_size=64, max_wait_ms=5, concurrency=2)
    assert policy.decide(state(10, oldest=2.0, running=1, now=2.004)).due_at == pytest.approx(
        2.0 + WAIT
    )


def test_a_full_batch_goes_at_once_even_while_every_pass_is_busy() -> None:
    """max_batch_size images go before they are due, with `concurrency` passes already running."""
    policy = BatchingPolicy(max_batch_size=8, max_wait_ms=1000, concurrency=2)
    assert policy.decide(state(20, running=2)) == Decision(passes=(8,))


def test_full_batches_queue_behind_at_most_concurrency_busy_passes() -> None:
    """With 2 × concurrency passes handed over, even a full batch waits for one to finish."""
    policy = BatchingPolicy(max_batch_size=8, max_wait_ms=1000, concurrency=2)
    assert policy.decide(state(20, running=4, now=0.5)) == Decision(due_at=1.0)


def test_a_due_batch_waits_for_a_free_pass_without_a_timer() -> None:
    """Due but every pass busy: wait for a pass to finish, and arm no (zero-delay) timer."""
    policy = BatchingPolicy(max_batch_size=64, max_wait_ms=5, concurrency=1)
    assert policy.decide(state(3, running=1, now=1.0)) == Decision()


def test_closing_releases_a_batch_that_is_not_due() -> None:
    """While closing nothing more arrives: a free pass takes what is queued without waiting."""
    policy = BatchingPolicy(max_batch_size=64, max_wait_ms=1000)
    assert policy.decide(state(3, closing=True)) == Decision(passes=(3,))


def test_a_deep_queue_fills_batches_past_the_preferred_size() -> None:
    """preferred 8, max 64: 200 waiting make a full batch of 64; 20 over 2 passes, of 10."""
    policy = BatchingPolicy(max_batch_size=64, preferred_batch_size=8, max_wait_ms=1000)
    assert policy.decide(state(200)) == Decision(passes=(64,))
    assert BatchingPolicy(64, 1000, 2, 8).full_size(20) == 10
    assert policy.full_size(3) == 8


def test_a_due_batch_is_split_among_the_free_passes() -> None:
    """concurrency 2: 40 due images on two free passes start as two passes of 20."""
    policy = BatchingPolicy(max_batch_size=128, max_wait_ms=0, concurrency=2)
    assert policy.decide(state(40, now=1.0)) == Decision(passes=(20, 20))


def test_only_the_parts_for_free_passes_start() -> None:
    """One of two passes busy: 40 due images start one part of 20; the rest stay queued."""
    policy = BatchingPolicy(max_batch_size=128, max_wait_ms=0, concurrency=2)
    assert policy.decide(state(40, running=1, now=1.0)) == Decision(passes=(20,))


def test_a_batch_too_small_to_share_runs_whole() -> None:
    """Fewer than 2 × MIN_SHARED_BATCH due images run as one pass: smaller parts cost more per image."""
    policy = BatchingPolicy(max_batch_size=128, max_wait_ms=0, concurrency=2)
    size = 2 * MIN_SHARED_BATCH - 1
    assert policy.decide(state(size, now=1.0)) == Decision(passes=(size,))


@pytest.mark.parametrize(
    ("settings", "names"),
    [
        ({"max_batch_size": 0}, "FMNIST_MAX_BATCH_SIZE"),
        ({"max_batch_size": True}, "FMNIST_MAX_BATCH_SIZE"),
        ({"max_wait_ms": -1}, "FMNIST_BATCH_FILL_WAIT_MS"),
        ({"max_wait_ms": float("nan")}, "FMNIST_BATCH_FILL_WAIT_MS"),
        ({"concurrency": 0}, "FMNIST_INFERENCE_CONCURRENCY"),
        ({"max_batch_size": 8, "preferred_batch_size": 9}, "FMNIST_PREFERRED_BATCH_SIZE"),
        ({"fill_when_idle": "yes"}, "FMNIST_BATCH_FILL_WHEN_IDLE"),
    ],
)
def test_settings_that_cannot_work_are_rejected_naming_the_setting(
    settings: dict[str, Any], names: str
) -> None:
    """Each impossible setting is a ValueError naming its environment variable."""
    with pytest.raises(ValueError, match=names):
        BatchingPolicy(**settings)
