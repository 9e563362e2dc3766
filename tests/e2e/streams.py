"""Submitting through the SDK and counting what the websocket delivers, per request id."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from fmnist_client import AsyncClient, Prediction


@dataclass
class Delivery:
    """What one websocket consumer saw: every result in arrival order, deliveries per id, and when
    (`time.monotonic()`) each id first arrived."""

    results: list[Prediction] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    arrived_at: dict[str, float] = field(default_factory=dict)

    def of(self, ids: Sequence[str]) -> dict[str, Prediction]:
        wanted = set(ids)
        return {r.request_id: r for r in self.results if r.request_id in wanted}

    def missing(self, ids: Sequence[str]) -> list[str]:
        return [i for i in ids if self.counts[i] == 0]

    def duplicated(self, ids: Sequence[str]) -> dict[str, int]:
        return {i: self.counts[i] for i in ids if self.counts[i] > 1}


class StreamCollector:
    """Runs `client.stream()` (no id filter, so the SDK drops nothing) in a background task."""

    def __init__(self, client: AsyncClient) -> None:
        self.client = client
        self.delivery = Delivery()
        self.connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    async def __aenter__(self) -> StreamCollector:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        async for prediction in self.client.stream(reconnects=None):
            self.delivery.results.append(prediction)
            self.delivery.counts[prediction.request_id] += 1
            self.delivery.arrived_at.setdefault(prediction.request_id, time.monotonic())
            self._changed.set()

    async def wait_for(
        self, condition: Callable[[Delivery], bool], within_s: float, what: str
    ) -> None:
        """Wait until `condition(delivery)` holds; the stream task's own error is raised if it died."""
        deadline = time.monotonic() + within_s
        while not condition(self.delivery):
            if self._task is not None and self._task.done():
                self._task.result()
                raise AssertionError(f"the result stream ended before {what}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out after {within_s:.0f} s waiting for {what}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout=min(remaining, 0.5))

    async def wait_for_all(self, ids: Sequence[str], within_s: float, grace_s: float = 1.0) -> None:
        """Wait until every id has arrived, then `grace_s` longer so late duplicates are seen too."""
        await self.wait_for(lambda d: not d.missing(ids), within_s, f"{len(ids)} results")
        await asyncio.sleep(grace_s)


async def submit_all(
    client: AsyncClient,
    images: Sequence[bytes],
    labels: Sequence[int],
    *,
    concurrency: int = 32,
) -> list[str]:
    """Submit each image through the SDK with its label as metadata; the request ids in input order."""
    semaphore = asyncio.Semaphore(concurrency)

    async def submit_one(index: int) -> str:
        async with semaphore:
            handle = await client.submit(
                images[index], metadata={"label": str(labels[index]), "index": str(index)}
            )
            return handle.request_id

    return list(await asyncio.gather(*(submit_one(i) for i in range(len(images)))))


def accuracy(results: dict[str, Prediction]) -> float:
    """Share of completed results whose label matches the true label in their metadata."""
    correct = sum(
        1
        for r in results.values()
        if r.label is not None and str(r.label) == r.metadata.get("label")
    )
    return correct / max(1, len(results))
