"""The engine of a replay, shared by `fmnist replay` and `fmnist serve`'s replay endpoint: read a
window of a model's requests topic and the live results of the same requests, each in a consumer group
of its own (the live groups' positions are never touched), run the window through a candidate in this
process (batched by a `ModelRunner`) and join both sides by request id (`app.rollout.compare`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.rollout.compare import Answer, Comparison, ComparisonSummary, true_label

if TYPE_CHECKING:
    import numpy as np
    from tqdm import tqdm

    from app.settings import Settings
    from messaging import Message, Subscription
    from ml.runner import Prediction
    from ml.serving import ServedModel

logger = logging.getLogger("app.replay")

QUIET_S = 3.0  # default: a topic that yields nothing from the window for this long is caught up
JOIN_WAIT_S = 15.0  # the first message may wait on the group join and the seek to the start time
RECEIVE_CHUNK = 256  # messages taken from a subscription at once


@dataclass(frozen=True)
class Retained:
    """One retained request, decoded: the image and the true class its metadata carries."""

    request_id: str
    image: np.ndarray
    truth: int | None
    submitted_at: float = 0.0


@dataclass
class LiveResults:
    """The live answers of one model, first per request id, from the results topic. The candidate's
    own version's answers are kept apart: under a split or a promotion they would only agree with
    the candidate, so they count only when no other version answered (a replay of the live version
    against itself)."""

    model: str
    candidate_version: str | None = None
    others: dict[str, Answer] = field(default_factory=dict)
    own: dict[str, Answer] = field(default_factory=dict)
    other_versions: set[str] = field(default_factory=set)
    last_arrival: float = field(default_factory=time.monotonic)

    def take(self, message: Message) -> None:
        from app.protocol import ResultMessage

        if message.attributes.get("kind"):  # a gateway's marker, not a result
            return
        try:
            result = ResultMessage.from_bytes(message.data)
        except ValueError:
            return
        if result.model not in (None, self.model) or self.answered(result.request_id):
            return
        label = result.label if result.status == "completed" else None
        if self.candidate_version is not None and result.model_version == self.candidate_version:
            self.own[result.request_id] = Answer(label, result.inference_ms)
        else:
            self.others[result.request_id] = Answer(label, result.inference_ms)
            if result.model_version:
                self.other_versions.add(result.model_version)
        self.last_arrival = time.monotonic()

    def answered(self, request_id: str) -> bool:
        return request_id in self.others or request_id in self.own

    def answers(self, wanted: set[str]) -> tuple[dict[str, Answer], list[str]]:
        """(the live answers to `wanted`, the versions that gave them): other versions' answers,
        or the candidate's own when no other version answered any of them."""
        others = {i: a for i, a in self.others.items() if i in wanted}
        if others or self.candidate_version is None:
            return others, sorted(self.other_versions)
        own = {i: a for i, a in self.own.items() if i in wanted}
        return own, [self.candidate_version] if own else []


@dataclass
class WindowCollector:
    """The requests of a window as they are read, oldest first and once per id: those submitted
    before `until` (unix seconds), or the `last` of them."""

    until: float
    last: int | None
    num_classes: int
    kept: OrderedDict[str, Retained] = field(default_factory=OrderedDict)
    seen: set[str] = field(default_factory=set)

    def take(self, message: Message) -> bool:
        """Keep `message` if it is a decodable request of the window seen for the first time."""
        from app import protocol
        from app.worker.consumer import UndecodableRequest, decode_request

        attributes = message.attributes
        try:
            submitted_at = float(attributes.get(protocol.SUBMITTED_AT_ATTR, "0"))
            request_id, image = decode_request(message)
            metadata = protocol.decode_metadata(attributes.get(protocol.METADATA_ATTR))
        except (UndecodableRequest, ValueError):
            return False
        if submitted_at >= self.until or request_id in self.seen:
            return False  # live traffic after the replay began, or a re-queued try
        self.seen.add(request_id)
        truth = true_label(metadata, self.num_classes)
        self.kept[request_id] = Retained(request_id, image, truth, submitted_at)
        if self.last is not None and len(self.kept) > self.last:
            self.kept.popitem(last=False)
        return True

    def requests(self) -> list[Retained]:
        return list(self.kept.values())


async def read_window(
    subscription: Subscription,
    *,
    until: float,
    last: int | None,
    quiet_s: float,
    num_classes: int,
    progress: tqdm[Any] | None = None,
) -> list[Retained]:
    """The requests of the window (`WindowCollector`) read from `subscription`. Ends when nothing
    from the window arrived for `quiet_s` (`JOIN_WAIT_S` at least for the first message) or the
    subscription ended."""
    window = WindowCollector(until, last, num_classes)
    waited_from = time.monotonic()
    patience = max(quiet_s, JOIN_WAIT_S)
    while (left := patience - (time.monotonic() - waited_from)) > 0:
        try:
            batch = await asyncio.wait_for(subscription.receive_batch(RECEIVE_CHUNK), left)
        except TimeoutError:
            break
        if not batch:
            break
        for message in batch:
            await message.ack()  # the replay's own group: it moves no live position
            if window.take(message):
                waited_from, patience = time.monotonic(), quiet_s
                if progress is not None:
                    progress.update(1)
    return window.requests()


async def run_candidate(
    served: ServedModel,
    requests: list[Retained],
    comparison: Comparison,
    *,
    settings: Settings,
    progress: tqdm[Any] | None = None,
    concurrency: int | None = None,
) -> None:
    """Every request through `served` in batches; each answer (or failure) to `comparison`.
    `concurrency`: forward passes at once (default: one per usable core)."""
    from ml.runner import ModelRunner

    async with ModelRunner(
        served,
        max_batch_size=settings.max_batch_size,
        max_wait_ms=settings.batch_fill_wait_ms,
        max_queue=max(len(requests), settings.max_batch_size),
        preferred_batch_size=settings.preferred_batch_size,
        concurrency=concurrency,
    ) as runner:

        def answered(request_id: str, future: asyncio.Future[Prediction]) -> None:
            if future.cancelled() or future.exception() is not None:
                answer = Answer(None)  # the runner's per-item error: the candidate failed it
            else:
                prediction = future.result()
                answer = Answer(prediction.label, prediction.inference_ms)
            comparison.add_candidate(request_id, answer)
            if progress is not None:
                progress.update(1)

        futures = []
        for request in requests:
            future = runner.submit(request.image)
            future.add_done_callback(partial(answered, request.request_id))
            futures.append(future)
        await asyncio.gather(*futures, return_exceptions=True)


@dataclass
class ReplayOutcome:
    """What one replay did: the window's requests, the summary, where the report went."""

    replayed: int
    summary: ComparisonSummary | None
    report: Path | None
    missing_live: int = 0
    candidate_version: str | None = None


async def replay(
    settings: Settings,
    *,
    model: str,
    candidate: str,
    since: float | None,
    last: int | None,
    quiet_s: float,
    runtime: str,
    out_dir: Path,
    progress: bool,
    versions: Sequence[str] = (),
) -> ReplayOutcome:
    """Load the candidate, read the window, run it, join with the live results, write the report.
    `versions`: those whose own topics carry part of the model's traffic too (a split's weighted
    versions); their requests join the window, which stays the newest `last` of them all. Live
    answers: see `LiveResults`."""
    from app.rollout.report import write_report
    from ml.serving import load_model

    began = time.time()
    served = await asyncio.to_thread(
        load_model,
        candidate,
        device=settings.device,
        precision=settings.inference_precision,
        runtime=runtime,
    )
    comparison = Comparison(served.class_names)
    start = since if since is not None else 0.0  # --last: from the oldest retained request
    live = LiveResults(model, candidate_version=served.version)
    spec = _Window(model, versions, start, began, last, quiet_s)
    window, broker_url = await _replay_window(
        settings, served, comparison, live, spec, progress=progress
    )
    if not window:
        return ReplayOutcome(0, None, None, candidate_version=served.version)
    live_versions = join_live(comparison, window, live)
    details = {
        "model": model,
        "live versions": ", ".join(live_versions) or "unknown",
        "candidate": f"`{candidate}` (version {served.version}, {served.precision}, "
        f"{served.description.runtime} on {served.description.device})",
        "window": f"last {last} requests" if last else f"since {datetime.fromtimestamp(start)}",
        "requests replayed": str(len(window)),
        "broker": broker_url,
        "replayed at": datetime.fromtimestamp(began).isoformat(timespec="seconds"),
    }
    summary = comparison.summary()
    title = f"Replay of {model} against a candidate"
    report = await asyncio.to_thread(write_report, summary, out_dir, title=title, details=details)
    missing = len(comparison.waiting_for_live())
    return ReplayOutcome(len(window), summary, report, missing, served.version)


def join_live(comparison: Comparison, window: Sequence[Retained], live: LiveResults) -> list[str]:
    """Add the live answers to the window's requests to `comparison`; the versions that gave them."""
    answers, live_versions = live.answers({request.request_id for request in window})
    for request in window:
        answer = answers.get(request.request_id)
        if answer is not None:
            comparison.add_live(request.request_id, answer, request.truth)
    return live_versions


@dataclass(frozen=True)
class _Window:
    """Which requests a replay reads: a model's topics (its own and its split versions'), from
    `start`, submitted before `until`, the `last` newest; caught up after `quiet_s` of silence."""

    model: str
    versions: Sequence[str]
    start: float
    until: float
    last: int | None
    quiet_s: float


async def _replay_window(
    settings: Settings,
    served: ServedModel,
    comparison: Comparison,
    live: LiveResults,
    spec: _Window,
    *,
    progress: bool,
) -> tuple[list[Retained], str]:
    """Read the window's requests, run them through `served` into `comparison` and collect their
    live answers into `live`; returns the window and the broker's URL."""
    from tqdm import tqdm

    from app.broker import connect_broker
    from app.protocol import requests_topic_for

    group = f"replay.{spec.model}.{uuid.uuid4().hex[:8]}"
    topics = [requests_topic_for(settings.requests_topic, spec.model)]
    topics += [requests_topic_for(settings.requests_topic, spec.model, v) for v in spec.versions]
    pubsub = connect_broker(settings)
    async with pubsub, contextlib.AsyncExitStack() as stack:
        # A group per topic: consumers of one group on different topics would rebalance each other.
        requests_in = [
            pubsub.subscribe(topic, group=f"{group}.{i}", start=spec.start, max_in_flight=1024)
            for i, topic in enumerate(topics)
        ]
        results_in = pubsub.subscribe(
            settings.results_topic, group=f"{group}.results", start=spec.start, max_in_flight=1024
        )
        for subscription in [*requests_in, results_in]:
            stack.push_async_callback(subscription.aclose)
        # Every group joins at once: a join waits out the broker's rebalance delay.
        await asyncio.gather(*(s.start() for s in [*requests_in, results_in]))
        reading = asyncio.create_task(_read_results(results_in, live))
        stack.push_async_callback(_cancelled, reading)
        total = spec.last if len(topics) == 1 else None  # N per topic, at most N kept
        bar = partial(tqdm, unit="req", disable=not progress, file=sys.stderr)
        with bar(desc="requests", total=total) as reading_bar:
            windows = await asyncio.gather(
                *(
                    read_window(
                        subscription,
                        until=spec.until,
                        last=spec.last,
                        quiet_s=spec.quiet_s,
                        num_classes=len(served.class_names),
                        progress=reading_bar,
                    )
                    for subscription in requests_in
                )
            )
        window = newest_of(windows, spec.last)
        if window:
            with bar(desc="candidate", total=len(window)) as running_bar:
                await run_candidate(
                    served, window, comparison, settings=settings, progress=running_bar
                )
            wanted = {request.request_id for request in window}
            await _until_answered(live, wanted, spec.quiet_s)
    return window, pubsub.url


async def _cancelled(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def newest_of(windows: Sequence[list[Retained]], last: int | None) -> list[Retained]:
    """The windows of several topics as one, oldest first, cut to the `last` newest."""
    merged = sorted((r for window in windows for r in window), key=lambda r: r.submitted_at)
    return merged[-last:] if last is not None else merged


async def _read_results(subscription: Subscription, live: LiveResults) -> None:
    while batch := await subscription.receive_batch(RECEIVE_CHUNK):
        for message in batch:
            await message.ack()
            live.take(message)


async def _until_answered(live: LiveResults, wanted: set[str], quiet_s: float) -> None:
    """Wait until the live results hold every wanted id, or none arrived for `quiet_s`."""
    waited_from = time.monotonic()
    while not all(live.answered(request_id) for request_id in wanted):
        idle = time.monotonic() - max(live.last_arrival, waited_from)
        if idle > max(quiet_s, JOIN_WAIT_S if not (live.others or live.own) else 0.0):
            return
        await asyncio.sleep(0.05)
