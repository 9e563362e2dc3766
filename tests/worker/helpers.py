"""Helpers for worker tests: fresh settings per test, publishing requests, collecting results."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping

import torch

from app import protocol
from app.protocol import ResultMessage
from app.settings import Settings
from messaging import Message, PubSub, Subscription
from tests.brokers import broker_env, unique_name

MODEL = "fmnist"  # what a worker calls a model without a name of its own (FMNIST_MODEL_PATH's stem)


def model_topic(settings: Settings, version: str | None = None) -> str:
    """The topic the worker of `MODEL` reads (or of its requests pinned to `version`)."""
    return protocol.requests_topic_for(settings.requests_topic, MODEL, version)


def worker_settings(broker_url: str, **overrides: object) -> Settings:
    """Settings on fresh topics and a fresh worker group, so tests never see each other's messages."""
    env = broker_env(broker_url)
    values: dict[str, object] = {
        "broker_url": env["FMNIST_BROKER_URL"],
        "requests_topic": unique_name("req"),
        "results_topic": unique_name("res"),
        "deadletter_topic": unique_name("dlq"),
        "worker_group": unique_name("workers"),
        "control_topic": unique_name("ctl"),
        "max_batch_size": 8,
        "batch_fill_wait_ms": 5.0,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


def request_attributes(
    request_id: str,
    image: torch.Tensor,
    *,
    deadline_in_s: float = 60.0,
    owner: str = "",
    metadata: Mapping[str, str] | None = None,
) -> dict[str, str]:
    now = time.time()
    attributes = {
        protocol.REQUEST_ID_ATTR: request_id,
        protocol.SHAPE_ATTR: protocol.encode_shape(tuple(image.shape)),
        protocol.SUBMITTED_AT_ATTR: f"{now:.6f}",
        protocol.DEADLINE_ATTR: f"{now + deadline_in_s:.6f}",
        protocol.OWNER_ATTR: owner,
    }
    if metadata:
        attributes[protocol.METADATA_ATTR] = protocol.encode_metadata(dict(metadata))
    return attributes


async def publish_request(
    pubsub: PubSub, settings: Settings, request_id: str, image: torch.Tensor, **kwargs: object
) -> None:
    """Publish one request exactly as the gateway does (raw uint8 C×H×W payload, key = request id)."""
    await pubsub.publish(
        model_topic(settings),
        image.contiguous().numpy().tobytes(),
        key=request_id,
        attributes=request_attributes(request_id, image, **kwargs),  # type: ignore[arg-type]
    )


async def take(messages: Subscription, count: int, *, within: float = 30.0) -> list[Message]:
    """The next `count` messages (acked), or fail after `within` seconds."""
    taken: list[Message] = []

    async def collect() -> None:
        async for message in messages:
            await message.ack()
            taken.append(message)
            if len(taken) >= count:
                return

    try:
        await asyncio.wait_for(collect(), within)
    except TimeoutError:
        raise AssertionError(f"got {len(taken)} of {count} messages within {within} s") from None
    return taken


async def take_results(
    messages: Subscription, count: int, *, within: float = 30.0
) -> list[ResultMessage]:
    taken = await take(messages, count, within=within)
    for message in taken:  # the wire form has exactly the ResultMessage fields, no more, no fewer
        assert set(json.loads(message.data)) == set(ResultMessage.model_fields)
    return [ResultMessage.from_bytes(m.data) for m in taken]


async def nothing_more(messages: Subscription, *, wait: float) -> bool:
    """True when no message arrives within `wait` seconds."""
    try:
        await asyncio.wait_for(anext(messages), wait)
    except TimeoutError:
        return True
    return False


def results_by_id(results: list[ResultMessage]) -> dict[str, ResultMessage]:
    return {result.request_id: result for result in results}
