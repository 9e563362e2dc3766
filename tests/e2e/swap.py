"""A worker swap under steady load: v1 workers replaced by v2 workers while a client submits at a
fixed rate and reads every result from the websocket stream. Shared by `test_swap.py` and
`bench/swap.py`, so it imports nothing from pytest.

Two procedures: through the model's shared group (`swap_workers`: v2 workers join the group that
carries the traffic, v1 workers leave it) and through the traffic weights (`swap_via_weights`: the
traffic moves from v1's version topic to v2's, so no group that carries traffic changes membership;
docs/rollout.md, "Replacing a version without a pause")."""

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

from app.protocol import worker_group_for
from app.settings import Settings
from ml import ImageClassifier
from ml.serving import load_model
from tests.e2e.load import fixed_rate_load
from tests.e2e.processes import (
    GROUP_FORMED_WITHIN_S,
    PROCESS_START_TIMEOUT_S,
    WORKER_READY,
    ManagedProcess,
    Stack,
    partitions_handed,
)
from tests.e2e.streams import Delivery, StreamCollector

# Results still on their way when the load stops arrive within this.
RESULTS_WITHIN_S = 30.0
# A gateway learns a started worker's version from its announcement within this.
VERSION_READY_WITHIN_S = 30.0
# Submissions still in flight when the weights moved may have chosen v1: their 202 comes within this.
V1_SUBMISSIONS_SETTLE_S = 0.5


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


async def start_consuming(stack: Stack, names: Sequence[str], checkpoint: Path) -> None:
    """Start a worker called each of `names` on `checkpoint`; return once all consume (the wait
    runs in threads, so the load and the stream go on meanwhile)."""
    started = [
        stack.start_worker(name, wait_ready=False, FMNIST_MODEL_PATH=str(checkpoint))
        for name in names
    ]
    await asyncio.gather(
        *(
            asyncio.to_thread(worker.wait_for_log, WORKER_READY, PROCESS_START_TIMEOUT_S)
            for worker in started
        )
    )


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
    await start_consuming(stack, new, new_checkpoint)
    if together:  # no wait for the groups: on Tansu they may never form again
        return await asyncio.to_thread(functools.partial(stack.stop_workers, regroup=False), *old)
    return await asyncio.to_thread(stack.retire_workers, *old)


def _handed_more(worker: ManagedProcess, group: str, before: int) -> bool:
    return partitions_handed(worker)[group] > before


def retire_from_group(stack: Stack, names: Sequence[str], group: str) -> list[int | None]:
    """SIGTERM the named workers in turn, each once every other running worker got partitions
    again in `group` after the last one left; then wait for them all to exit. Their exit codes.

    Only `group` is waited for (the model's shared group): the leaving version's own group carries
    no traffic by then, and a worker's exit after its drain takes longer than the next leave needs.
    One at a time because Tansu 0.6.0 loses a group whose leader leaves while it forms
    (`Stack.retire_workers`)."""
    leaving: list[ManagedProcess] = []
    for name in names:
        worker = stack.workers.pop(name)
        staying = {w: partitions_handed(w)[group] for w in stack.workers.values() if w.running()}
        worker.terminate()
        leaving.append(worker)
        for other, before in staying.items():
            other.wait_for(
                functools.partial(_handed_more, other, group, before),
                GROUP_FORMED_WITHIN_S,
                f"partitions again in {group} after {name} left",
            )
    return [worker.stop() for worker in leaving]


async def _ready_versions(client: AsyncClient, model: str) -> set[str]:
    return {v.version for v in (await client.model(model)).versions if v.ready}


async def _version_ready(client: AsyncClient, model: str, known: set[str]) -> str:
    """The first version of `model` the gateway lists as ready that is not in `known`."""
    deadline = time.monotonic() + VERSION_READY_WITHIN_S
    while not (fresh := await _ready_versions(client, model) - known):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no new version of {model} ready within {VERSION_READY_WITHIN_S} s")
        await asyncio.sleep(0.1)
    return min(fresh)


async def swap_via_weights(
    stack: Stack,
    client: AsyncClient,
    run: SwapRun,
    old: Sequence[str],
    new: Sequence[str],
    new_checkpoint: Path,
) -> list[int | None]:
    """The swap through the version topics: weights {v1: 100}, the `new` workers started and ready
    on the gateway, weights {v2: 100}, v1's topic answered, the `old` workers retired, the split
    cleared. The exit codes of the `old` workers.

    v1's topic is answered once every request accepted before the weights moved has its result on
    `run`'s stream (one gateway, one client: what an operator reads as v1's group lag)."""
    model = new_checkpoint.stem
    (v1,) = await _ready_versions(client, model)
    await client.set_weights(model, {v1: 100}, reason="swap: hold v1")
    await start_consuming(stack, new, new_checkpoint)
    v2 = await _version_ready(client, model, {v1})
    await client.set_weights(model, {v2: 100}, reason="swap: move to v2")
    moved = time.monotonic()
    await asyncio.sleep(V1_SUBMISSIONS_SETTLE_S)
    before = [i for i, t in run.submitted_at.items() if t < moved]
    deadline = time.monotonic() + RESULTS_WITHIN_S
    while run.delivery.missing(before):
        if time.monotonic() > deadline:
            left = len(run.delivery.missing(before))
            raise TimeoutError(f"{left} requests accepted before the weights moved unanswered")
        await asyncio.sleep(0.05)
    shared = worker_group_for(Settings.model_fields["worker_group"].default, model)
    codes = await asyncio.to_thread(retire_from_group, stack, old, shared)
    await client.set_weights(model, {}, reason="swap: v1 gone, clear the split")
    return codes


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
    via_weights: bool = False,
) -> SwapRun:
    """Steady load for `steady_s`, the swap (through the shared group, or `via_weights`), `after_s`
    more of load; then wait for every result."""
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
            if via_weights:
                run.drain_exit_codes = await swap_via_weights(
                    stack, client, run, old, new, new_checkpoint
                )
            else:
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
