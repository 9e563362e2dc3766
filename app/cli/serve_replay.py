"""The replay inside `fmnist serve` (`POST /v1/models/{name}/replay`): a model's requests that the
embedded broker retains, run through a version this process loaded, joined with the live results the
broker retains too.

The same steps as `fmnist replay` (`app.cli.replay`: the window, the candidate's runner, the join),
but it reads the broker's retained log as a snapshot (`MemoryPubSub.retained`) instead of
subscribing: no consumer group is created, moved or left behind, nothing is published, and it
needs no quiet period to know it has caught up. The candidate runs on the model object its worker
already serves, with one forward pass at a time, so the live workers keep their cores.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from app.cli.replay_engine import (
    RECEIVE_CHUNK,
    LiveResults,
    WindowCollector,
    join_live,
    newest_of,
    run_candidate,
)
from app.gateway.replay_api import LoadedVersion, ReplayBusy, ReplayFindings
from app.protocol import request_id_from, requests_topic_for
from app.rollout.compare import Comparison

if TYPE_CHECKING:
    from app.settings import Settings
    from messaging.memory import MemoryPubSub
    from ml.serving import ServedModel

# Forward passes the replay runs at once: one, so the live workers keep the other cores.
REPLAY_PASSES = 1


class EmbeddedReplay:
    """The `ReplayHook` of `fmnist serve`: replays on the embedded broker through loaded models.

    ```python
    hook = EmbeddedReplay(settings, pubsub, {"fmnist": [live_model, candidate_model]})
    findings = await hook.replay("fmnist", candidate_model.version, since=None, last=500,
                                 split_versions=[], class_names=live_model.class_names)
    ```
    """

    def __init__(
        self,
        settings: Settings,
        pubsub: MemoryPubSub,
        models: dict[str, list[ServedModel]],
    ) -> None:
        self.settings = settings
        self.pubsub = pubsub
        self._models = models
        self._running = asyncio.Lock()

    def loaded(self, model: str) -> list[LoadedVersion]:
        return [LoadedVersion(m.version, m.tag) for m in self._models.get(model, [])]

    async def replay(
        self,
        model: str,
        candidate: str,
        *,
        since: float | None,
        last: int | None,
        split_versions: Sequence[str],
        class_names: Sequence[str],
    ) -> ReplayFindings | None:
        if self._running.locked():
            raise ReplayBusy("another replay is running in this process; retry when it is done")
        served = next(m for m in self._models[model] if m.version == candidate)
        async with self._running:
            return await self._replay(served, model, since, last, split_versions, class_names)

    async def _replay(
        self,
        served: ServedModel,
        model: str,
        since: float | None,
        last: int | None,
        split_versions: Sequence[str],
        class_names: Sequence[str],
    ) -> ReplayFindings | None:
        began = time.time()
        topic = self.settings.requests_topic
        topics = [requests_topic_for(topic, model)]
        topics += [requests_topic_for(topic, model, v) for v in split_versions]
        collector = WindowCollector(began, None, len(class_names))
        for name in topics:
            for index, message in enumerate(self.pubsub.retained(name, since=since or 0.0)):
                collector.take(message)
                if index % RECEIVE_CHUNK == RECEIVE_CHUNK - 1:
                    await asyncio.sleep(0)  # the live gateway and workers share this event loop
        window = newest_of([collector.requests()], last)
        if not window:
            return None
        comparison = Comparison(class_names)
        await run_candidate(
            served, window, comparison, settings=self.settings, concurrency=REPLAY_PASSES
        )
        live = LiveResults(model, candidate_version=served.version)
        wanted = {request.request_id for request in window}
        for message in self.pubsub.retained(
            self.settings.results_topic, since=window[0].submitted_at
        ):
            if request_id_from(message.attributes, message.key) in wanted:
                live.take(message)
        live_versions = join_live(comparison, window, live)
        return ReplayFindings(
            summary=comparison.summary(),
            replayed=len(window),
            missing_live=len(comparison.waiting_for_live()),
            live_versions=live_versions,
            since=window[0].submitted_at,
            until=began,
        )
