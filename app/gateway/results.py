"""The gateway's result store: pending submissions, a bounded TTL map of results with resume cursors, waiters.

Every gateway instance sees every result (its own consumer group on the results topic), so any instance
answers GET for any id once the result arrived; `pending` is known only to the instance that accepted it.
With shared state (`app/gateway/shared_state.py`) the gateways share one group and Redis holds results,
pending ids and idempotency keys; this store is then each gateway's local view of them.
Workers may publish a request's result twice after a redelivery: the first one wins, later ones are dropped.

The log is the store: a (re)started gateway re-reads the results topic from `now - ttl_s`, so results
age from their own `completed_at`, not from when they were read. Its `pending` requests come back from
`AcceptedMarker`s: one small message per submit that the gateway publishes on the results topic next
to the requests, read back only by a gateway with the same id.
All methods run on the event loop thread; each result costs O(1) plus one call per live listener.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.protocol import ErrorInfo, ResultMessage

# A request without a result this long after its deadline is answered `failed` by the gateway:
# the worker drops expired requests, so it can no longer succeed.
EXPIRY_GRACE_S = 5.0


@dataclass(slots=True)
class Submission:
    """A request this gateway accepted and published, still waiting for its result."""

    request_id: str
    owner: str
    deadline: float  # unix seconds
    metadata: dict[str, str] = field(default_factory=dict)


def deadline_failure(submission: Submission, now: float) -> ResultMessage:
    """The `failed` result of a submission still without one past its deadline + `EXPIRY_GRACE_S`."""
    return ResultMessage(
        request_id=submission.request_id,
        status="failed",
        completed_at=now,
        owner=submission.owner,
        metadata=submission.metadata,
        error=ErrorInfo(
            code="deadline_exceeded",
            message="no worker answered before the request's deadline "
            "(FMNIST_REQUEST_DEADLINE_S); are workers running?",
        ),
    )


# A result read back after a restart gets the cursor the gateway that first stored it would have given
# it at the latest: its completion time plus this bound on the delay from a worker to a gateway. A
# stream resuming with an old gateway's cursor then gets every result it had not seen (and, again,
# those that completed within this bound before its cursor).
READ_BACK_CURSOR_LAG_S = 2.0


@dataclass(slots=True)
class StoredResult:
    """A result and its cursor: an increasing integer (the store time in µs) that streams resume after."""

    cursor: int
    result: ResultMessage
    stored_at: float  # monotonic seconds it ages from
    read_back: bool = (
        False  # re-read from the log after a (re)start: its cursor is not in store order
    )


ResultListener = Callable[[StoredResult], None]

MARKER_KIND_ATTR = "kind"
ACCEPTED_KIND = "accepted"


class AcceptedMarker(BaseModel):
    """Requests one gateway accepted in one submit, on the results topic (attribute `kind=accepted`).

    Results-topic consumers other than gateways skip messages that carry a `kind` attribute.
    """

    model_config = ConfigDict(frozen=True)

    gateway_id: str
    owner: str
    accepted_at: float = Field(description="unix seconds, as in the requests' `submitted_at`")
    deadline: float = Field(description="unix seconds, as in the requests' `deadline` attribute")
    metadata: dict[str, str] = Field(default_factory=dict)
    request_ids: list[str]

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> AcceptedMarker:
        """Parse a marker; raises ValueError on anything else."""
        try:
            return cls.model_validate_json(data)
        except ValidationError as exc:
            raise ValueError(str(exc)) from None


@dataclass(slots=True)
class _IdempotencyRecord:
    request_id: str
    fingerprint: str
    created: float  # monotonic seconds


class _Countdown:
    """One `wait_for_all` call: its future is set when the last of its ids has a result."""

    __slots__ = ("done", "remaining")

    def __init__(self, done: asyncio.Future[None], remaining: int) -> None:
        self.done = done
        self.remaining = remaining

    def arrived(self) -> None:
        self.remaining -= 1
        if self.remaining <= 0 and not self.done.done():
            self.done.set_result(None)


class ResultStore:
    """Pending submissions, results (bounded by count and age), idempotency keys and live listeners."""

    def __init__(
        self,
        *,
        max_results: int,
        ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.max_results = max_results
        self.ttl_s = ttl_s
        self._clock = clock
        self._wall_clock = wall_clock
        self._pending: dict[str, Submission] = {}
        self._results: dict[str, StoredResult] = {}
        self._order: deque[StoredResult] = deque()  # cursor order == insertion order
        self._waiters: dict[str, list[_Countdown]] = {}
        self._listeners: list[ResultListener] = []
        self._idempotency: OrderedDict[tuple[str, str], _IdempotencyRecord] = OrderedDict()
        self._last_cursor = 0
        self._read_back_held = 0  # read-back results in `_order`: while > 0 it is not cursor order
        self.duplicates = 0

    # --- submissions -----------------------------------------------------------------------
    @property
    def pending_count(self) -> int:
        return len(self._pending)

    def pending_ids(self) -> list[str]:
        return list(self._pending)

    def add_pending(self, submission: Submission) -> None:
        self._pending[submission.request_id] = submission

    def discard_pending(self, request_id: str) -> None:
        """Forget a submission that was never published (the broker refused it)."""
        self._pending.pop(request_id, None)

    # --- results ---------------------------------------------------------------------------
    def add_pending_from_marker(self, marker: AcceptedMarker) -> int:
        """Restore the submissions of a marker read back after a restart; returns how many were new.

        Ids with a result already stay answered; ids past their deadline + grace become `failed` on
        the next `expire()`.
        """
        restored = 0
        for request_id in marker.request_ids:
            if request_id in self._results or request_id in self._pending:
                continue
            self._pending[request_id] = Submission(
                request_id, marker.owner, marker.deadline, dict(marker.metadata)
            )
            restored += 1
        return restored

    def add_result(
        self,
        result: ResultMessage,
        *,
        completed_at: float | None = None,
        read_back: bool = False,
        cursor: int | None = None,
    ) -> StoredResult | None:
        """Store a result, wake its waiters and listeners; None (and nothing else) for a duplicate
        or for a result already older than the TTL.

        With `completed_at` (unix seconds) the result ages from then, not from now: a result read
        back from the log 9 minutes after it was made expires a minute later with a 10-minute TTL.
        `read_back` marks a result re-read after a (re)start: its cursor comes from `completed_at`
        (see READ_BACK_CURSOR_LAG_S), so streams resuming with an earlier gateway's cursor go on.
        `cursor` is one given by the gateways' shared state (Redis), the same on every gateway.
        """
        request_id = result.request_id
        if request_id in self._results:
            self.duplicates += 1
            return None
        self._pending.pop(request_id, None)
        now = self._clock()
        stored_at = now
        if completed_at is not None:
            # A worker's clock ahead of ours must not make a result younger than new.
            stored_at -= max(0.0, self._wall_clock() - completed_at)
            if now - stored_at > self.ttl_s:
                return None  # expired before it was read back
        if cursor is not None:
            read_back = False
        elif read_back and completed_at is not None:
            cursor = int((completed_at + READ_BACK_CURSOR_LAG_S) * 1_000_000)
            self._read_back_held += 1
        else:
            read_back = False
            cursor = max(self._last_cursor + 1, int(self._wall_clock() * 1_000_000))
        self._last_cursor = max(self._last_cursor, cursor)
        stored = StoredResult(cursor, result, stored_at, read_back)
        self._results[request_id] = stored
        self._order.append(stored)
        self._evict(now)
        waiters = self._waiters.pop(request_id, None)
        if waiters:
            for waiter in waiters:
                waiter.arrived()
        for listener in self._listeners:
            listener(stored)
        return stored

    def get_result(self, request_id: str) -> StoredResult | None:
        stored = self._results.get(request_id)
        if stored is not None and self._clock() - stored.stored_at > self.ttl_s:
            return None
        return stored

    def get_pending(self, request_id: str) -> Submission | None:
        return self._pending.get(request_id)

    async def wait_for(self, request_id: str, wait_s: float) -> StoredResult | None:
        """The result of `request_id`, waiting up to `wait_s` seconds for it; None if it did not come."""
        stored = self.get_result(request_id)
        if stored is not None or wait_s <= 0:
            return stored
        await self.wait_for_all([request_id], wait_s)
        return self.get_result(request_id)

    async def wait_for_all(self, request_ids: list[str], wait_s: float) -> None:
        """Return once every id has a result, or after `wait_s` seconds."""
        missing = [request_id for request_id in request_ids if request_id not in self._results]
        if not missing:
            return
        # One future for the whole call, counted down per result: a batch of hundreds waits without
        # a future, a callback and a wake-up per id.
        countdown = _Countdown(asyncio.get_running_loop().create_future(), len(missing))
        waiters = self._waiters
        for request_id in missing:
            waiters.setdefault(request_id, []).append(countdown)
        try:
            await asyncio.wait([countdown.done], timeout=wait_s)
        finally:
            for request_id in missing:
                listed = waiters.get(request_id)  # None once its result came
                if listed is not None and countdown in listed:
                    listed.remove(countdown)
                    if not listed:
                        del waiters[request_id]

    def results_after(self, cursor: int) -> Iterator[StoredResult]:
        """Stored results with a cursor greater than `cursor`, oldest first (for stream resume)."""
        horizon = self._clock() - self.ttl_s
        if self._read_back_held:
            # Results read back after a restart sit in arrival order, not cursor order.
            found = [s for s in self._order if s.cursor > cursor and s.stored_at >= horizon]
            yield from sorted(found, key=lambda stored: stored.cursor)
            return
        start = len(self._order)
        # Resuming clients are usually close to the newest result: scan back from the end.
        while start > 0 and self._order[start - 1].cursor > cursor:
            start -= 1
        for index in range(start, len(self._order)):
            stored = self._order[index]
            if stored.stored_at >= horizon:
                yield stored

    @property
    def last_cursor(self) -> int:
        return self._last_cursor

    def add_listener(self, listener: ResultListener) -> None:
        self._listeners.append(listener)

    def remove_listener(self, listener: ResultListener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    # --- idempotency -----------------------------------------------------------------------
    def claim_idempotency_key(
        self, owner: str, key: str, fingerprint: str, request_id: str
    ) -> tuple[str, str] | None:
        """Bind (owner, key) to `request_id`; if already bound, return the earlier (request_id, fingerprint)."""
        scope = (owner, key)
        record = self._idempotency.get(scope)
        now = self._clock()
        if record is not None and now - record.created <= self.ttl_s:
            return record.request_id, record.fingerprint
        self._idempotency[scope] = _IdempotencyRecord(request_id, fingerprint, now)
        self._idempotency.move_to_end(scope)
        while len(self._idempotency) > self.max_results:
            self._idempotency.popitem(last=False)
        return None

    def release_idempotency_key(self, owner: str, key: str, request_id: str) -> None:
        """Undo a claim whose request was never published."""
        record = self._idempotency.get((owner, key))
        if record is not None and record.request_id == request_id:
            del self._idempotency[(owner, key)]

    # --- housekeeping ----------------------------------------------------------------------
    def expire(self) -> list[StoredResult]:
        """Drop old results; answer `failed` for submissions past deadline + grace. Returns those failures."""
        now = self._clock()
        self._evict(now)
        while self._idempotency:
            oldest = next(iter(self._idempotency.values()))
            if now - oldest.created <= self.ttl_s:
                break
            self._idempotency.popitem(last=False)
        wall_now = self._wall_clock()
        overdue = []
        # Deadlines are submit time + one constant, so insertion order is deadline order.
        for submission in self._pending.values():
            if submission.deadline + EXPIRY_GRACE_S >= wall_now:
                break
            overdue.append(submission)
        failures = []
        for submission in overdue:
            stored = self.add_result(deadline_failure(submission, wall_now))
            if stored is not None:
                failures.append(stored)
        return failures

    def _evict(self, now: float) -> None:
        order = self._order
        horizon = now - self.ttl_s
        while order and (len(order) > self.max_results or order[0].stored_at < horizon):
            oldest = order.popleft()
            self._read_back_held -= oldest.read_back
            if self._results.get(oldest.result.request_id) is oldest:
                del self._results[oldest.result.request_id]
