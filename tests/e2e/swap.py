"""A worker swap under steady load: v1 workers replaced by v2 workers while a client submits at a
fixed rate and reads every result from the websocket stream. Shared by `test_swap.py` and
`bench/swap.py`, so it imports nothing from pytest."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fmnist_client import AsyncClient

from ml import ImageClassifier
from ml.serving import load_model
from tests.e2e.load import fixed_rate_load
from tests.e2e.processes import PROCESS_START_TIMEOUT_S, WORKER_READY, Stack
from tests.e2e.streams import Delivery, StreamCollector

# Results still on their way when the load stops arrive within this.
RESULTS_WITHIN_S = 30.0


def recalibrated_checkpoint(source: Path, out_dir: Path) -> Path:
    """A second version of the model in `source`: the same weights with another calibration
    temperature, so the served version differs and every label stays the same. Saved under the same
    file name (the model's name is the file's stem).

    Loaded once here as a worker loads it, so its compiled form is cached before the swap: a v2
    worker then starts in seconds instead of compiling under the load.
    """
    classifier = ImageClassifier.load(source)
    classifier.temperature = classifier.temperature * 1.5
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / source.name
    classifier.save(out)
    load_model(out, device="cpu")
    return out


@dataclass
class SwapRun:
    """What a client saw while the workers were swapped (times are `time.monotonic()`)."""

    submitted_at: dict[str, float] = field(default_factory=dict)  # ids answered 202
    refused: list[str] = field(default_factory=list)  # submissions not answered 202, and why
    delivery: Delivery = field(default_factory=Delivery)
    swap_started: float = math.inf  # the first v2 worker was started
    swap_ended: float = math.inf  # the groups formed without the last v1 worker
    drain_exit_codes: list[int | None] = field(default_factory=list)

    @property
    def accepted(self) -> list[str]:
        return list(self.submitted_at)

    def latencies_ms(self, start: float = -math.inf, end: float = math.inf) -> list[float]:
        """Submit-to-stream latency of each request submitted in [start, end) that was delivered."""
        arrived = self.delivery.arrived_at
        return [
            (arrived[i] - t) * 1000.0
            for i, t in self.submitted_at.items()
            if start <= t < end and i in arrived
        ]

    def versions_submitted(
        self, start: float = -math.inf, end: float = math.inf
    ) -> set[str | None]:
        """The model versions that answered the requests submitted in [start, end)."""
        by_id = self.delivery.of(self.accepted)
        return {
            by_id[i].model_version
            for i, t in self.submitted_at.items()
            if start <= t < end and i in by_id
        }


async def swap_workers(
    stack: Stack,
    old: Sequence[str],
    new: Sequence[str],
    new_checkpoint: Path,
    *,
    together: bool = False,
) -> list[int | None]:
    """Start the `new` workers on `new_checkpoint`, wait until they consume, then SIGTERM the `old`
    ones (one by one, or `together`) and wait for them to drain; their exit codes. Blocking waits
    run in threads so the load and the stream go on meanwhile."""
    started = [
        stack.start_worker(name, wait_ready=False, FMNIST_MODEL_PATH=str(new_checkpoint))
        for name in new
    ]
    await asyncio.gather(
        *(
            asyncio.to_thread(worker.wait_for_log, WORKER_READY, PROCESS_START_TIMEOUT_S)
            for worker in started
        )
    )
    if together:  # no wait for the groups: on Tansu they may never form again
        return await asyncio.to_thread(functools.partial(stack.stop_workers, regroup=False), *old)
    return await asyncio.to_thread(stack.retire_workers, *old)


async def swap_under_load(
    stack: Stack,
    gateway: str,
    images: Sequence[bytes],
    *,
    rate: float,
    steady_s: float,
    after_s: float,
    old: Sequence[str],
    new: Sequence[str],
    new_checkpoint: Path,
    together: bool = False,
) -> SwapRun:
    """Steady load for `steady_s`, the swap, `after_s` more of load; then wait for every result."""
    run = SwapRun()
    stop = asyncio.Event()
    async with (
        AsyncClient(stack.gateway_url(gateway), retries=0) as client,
        StreamCollector(client) as stream,
    ):
        run.delivery = stream.delivery
        await asyncio.sleep(0.3)  # the socket is subscribed before the first submission
        load = asyncio.create_task(
            fixed_rate_load([client], images, rate, run.submitted_at, run.refused, stop)
        )
        try:
            await asyncio.sleep(steady_s)
            run.swap_started = time.monotonic()
            run.drain_exit_codes = await swap_workers(
                stack, old, new, new_checkpoint, together=together
            )
            run.swap_ended = time.monotonic()
            await asyncio.sleep(after_s)
        finally:
            stop.set()
            await load
        with contextlib.suppress(AssertionError):  # what never came is `delivery.missing`
            await stream.wait_for_all(run.accepted, within_s=RESULTS_WITHIN_S)
    return run


def percentile(values: Sequence[float], q: float) -> float:
    """The `q`-th percentile (0-100) by the nearest-rank method; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]
