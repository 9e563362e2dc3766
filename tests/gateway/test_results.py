"""The result store: first result wins, bounded by size and age, resume cursors, waiters, idempotency, expiry."""

from __future__ import annotations

import asyncio
import time

import messaging
from app.gateway.results import (
    ACCEPTED_KIND,
    EXPIRY_GRACE_S,
    MARKER_KIND_ATTR,
    AcceptedMarker,
    ResultStore,
    Submission,
)
from app.protocol import ResultMessage
from tests.gateway.helpers import gateway_settings, running_gateway


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def result(request_id: str, label: int = 1) -> ResultMessage:
    return ResultMessage(request_id=request_id, status="completed", label=label, completed_at=0.0)


def test_first_result_wins() -> None:
    """A second result for the same id is dropped and counted."""
    store = ResultStore(max_results=10, ttl_s=60)
    assert store.add_result(result("a", 1)) is not None
    assert store.add_result(result("a", 2)) is None
    stored = store.get_result("a")
    assert stored is not None and stored.result.label == 1
    assert store.duplicates == 1


def test_store_is_bounded_by_count() -> None:
    """Past `max_results` the oldest results are evicted."""
    store = ResultStore(max_results=3, ttl_s=60)
    for i in range(5):
        store.add_result(result(f"r{i}"))
    assert [store.get_result(f"r{i}") is not None for i in range(5)] == [
        False,
        False,
        True,
        True,
        True,
    ]


def test_results_expire_after_the_ttl() -> None:
    """A result older than the TTL is no longer served."""
    clock = Clock()
    store = ResultStore(max_results=10, ttl_s=60, clock=clock)
    store.add_result(result("a"))
    clock.now += 61
    assert store.get_result("a") is None


def test_cursors_increase_and_replay_after_a_cursor() -> None:
    """`results_after(c)` replays exactly the results stored after cursor c, in order."""
    store = ResultStore(max_results=100, ttl_s=60)
    stored = [store.add_result(result(f"r{i}")) for i in range(6)]
    cursors = [s.cursor for s in stored if s is not None]
    assert cursors == sorted(cursors) and len(set(cursors)) == 6
    replay = [s.result.request_id for s in store.results_after(cursors[2])]
    assert replay == ["r3", "r4", "r5"]
    assert list(store.results_after(cursors[-1])) == []


async def test_wait_for_wakes_when_the_result_arrives() -> None:
    """`wait_for` returns the result as soon as it is stored, and None after its wait."""
    store = ResultStore(max_results=10, ttl_s=60)
    waiter = asyncio.create_task(store.wait_for("a", 5))
    await asyncio.sleep(0)
    store.add_result(result("a"))
    found = await waiter
    assert found is not None and found.result.request_id == "a"
    assert await store.wait_for("never", 0.01) is None


async def test_wait_for_all_returns_when_every_result_is_in() -> None:
    """`wait_for_all` waits for a set of ids at once."""
    store = ResultStore(max_results=10, ttl_s=60)
    waiter = asyncio.create_task(store.wait_for_all(["a", "b"], 5))
    await asyncio.sleep(0)
    store.add_result(result("a"))
    await asyncio.sleep(0)
    assert not waiter.done()
    store.add_result(result("b"))
    await asyncio.wait_for(waiter, 1)


async def test_wait_for_all_wakes_each_caller_when_its_own_ids_are_in() -> None:
    """Two callers waiting on overlapping ids: each returns once its own ids have results."""
    store = ResultStore(max_results=10, ttl_s=60)
    first = asyncio.create_task(store.wait_for_all(["a", "b"], 5))
    second = asyncio.create_task(store.wait_for_all(["b", "c", "c"], 5))
    await asyncio.sleep(0)
    store.add_result(result("b"))
    store.add_result(result("a"))
    await asyncio.wait_for(first, 1)
    await asyncio.sleep(0)
    assert not second.done()
    store.add_result(result("c"))
    await asyncio.wait_for(second, 1)


async def test_wait_for_all_leaves_no_waiter_behind() -> None:
    """After a wait that timed out, and after one that was answered, no id keeps a waiter."""
    store = ResultStore(max_results=10, ttl_s=60)
    await store.wait_for_all(["a", "never"], 0.01)
    waiter = asyncio.create_task(store.wait_for_all(["a", "b"], 5))
    await asyncio.sleep(0)
    store.add_result(result("a"))
    store.add_result(result("b"))
    await asyncio.wait_for(waiter, 1)
    assert store._waiters == {}


def test_idempotency_key_is_scoped_per_owner() -> None:
    """The same key from two owners binds two requests; the same owner gets the first one back."""
    store = ResultStore(max_results=10, ttl_s=60)
    assert store.claim_idempotency_key("alice", "k", "fp", "r1") is None
    assert store.claim_idempotency_key("bob", "k", "fp", "r2") is None
    assert store.claim_idempotency_key("alice", "k", "fp", "r3") == ("r1", "fp")


def test_overdue_submission_is_answered_failed() -> None:
    """A submission past its deadline + grace gets a `deadline_exceeded` failure, freeing its slot."""
    store = ResultStore(max_results=10, ttl_s=60, wall_clock=lambda: 500.0)
    store.add_pending(
        Submission("late", "", deadline=500.0 - EXPIRY_GRACE_S - 1, metadata={"k": "v"})
    )
    store.add_pending(Submission("on-time", "", deadline=600.0))
    failures = store.expire()
    assert [f.result.request_id for f in failures] == ["late"]
    assert (
        failures[0].result.error is not None
        and failures[0].result.error.code == "deadline_exceeded"
    )
    assert failures[0].result.metadata == {"k": "v"}
    assert store.pending_count == 1


def test_listeners_see_each_new_result_once() -> None:
    """Listeners are called for new results, not for duplicates."""
    store = ResultStore(max_results=10, ttl_s=60)
    seen: list[str] = []
    store.add_listener(lambda stored: seen.append(stored.result.request_id))
    store.add_result(result("a"))
    store.add_result(result("a"))
    store.add_result(result("b"))
    assert seen == ["a", "b"]


def test_a_result_read_back_ages_from_its_completion() -> None:
    """A result re-read 9 minutes after it completed expires 1 minute later with a 10-minute TTL."""
    clock, wall = Clock(), Clock()
    store = ResultStore(max_results=10, ttl_s=600, clock=clock, wall_clock=wall)
    store.add_result(result("old"), completed_at=wall.now - 540)
    assert store.get_result("old") is not None
    clock.now += 61
    assert store.get_result("old") is None


def test_a_result_older_than_the_ttl_is_not_stored() -> None:
    """A result read back after its TTL passed is dropped, not served and not counted as a duplicate."""
    wall = Clock()
    store = ResultStore(max_results=10, ttl_s=600, wall_clock=wall)
    assert store.add_result(result("stale"), completed_at=wall.now - 601) is None
    assert store.get_result("stale") is None and store.duplicates == 0


def test_a_marker_restores_pending_except_answered_ids() -> None:
    """An accepted marker read back makes its ids pending again, except those with a result."""
    store = ResultStore(max_results=10, ttl_s=60)
    store.add_result(result("done"))
    marker = AcceptedMarker(
        gateway_id="g",
        owner="alice",
        accepted_at=1.0,
        deadline=2.0,
        metadata={"k": "v"},
        request_ids=["done", "waiting"],
    )
    assert store.add_pending_from_marker(AcceptedMarker.from_bytes(marker.to_bytes())) == 1
    pending = store.get_pending("waiting")
    assert pending is not None and (pending.owner, pending.metadata) == ("alice", {"k": "v"})
    assert store.get_pending("done") is None


def test_a_stream_resuming_after_a_restart_gets_only_what_it_had_not_seen() -> None:
    """After a restart, results_after(old cursor) skips read-back results completed well before it."""
    wall = Clock()
    store = ResultStore(max_results=10, ttl_s=600, wall_clock=wall)
    old_cursor = int((wall.now - 5) * 1_000_000)  # what the client saw last, 5 s before the restart
    store.add_result(result("seen"), completed_at=wall.now - 10, read_back=True)
    store.add_result(result("unseen"), completed_at=wall.now - 4, read_back=True)
    store.add_result(result("seen-too"), completed_at=wall.now - 8, read_back=True)
    store.add_result(result("live"))
    assert [s.result.request_id for s in store.results_after(old_cursor)] == ["unseen", "live"]


# --- read back by a starting gateway ---------------------------------------------------------------


async def test_a_starting_gateway_serves_results_and_pending_ids_from_the_log() -> None:
    """A gateway started on a log answers its earlier results and its own markers' ids as pending."""
    settings = gateway_settings(gateway_id="restarted")
    now = time.time()
    marker = AcceptedMarker(
        gateway_id="restarted", owner="", accepted_at=now - 2, deadline=now + 60, request_ids=["p1"]
    )
    foreign = AcceptedMarker(
        gateway_id="another", owner="", accepted_at=now - 2, deadline=now + 60, request_ids=["p2"]
    )
    done = ResultMessage(request_id="r1", status="completed", label=3, completed_at=now - 540)
    async with messaging.connect(settings.broker_url) as pubsub:
        await pubsub.publish(settings.results_topic, done.to_bytes(), key="r1")
        for accepted in (marker, foreign):
            await pubsub.publish(
                settings.results_topic,
                accepted.to_bytes(),
                attributes={MARKER_KIND_ATTR: ACCEPTED_KIND},
            )
        async with running_gateway(settings) as (_, client):
            answers = {i: await client.get(f"/v1/predictions/{i}") for i in ("r1", "p1", "p2")}
    assert answers["r1"].json()["status"] == "completed"
    assert (answers["p1"].status_code, answers["p1"].json()["status"]) == (200, "pending")
    assert answers["p2"].status_code == 404
