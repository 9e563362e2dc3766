"""`health()` on both clients against the real app: liveness, readiness and the reason when not ready."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from fmnist_client import Client, Health, Unavailable

from tests.e2e.processes import free_port
from tests.sdk.conftest import ClientFactory, LiveServer

pytestmark = pytest.mark.timeout(60)


def test_a_serving_gateway_is_live_and_ready(live_server: Callable[..., LiveServer]) -> None:
    """Against a gateway with its broker and worker up, the sync health() says live and ready."""
    server = live_server()
    with Client(server.url) as client:
        health = client.health()
    assert health == Health(live=True, ready=True, reason=None, gateway_id=health.gateway_id)
    assert health.gateway_id


async def test_a_gateway_without_its_broker_is_live_but_not_ready_and_says_why(
    asgi_client: ClientFactory,
) -> None:
    """With the Kafka broker unreachable, async health() reports live, not ready, and the broker error."""
    broker_url = f"kafka://127.0.0.1:{free_port()}"
    async with asgi_client(
        worker=False, broker_url=broker_url, broker_connect_timeout_s=0.5
    ) as client:
        health = await client.health()
    assert health.live and not health.ready
    assert health.reason and health.reason != "ok"


def test_an_unreachable_gateway_raises_unavailable_at_once() -> None:
    """Nothing listening: health() raises Unavailable on the first refusal instead of retrying."""
    with (
        Client(f"http://127.0.0.1:{free_port()}", retries=3, backoff=5.0) as client,
        pytest.raises(Unavailable, match="fmnist serve") as caught,
    ):
        client.health()
    assert caught.value.code == "connection_error"
