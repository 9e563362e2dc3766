"""Canary weights across gateways on every broker (memory, Kafka on Tansu, the Pub/Sub emulator): a
change through one gateway is applied by another, and a gateway started later reads the split in
force from the rollout topic's beginning."""

from __future__ import annotations

import pytest

from tests.brokers import unique_name
from tests.gateway.helpers import announce_model, gateway_settings, running_gateway
from tests.gateway.test_rollout_routes import NEW, OLD, applied

pytestmark = pytest.mark.timeout(90)

SPLIT = {OLD.version: 80, NEW.version: 20}


async def test_a_weight_change_through_one_gateway_is_applied_by_the_others(
    broker_url: str,
) -> None:
    """PUT weights on gateway A: gateway B applies it within seconds, and a gateway C started later too."""
    settings = gateway_settings(broker_url, rollout_topic=unique_name("rollout"))
    async with (
        running_gateway(settings, announce=False) as (_, a),
        running_gateway(settings, announce=False) as (b_app, _),
    ):
        await announce_model(settings, OLD)
        await announce_model(settings, NEW)
        put = await a.put("/v1/models/fmnist/weights", json={"weights": {"v1": 80, "v2": 20}})
        assert put.status_code == 200, put.text
        await applied(b_app.state.gateway, SPLIT)
        async with running_gateway(settings, announce=False) as (c_app, c):
            await applied(c_app.state.gateway, SPLIT)
            history = (await c.get("/v1/models/fmnist/history")).json()["events"]
    assert [e["weights"] for e in history] == [SPLIT]
