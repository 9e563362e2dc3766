"""The gateway's submit path (`app.gateway.publishing`): what a partly refused publish answers and
logs, and what a published request carries."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

import pytest

import messaging
from app.protocol import REQUEST_ID_ATTR, requests_topic_for
from app.settings import Settings
from messaging import BrokerUnavailable, PubSub
from tests.brokers import unique_name
from tests.gateway.helpers import (
    STAND_IN_MODEL,
    fashion_like,
    gateway_settings,
    png_bytes,
    running_gateway,
)

pytestmark = pytest.mark.timeout(30)


def refusing_the_second_publish(settings: Settings) -> PubSub:
    """A memory broker that refuses the second request it is given, and takes the rest."""
    pubsub = messaging.connect(settings.broker_url)
    publish = pubsub.publish
    calls = 0

    async def second_refused(
        topic: str,
        data: bytes,
        *,
        key: str | None = None,
        attributes: Mapping[str, str] | None = None,
    ) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise BrokerUnavailable("the broker dropped this one (test outage)")
        await publish(topic, data, key=key, attributes=attributes)

    pubsub.publish = second_refused  # type: ignore[method-assign]
    return pubsub


async def test_a_batch_refused_after_its_first_image_logs_the_refusal_not_the_first_acceptance(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The publish_failed line names the broker's refusal even when the batch's first image was accepted."""
    png = png_bytes(fashion_like())
    files = [("files", (f"{i}.png", png, "image/png")) for i in range(3)]
    settings = gateway_settings()
    with caplog.at_level(logging.WARNING, logger="app.gateway"):
        async with running_gateway(settings, pubsub_factory=refusing_the_second_publish) as (
            _,
            client,
        ):
            response = await client.post("/v1/predictions:batch", files=files)
    items = response.json()["items"]
    lines = [r.getMessage() for r in caplog.records if "event=publish_failed" in r.getMessage()]
    assert [(item.get("error") or {}).get("code") for item in items] == [
        None,
        "broker_unavailable",
        None,
    ]
    assert len(lines) == 1 and "count=1" in lines[0], lines
    assert "did not accept" in lines[0] and "test outage" in lines[0], lines[0]


async def test_requests_carry_their_id_as_an_attribute_and_no_key() -> None:
    """A published request names its id in the `request_id` attribute and has no key (a request id
    orders nothing, and keyless records share the Kafka backend's sticky batch)."""
    settings = gateway_settings()
    topic = requests_topic_for(settings.requests_topic, STAND_IN_MODEL)
    async with running_gateway(settings) as (_, client):
        pubsub = messaging.connect(settings.broker_url)
        async with pubsub:
            await pubsub.ensure_topics(topic)
            async with pubsub.subscribe(topic, group=unique_name("observer")) as requests:
                answer = await client.post(
                    "/v1/predictions",
                    content=png_bytes(fashion_like()),
                    headers={"Content-Type": "image/png"},
                )
                async with asyncio.timeout(10):
                    published = await anext(requests)
    assert answer.status_code == 202, answer.text
    assert published.key is None
    assert published.attributes[REQUEST_ID_ATTR] == answer.json()["request_id"]
