"""The gateway's reading of the control topic: workers' model announcements into the `ModelRegistry`."""

from __future__ import annotations

import asyncio
import logging
import time

from app.gateway.registry import LIVENESS_INTERVALS, ModelRegistry
from app.logs import kv
from app.protocol import ModelAnnouncement, encode_shape
from messaging import PubSub, Subscription

log = logging.getLogger(__name__)

_CONTROL_CHUNK = 256


async def subscribe_control(
    pubsub: PubSub, topic: str, gateway_id: str, heartbeat_interval_s: float
) -> Subscription:
    """The control topic from a few heartbeats back, in a group of this gateway's own, so a
    (re)started gateway learns the live models at once."""
    since = time.time() - LIVENESS_INTERVALS * heartbeat_interval_s
    control = pubsub.subscribe(topic, group=f"gateway-{gateway_id}-control", start=since)
    try:
        await control.start()
    except BaseException:
        await control.aclose()
        raise
    return control


async def learn_models(
    registry: ModelRegistry, control: Subscription, known: asyncio.Event, quiet_s: float
) -> None:
    """Feed the registry from the workers' announcements until the subscription ends; the read-back
    has caught up (`known` set) once a receive waited `quiet_s` for nothing."""
    live_since = time.time()
    try:
        while True:
            try:
                async with asyncio.timeout(None if known.is_set() else quiet_s):
                    messages = await control.receive_batch(_CONTROL_CHUNK)
            except TimeoutError:
                known.set()
                continue
            if not messages:
                break
            for message in messages:
                _learn(registry, message.data, live_since)
                await message.ack()
    finally:
        await control.aclose()


def _learn(registry: ModelRegistry, data: bytes, live_since: float) -> None:
    try:
        announcement = ModelAnnouncement.from_bytes(data)
    except ValueError as exc:
        log.warning(kv("malformed_announcement", error=exc))
        return
    # Read back from before this gateway subscribed: live from when it was sent, not from now.
    received_at = (
        min(time.time(), announcement.sent_at) if announcement.sent_at < live_since else None
    )
    if registry.learn(announcement, received_at):
        log.info(
            kv(
                "model_worker_" + ("left" if announcement.status == "leaving" else "joined"),
                model=announcement.name,
                version=announcement.version,
                tag=announcement.tag,
                worker_id=announcement.worker_id,
                input_shape=encode_shape(announcement.input_shape),
            )
        )
