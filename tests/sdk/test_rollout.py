"""The SDK and canary rollout: set_weights, history, record_event, and the live figures of a model."""

from __future__ import annotations

import pytest
from fmnist_client import BadRequest, RolloutEvent, TrafficWeights, Unauthorized

from tests.gateway.helpers import STAND_IN_VERSION
from tests.sdk.conftest import ClientFactory


async def test_set_weights_resolves_a_prefix_and_shows_in_the_model(
    asgi_client: ClientFactory,
) -> None:
    """set_weights({"standin": 100}) answers the full id; model() and history() show the split."""
    async with asgi_client(worker=False) as client:
        applied = await client.set_weights("fmnist", {"standin": 100}, reason="all in")
        model = await client.model("fmnist")
        history = await client.history("fmnist")
    assert applied.weights == {STAND_IN_VERSION: 100}
    assert model.weights == {STAND_IN_VERSION: 100}
    (entry,) = history
    assert isinstance(entry, TrafficWeights) and entry.reason == "all in"
    live = model.versions[0].live
    assert live is not None and live.requests == 0 and live.window_s == 60.0


async def test_record_event_comes_back_in_the_history(asgi_client: ClientFactory) -> None:
    """record_event() is stamped by the gateway and listed by history() after the weights change."""
    async with asgi_client(worker=False) as client:
        await client.set_weights("fmnist", {STAND_IN_VERSION: 100})
        event = await client.record_event(
            "fmnist", STAND_IN_VERSION, "promoted", figures={"agreement": 0.98}
        )
        history = await client.history("fmnist")
    assert isinstance(event, RolloutEvent) and event.at > 0
    assert history[-1] == event and event.figures == {"agreement": 0.98}


async def test_invalid_weights_raise_bad_request(asgi_client: ClientFactory) -> None:
    """Weights not summing to 100 raise BadRequest with code invalid_weights."""
    async with asgi_client(worker=False) as client:
        with pytest.raises(BadRequest) as raised:
            await client.set_weights("fmnist", {STAND_IN_VERSION: 90})
    assert raised.value.code == "invalid_weights"


async def test_set_weights_without_an_admin_key_raises_unauthorized(
    asgi_client: ClientFactory,
) -> None:
    """An API key that is not an admin key raises Unauthorized (403) from set_weights."""
    async with asgi_client(
        worker=False, api_key="user", api_keys=["user"], admin_api_keys=["admin"]
    ) as client:
        with pytest.raises(Unauthorized) as raised:
            await client.set_weights("fmnist", {STAND_IN_VERSION: 100})
    assert raised.value.status_code == 403
