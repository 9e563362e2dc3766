"""A worker's announcements on the control topic: one now, and one every heartbeat interval."""

from __future__ import annotations

import asyncio
import logging
import time

from app.logs import kv
from app.protocol import ModelAnnouncement
from app.settings import Settings
from messaging import MessagingError, PubSub

logger = logging.getLogger("app.worker")


async def announce(
    pubsub: PubSub, settings: Settings, announcement: ModelAnnouncement, status: str
) -> None:
    """Publish `announcement` with `status`, stamped now, keyed by the model's name."""
    message = announcement.model_copy(update={"status": status, "sent_at": time.time()})
    await pubsub.publish(settings.control_topic, message.to_bytes(), key=announcement.name)


async def heartbeat(
    pubsub: PubSub, settings: Settings, announcement: ModelAnnouncement, worker_id: str
) -> None:
    """Announce `live` every heartbeat interval until cancelled; a failed one is retried at the next."""
    while True:
        await asyncio.sleep(settings.heartbeat_interval_s)
        try:
            await announce(pubsub, settings, announcement, "live")
        except MessagingError as exc:
            logger.warning(kv("heartbeat_failed", worker_id=worker_id, error=exc))
