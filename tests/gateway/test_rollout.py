"""app/gateway/rollout.py: the version choice, weights validation, history and live figures of a canary."""

from __future__ import annotations

from collections import Counter

import pytest

from app.gateway.errors import ApiError
from app.gateway.registry import ModelVersion
from app.gateway.rollout import (
    RolloutState,
    choose_version,
    resolve_weights,
    routing_key,
)
from app.protocol import EVENT_KIND, WEIGHTS_KIND, ResultMessage, RolloutEvent, TrafficWeights

OLD, NEW = "aaaaaaaaaaaa", "bbbbbbbbbbbb"
SPLIT = {OLD: 90, NEW: 10}


def version(name: str, tag: str | None = None, live: int = 1) -> ModelVersion:
    return ModelVersion(
        name="fmnist",
        version=name,
        tag=tag,
        input_shape=(1, 28, 28),
        dtype="uint8",
        class_names=tuple("0123456789"),
        live_workers=live,
    )


def state(clock: list[float] | None = None, history_size: int = 1000) -> RolloutState:
    now = clock or [1000.0]
    return RolloutState(
        history_size=history_size, window_s=60.0, routed_horizon_s=30.0, clock=lambda: now[0]
    )


def test_a_90_10_split_holds_within_two_points_over_10000_requests() -> None:
    """Request ids spread 90/10 over the versions, each share within ±2 percentage points."""
    counts = Counter(
        choose_version(SPLIT, {OLD, NEW}, routing_key("", None, f"req-{i}")) for i in range(10_000)
    )
    assert abs(counts[OLD] / 100 - 90) <= 2 and abs(counts[NEW] / 100 - 10) <= 2, counts


def test_the_same_idempotency_key_always_lands_on_the_same_version() -> None:
    """A key (per owner) picks one version whatever the request id, and keys spread over both."""
    chosen = {
        key: {
            choose_version(SPLIT, {OLD, NEW}, routing_key("owner", key, f"id-{i}"))
            for i in range(20)
        }
        for key in (f"key-{k}" for k in range(200))
    }
    assert all(len(versions) == 1 for versions in chosen.values())
    assert {v for versions in chosen.values() for v in versions} == {OLD, NEW}


def test_the_routing_key_is_per_owner() -> None:
    """Two owners sending the same Idempotency-Key are hashed apart (not one shared slot)."""
    assert routing_key("alice", "k", "id") != routing_key("bob", "k", "id")


def test_a_version_without_a_live_worker_gives_its_share_to_the_others() -> None:
    """With 50/30/20 and the 30% version not eligible, the rest split 5:2 and nothing goes to it."""
    weights = {"a": 50, "b": 30, "c": 20}
    counts = Counter(
        choose_version(weights, {"a", "c"}, routing_key("", None, f"r{i}")) for i in range(7_000)
    )
    assert counts["b"] == 0
    assert abs(counts["a"] / 7_000 - 5 / 7) < 0.02, counts


def test_no_eligible_weighted_version_means_no_split() -> None:
    """When no weighted version is eligible the request goes to the model's topic (None)."""
    assert choose_version(SPLIT, {"cccccccccccc"}, "key") is None


def test_weights_accept_a_prefix_and_a_tag_and_store_full_ids() -> None:
    """{"aaaa": 90, "v2": 10} resolves to the full ids of the prefix and of the tagged version."""
    versions = [version(OLD), version(NEW, tag="v2")]
    assert resolve_weights("fmnist", {"aaaa": 90, "v2": 10}, versions) == SPLIT


@pytest.mark.parametrize(
    "weights",
    [
        {OLD: 90, NEW: 20},  # not 100
        {OLD: 110, NEW: -10},  # negative
        {OLD: 90, "zzzz": 10},  # unknown
        {OLD: 50, "aaaaaaaaaaaa": 50},  # the same version twice
    ],
)
def test_invalid_weights_are_422(weights: dict[str, int]) -> None:
    """A total other than 100, a negative percent, an unknown or repeated version: 422 invalid_weights."""
    with pytest.raises(ApiError) as raised:
        resolve_weights("fmnist", weights, [version(OLD), version(NEW)])
    assert (raised.value.status, raised.value.code) == (422, "invalid_weights")


def test_an_ambiguous_prefix_is_422_naming_the_matches() -> None:
    """A prefix two versions share is refused, listing both."""
    with pytest.raises(ApiError) as raised:
        resolve_weights("fmnist", {"ab": 100}, [version("ab1111111111"), version("ab2222222222")])
    assert raised.value.status == 422
    assert "ab1111111111" in raised.value.message and "ab2222222222" in raised.value.message


def test_the_newest_weights_by_set_at_are_in_force_whatever_the_order_they_arrive() -> None:
    """An older TrafficWeights read after a newer one does not replace it."""
    rollout = state()
    rollout.apply(TrafficWeights(model="fmnist", weights=SPLIT, set_at=20.0))
    rollout.apply(TrafficWeights(model="fmnist", weights={OLD: 100}, set_at=10.0))
    assert rollout.weights("fmnist") == SPLIT
    assert [e.set_at for e in rollout.history("fmnist")] == [10.0, 20.0]  # type: ignore[union-attr]


def test_history_keeps_the_last_entries_oldest_first_and_ignores_repeats() -> None:
    """A bound of 3 keeps the newest 3; a message read again (a reconnect) is not added twice."""
    rollout = state(history_size=3)
    events = [
        RolloutEvent(model="fmnist", candidate=NEW, action="step", at=float(t)) for t in range(5)
    ]
    for event in events:
        assert rollout.take(event.to_bytes(), EVENT_KIND)
    assert not rollout.take(events[-1].to_bytes(), EVENT_KIND)
    assert rollout.history("fmnist") == events[2:]


def test_a_malformed_rollout_message_is_skipped() -> None:
    """Bytes that are not a TrafficWeights leave the state as it was."""
    rollout = state()
    assert not rollout.take(b"{not json", WEIGHTS_KIND)
    assert rollout.weights("fmnist") == {} and rollout.history("fmnist") == []


def test_live_figures_count_only_routed_results_in_the_window() -> None:
    """Results of requests routed here count per version (failures, latency); older than the window drop."""
    clock = [1000.0]
    rollout = state(clock)
    for i, status in enumerate(["completed", "completed", "failed"]):
        rollout.routed(f"r{i}", submitted_at=1000.0, model="fmnist", version=NEW)
        clock[0] = 1000.0 + 0.1 * (i + 1)
        rollout.record_result(result(f"r{i}", status, completed_at=clock[0]))
    assert not rollout.record_result(result("foreign", "completed", completed_at=clock[0]))
    live = rollout.live("fmnist", NEW)
    assert (live.requests, live.failed) == (3, 1)
    assert live.error_rate == pytest.approx(1 / 3)
    assert live.p50_ms == pytest.approx(100.0) and live.p99_ms == pytest.approx(200.0)
    clock[0] += 61.0
    assert rollout.live("fmnist", NEW).requests == 0


def result(request_id: str, status: str, completed_at: float) -> ResultMessage:
    return ResultMessage.model_validate(
        {
            "request_id": request_id,
            "status": status,
            "model": "fmnist",
            "model_version": NEW,
            "completed_at": completed_at,
        }
    )
