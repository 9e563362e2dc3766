"""Every worker of the old version replaced by workers of a new one under steady load on Kafka
(Tansu): nothing failed, lost or delivered twice (issue 15, item 5), by either procedure: v1 by v2
through the model's shared group, then v2 by v1 again through the traffic weights (docs/rollout.md,
"Replacing a version without a pause"), on one stack.

The old workers leave one at a time (`Stack.retire_workers`, `retire_from_group`): on Tansu 0.6.0
workers leaving together can leave their group without a leader for good (docs/benchmarks.md,
"Worker swap"). The latency during the swap is `bench/swap.py`'s to measure, not asserted here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.conftest import PROCESS_START_TIMEOUT_S, WORKER_READY, Stack, tansu_stack
from tests.e2e.swap import SwapRun, recalibrated_checkpoint, swap_under_load

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.kafka,
    pytest.mark.data,
    pytest.mark.timeout(120),
]

OLD = ("swap-v1-a", "swap-v1-b")
NEW = ("swap-v2-a", "swap-v2-b")
# v1 again, replacing v2 through the weights: one worker, as a worker's start is most of a swap's time
BACK = ("swap-v1-c",)
RATE_PER_S = 25.0
PHASE_S = 1.5  # of load before the swap and after it


@dataclass
class SwapStack:
    """Tansu (4 partitions), a gateway and the workers of whichever swap ran last."""

    stack: Stack
    v1: Path
    v2: Path
    pngs: list[bytes]

    def swap(
        self, old: Sequence[str], new: Sequence[str], to: Path, *, via_weights: bool
    ) -> SwapRun:
        """`old` replaced by `new` workers on `to` under the steady load."""
        return asyncio.run(
            swap_under_load(
                self.stack,
                "swap",
                self.pngs,
                rate=RATE_PER_S,
                steady_s=PHASE_S,
                after_s=PHASE_S,
                old=old,
                new=new,
                new_checkpoint=to,
                via_weights=via_weights,
            )
        )


@pytest.fixture(scope="module")
def swap_stack(
    e2e_log_dir: Path,
    e2e_checkpoint: Path,
    tmp_path_factory: pytest.TempPathFactory,
    test_pngs: tuple[list[bytes], list[int]],
) -> Iterator[SwapStack]:
    """One stack for both swaps (a stack's start costs more than a swap): two v1 workers."""
    with tansu_stack(
        e2e_log_dir, e2e_checkpoint, "tansu-swap", url_options="&partitions=4"
    ) as stack:
        starting = [stack.start_worker(name, wait_ready=False) for name in OLD]
        stack.start_gateway("swap")
        # Made while the v1 workers load torch: the machine has idle time then.
        v2 = recalibrated_checkpoint(e2e_checkpoint, tmp_path_factory.mktemp("v2"))
        for worker in starting:
            worker.wait_for_log(WORKER_READY, timeout=PROCESS_START_TIMEOUT_S)
        yield SwapStack(stack, e2e_checkpoint, v2, test_pngs[0][:200])


@pytest.fixture(scope="module")
def group_swap(swap_stack: SwapStack) -> SwapRun:
    """v1 workers replaced by v2 workers in the model's shared group: the v2 workers join it, the
    v1 workers leave it one at a time."""
    return swap_stack.swap(OLD, NEW, swap_stack.v2, via_weights=False)


@pytest.fixture(scope="module")
def weights_swap(swap_stack: SwapStack, group_swap: SwapRun) -> SwapRun:
    """Then both v2 workers replaced by one v1 worker through the weights: the traffic moves from
    v2's version topic to v1's before the v2 workers leave."""
    return swap_stack.swap(NEW, BACK, swap_stack.v1, via_weights=True)


@pytest.fixture(params=["via-group", "via-weights"])
def swap_run(request: pytest.FixtureRequest) -> SwapRun:
    """Each swap's run, for the checks both procedures must pass."""
    name = "group_swap" if request.param == "via-group" else "weights_swap"
    run: SwapRun = request.getfixturevalue(name)
    return run


def test_every_submission_during_the_swap_is_accepted(swap_run: SwapRun) -> None:
    """Submissions before, during and after the swap are all answered 202 (no 503 gap)."""
    assert swap_run.refused == []
    assert len(swap_run.accepted) > 2 * PHASE_S * RATE_PER_S


def test_every_accepted_request_reaches_the_stream(swap_run: SwapRun) -> None:
    """Each id answered 202 has its result pushed to the websocket: none lost in the swap."""
    assert swap_run.delivery.missing(swap_run.accepted) == []


def test_no_result_is_delivered_twice(swap_run: SwapRun) -> None:
    """No id reaches the websocket twice, though the old workers' partitions moved."""
    assert swap_run.delivery.duplicated(swap_run.accepted) == {}


def test_no_request_fails_during_the_swap(swap_run: SwapRun) -> None:
    """Every result of the swap is completed, none failed."""
    results = swap_run.delivery.of(swap_run.accepted)
    failed = {i: r.error for i, r in results.items() if r.status != "completed"}
    assert failed == {}


def test_the_old_workers_drain_and_exit_cleanly(swap_run: SwapRun) -> None:
    """Both old workers exit 0 after their SIGTERM (drained, not killed)."""
    assert swap_run.drain_exit_codes == [0, 0]


def test_results_switch_from_the_old_version_to_the_new(swap_run: SwapRun) -> None:
    """Requests before the swap are answered by the old version, those after it by the new only."""
    before = swap_run.versions_submitted(end=swap_run.swap_started)
    after = swap_run.versions_submitted(start=swap_run.swap_ended)
    assert len(before) == 1 and len(after) == 1 and before != after
