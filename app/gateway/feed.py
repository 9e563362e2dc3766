"""The gateway's results feed: consume the results topic (read-back on start), share results through Redis, read them back.

`ResultsFeed` stores what the workers publish in the gateway's `ResultStore`: alone, every result of the
last TTL (and the accepted markers that restore this gateway's pending ids after a restart); with shared
state, this gateway's share of the results goes to Redis undecoded, and each gateway decodes those that
reach it on its channels. The lookups behind the routes (`lookup`, `wait_for_all`, `stored_results`)
read the local store first, then Redis.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from prometheus_client import Counter

from app.gateway.metrics import GatewayMetrics
from app.gateway.refusals import shared_unavailable
from app.gateway.results import (
    ACCEPTED_KIND,
    EXPIRY_GRACE_S,
    MARKER_KIND_ATTR,
    AcceptedMarker,
    ResultStore,
    StoredResult,
    Submission,
)
from app.gateway.rollout import RolloutState
from app.gateway.shared_state import SharedState
from app.logs import kv
from app.protocol import (
    COMPLETED_AT_ATTR,
    GATEWAY_ATTR,
    OWNER_ATTR,
    ErrorInfo,
    ResultMessage,
    request_id_from,
)
from app.settings import Settings
from messaging import Message, Subscription

log = logging.getLogger(__name__)

_RESULTS_CHUNK = 512  # results taken from the subscription in one go
# The results read-back counts as caught up once a receive waits this long for nothing.
REPLAY_QUIET_S = 0.5
_SHARED_RETRY_S = 0.5  # between tries to write a chunk of results while Redis is down


@dataclass(slots=True)
class _ReadBack:
    """Where the read-back of the results topic stands (`ResultsFeed.consume`)."""

    replaying: bool = True
    caught_up: bool = False
    replayed: int = 0
    restored: int = 0


class ResultsFeed:
    """The results topic into the result store (or Redis), and the reads of results behind the routes."""

    def __init__(
        self,
        settings: Settings,
        store: ResultStore,
        metrics: GatewayMetrics,
        *,
        rollout: RolloutState,
        gateway_id: str,
        results_group: str,
    ) -> None:
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self.rollout = rollout  # counts the results of requests this gateway routed, per version
        self.gateway_id = gateway_id
        self.results_group = results_group
        # Set by the gateway once created: the shared state's sink is this feed's `take_published`.
        self.shared: SharedState | None = None
        self.results_decoded = Counter(
            "fmnist_results_decoded",
            "Results this gateway decoded (with shared state: those of its requests and watched owners).",
            registry=metrics.registry,
        )
        self._repairs: set[asyncio.Task[None]] = set()  # malformed shared results being replaced
        self.result_listeners: list[Callable[[ResultMessage], None]] = []
        """Told each result this gateway stores and counts (the shadow comparison's live side)."""

    # --- consuming the results topic -----------------------------------------------------------
    async def consume(
        self, subscription: Subscription, durable: bool, on_caught_up: Callable[[], None]
    ) -> None:
        """Store results until the subscription ends; `on_caught_up()` once the read-back of the last
        TTL caught up.

        Caught up means: a receive found nothing for `REPLAY_QUIET_S` (at once in process), or a result
        completed after the read-back began arrived (live traffic reached us), or
        `result_replay_timeout_s` passed. With shared state there is no read-back.
        """
        live_since = time.time()
        replay_deadline = time.monotonic() + self.settings.result_replay_timeout_s
        progress = _ReadBack(replaying=self.shared is None)
        # An in-process broker queues its whole history at join: nothing ready means caught up.
        quiet_s = REPLAY_QUIET_S if durable else 0.0
        self._check_caught_up(progress, live_since, on_caught_up)
        while True:
            try:
                async with asyncio.timeout(quiet_s if progress.replaying else None):
                    messages = await subscription.receive_batch(_RESULTS_CHUNK)
            except TimeoutError:
                messages = []
                progress.replaying = False
            else:
                if not messages:
                    return  # the subscription ended
            if self.shared is not None:
                await self._share_results(messages)
            else:
                await self._take_results(messages, live_since, progress)
            if progress.replaying and time.monotonic() > replay_deadline:
                progress.replaying = False
            self._check_caught_up(progress, live_since, on_caught_up)

    def _check_caught_up(
        self, progress: _ReadBack, live_since: float, on_caught_up: Callable[[], None]
    ) -> None:
        """Call `on_caught_up` once the read-back is over; log it once."""
        if progress.replaying or progress.caught_up:
            return
        progress.caught_up = True
        on_caught_up()
        log.info(
            kv(
                "results_caught_up",
                group=self.results_group,
                replayed=progress.replayed,
                pending_restored=progress.restored,
                took_s=round(time.time() - live_since, 3),
            )
        )

    async def _take_results(
        self, messages: Sequence[Message], live_since: float, progress: _ReadBack
    ) -> None:
        """Store a chunk of the results topic (results and accepted markers), count what was stored
        in one go, then ack the chunk."""
        stored_results: list[ResultMessage] = []
        duplicates = 0
        for message in messages:
            if message.attributes.get(MARKER_KIND_ATTR) == ACCEPTED_KIND:
                progress.restored += self._restore_pending(message.data, live_since)
                continue
            result = self._decode_logged(message)
            if result is None:
                continue
            read_back = result.completed_at < live_since
            if read_back:
                progress.replayed += 1
            else:
                progress.replaying = False
            stored = self.store.add_result(
                result, completed_at=result.completed_at, read_back=read_back
            )
            if stored is not None:
                stored_results.append(result)
            elif not progress.replaying:  # during the read-back, known results are expected again
                duplicates += 1
        self.results_decoded.inc(len(messages))
        if duplicates:
            self.metrics.duplicate_results.inc(duplicates)
        self._record_many(stored_results)
        for message in messages:
            await message.ack()

    async def _decode(self, message: Message) -> ResultMessage | None:
        """The result in a results-topic message, counted; None (and the message acked) if malformed."""
        self.results_decoded.inc()
        result = self._decode_logged(message)
        if result is None:
            await message.ack()
        return result

    def _decode_logged(self, message: Message) -> ResultMessage | None:
        """The result in a results-topic message; None (logged, counted) if malformed."""
        try:
            return ResultMessage.from_bytes(message.data)
        except ValueError as exc:
            # A malformed result can never become valid: drop it, loudly.
            log.warning(kv("malformed_result", key=message.key, error=exc))
            self.metrics.errors.labels("malformed_result").inc()
            return None

    def _restore_pending(self, data: bytes, live_since: float) -> int:
        """This gateway's requests from before a restart: `pending` again until their results come."""
        try:
            marker = AcceptedMarker.from_bytes(data)
        except ValueError as exc:
            log.warning(kv("malformed_marker", error=exc))
            return 0
        # Markers of this process are for requests it knows; expired ones could only turn into a
        # `failed` that beats their real result, still further along the log.
        if (
            marker.gateway_id != self.gateway_id
            or marker.accepted_at >= live_since
            or marker.deadline + EXPIRY_GRACE_S < time.time()
        ):
            return 0
        return self.store.add_pending_from_marker(marker)

    # --- shared results (Redis) ----------------------------------------------------------------
    async def _share_results(self, messages: Sequence[Message]) -> None:
        """Write this gateway's share of the results to Redis (first per id wins), then ack them.

        While Redis is down the chunk is retried and stays unacked: nothing taken is lost.
        """
        shared = self.shared
        assert shared is not None
        horizon = time.time() - self.settings.result_ttl_s
        batch: list[tuple[str, str, bytes, str]] = []
        for message in messages:
            if message.attributes.get(MARKER_KIND_ATTR) == ACCEPTED_KIND:
                continue  # markers serve the single-gateway read-back only
            routed = _routing(message)
            if routed is None:  # an older worker's result, without routing attributes
                result = await self._decode(message)
                if result is None or not _plain_id(result.request_id):
                    continue
                routed = (result.request_id, result.owner, result.completed_at, "")
            request_id, owner, completed_at, gateway = routed
            if completed_at >= horizon:
                batch.append((request_id, owner, message.data, gateway))
        while True:
            try:
                cursors = await shared.store_results(batch)
            except Exception as exc:
                log.debug(kv("shared_results_store_failed", error=exc))
                await asyncio.sleep(_SHARED_RETRY_S)
                continue
            break
        self.metrics.duplicate_results.inc(sum(1 for cursor in cursors if not cursor))
        for message in messages:
            await message.ack()

    def take_published(self, cursor: int, request_id: str, data: bytes, own: bool) -> None:
        """Decode a result published by the shared state into the local store; count it here when
        it came on this gateway's own channel (this gateway accepted it)."""
        self.results_decoded.inc()
        try:
            result = ResultMessage.from_bytes(data)
        except ValueError as exc:
            failed = self._unparsable(request_id, exc)
            if failed is None:
                return
            result = failed
            if own and self.shared is not None:
                repair = asyncio.create_task(self.shared.replace_result(result, cursor))
                self._repairs.add(repair)
                repair.add_done_callback(self._repairs.discard)
        stored = self._take_shared(result, cursor)
        if stored is not None and own:
            self._record(result)

    def _record(self, result: ResultMessage) -> None:
        """Count a result stored here, and hand it to the listeners."""
        self._record_many((result,))

    def _record_many(self, results: Sequence[ResultMessage]) -> None:
        """Count results stored here, and hand each to the listeners."""
        if not results:
            return
        self.metrics.record_results(results)
        record = self.rollout.record_result
        listeners = self.result_listeners
        for result in results:
            record(result)
            for listener in listeners:
                listener(result)

    def _unparsable(self, request_id: str, exc: ValueError) -> ResultMessage | None:
        """A failed result in place of a worker's result that cannot be parsed, for a request
        pending here; None (logged) when it is not pending here."""
        pending = self.store.get_pending(request_id)
        log.warning(
            kv("malformed_result", key=request_id, pending_here=pending is not None, error=exc)
        )
        if pending is None:
            return None
        return ResultMessage(
            request_id=request_id,
            status="failed",
            completed_at=time.time(),
            owner=pending.owner,
            metadata=pending.metadata,
            error=ErrorInfo(
                code="malformed_result",
                message="the worker's result for this request could not be parsed; submit it again",
            ),
        )

    def _take_shared(self, result: ResultMessage, cursor: int) -> StoredResult | None:
        """A result from Redis (a channel or a lookup) into the local store, under its shared cursor."""
        return self.store.add_result(result, completed_at=result.completed_at, cursor=cursor)

    async def resync_pending(self) -> None:
        """After (re)subscribing: fetch results of local pending ids published while unsubscribed."""
        shared = self.shared
        if shared is None:
            return
        for cursor, result in await shared.get_results(self.store.pending_ids()):
            self._take_shared(result, cursor)

    # --- reading results (one gateway, or any of them with shared state) -----------------------
    async def lookup(self, request_id: str) -> StoredResult | Submission | None:
        """The result of `request_id`, else its pending submission, else None: locally, then in Redis."""
        found = self.store.get_result(request_id) or self.store.get_pending(request_id)
        shared = self.shared
        if found is not None or shared is None:
            return found

        async def stored() -> StoredResult | None:
            for cursor, result in await shared.get_results([request_id]):
                return self._take_shared(result, cursor) or self.store.get_result(request_id)
            return None

        try:
            # The result may replace the pending entry between the two looks: then look again.
            return await stored() or await shared.get_pending(request_id) or await stored()
        except Exception as exc:
            raise shared_unavailable(exc) from None

    async def wait_for_all(self, owner: str, request_ids: list[str], wait_s: float) -> None:
        """Return once every id has a result (here or, with shared state, on any gateway), or after `wait_s`."""
        shared = self.shared
        if shared is None or wait_s <= 0:
            await self.store.wait_for_all(request_ids, wait_s)
            return
        # Ids this gateway accepted come on its own channel; others on their owner's.
        foreign = [rid for rid in request_ids if self.store.get_pending(rid) is None]
        if not foreign:
            await self.store.wait_for_all(request_ids, wait_s)
            return
        await self.watch(owner)
        try:
            missing = [rid for rid in foreign if self.store.get_result(rid) is None]
            for cursor, result in await shared.get_results(missing):
                self._take_shared(result, cursor)
            await self.store.wait_for_all(request_ids, wait_s)
        finally:
            await shared.unwatch(owner)

    async def watch(self, owner: str) -> None:
        """With shared state: receive `owner`'s results from any gateway until `shared.unwatch`."""
        if self.shared is not None:
            try:
                await self.shared.watch(owner)
            except Exception as exc:
                await self.shared.unwatch(owner)
                raise shared_unavailable(exc) from None

    async def stored_results(
        self, owner: str, request_ids: set[str] | None, after: int | None
    ) -> list[StoredResult]:
        """With shared state: `owner`'s results after the cursor, and those of `request_ids`, from Redis."""
        shared = self.shared
        if shared is None:
            return []
        found: list[tuple[int, ResultMessage]] = []
        try:
            if after is not None:
                found += await shared.results_after(owner, after)
            found += await shared.get_results(sorted(request_ids or ()))
        except Exception as exc:
            raise shared_unavailable(exc) from None
        stored = []
        for cursor, result in found:
            # The local copy when there is one, else a view under the shared cursor (not stored:
            # an old result would reach every stream of this gateway as new).
            local = self.store.get_result(result.request_id)
            stored.append(local or StoredResult(cursor, result, time.monotonic()))
        return stored


def _plain_id(request_id: str) -> bool:
    """Whether a request id can travel in a published "CURSOR REQUEST_ID JSON" value."""
    return bool(request_id) and not any(c.isspace() for c in request_id)


def _routing(message: Message) -> tuple[str, str, float, str] | None:
    """(request id, owner, completed_at, accepting gateway or "") from a result's attributes
    (its key for the request id, from workers before it moved there), without decoding it; None
    when a worker did not add them."""
    attributes = message.attributes
    owner = attributes.get(OWNER_ATTR)
    completed_at = attributes.get(COMPLETED_AT_ATTR)
    request_id = request_id_from(attributes, message.key)
    if owner is None or completed_at is None or not _plain_id(request_id):
        return None
    try:
        completed = float(completed_at)
    except ValueError:
        return None
    return request_id, owner, completed, attributes.get(GATEWAY_ATTR, "")
