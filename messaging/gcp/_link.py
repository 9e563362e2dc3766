"""Whether the Pub/Sub broker can be used now, and the recovery after it comes back empty."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc
from google.api_core import exceptions as google_errors

from messaging.errors import MessagingError

if TYPE_CHECKING:
    from messaging.gcp._pubsub import GooglePubSub

logger = logging.getLogger("messaging.gcp")

_RECOVERY_MAX_BACKOFF_S = 1.0


class Link:
    """The state of one GooglePubSub's link: `ready` while it can publish and pull.

    Broken by a failed gRPC channel, a NotFound from publish, or a streaming pull that lost its
    subscription; restored by one recovery task that waits until the broker answers, re-creates
    what the PubSub made and restarts the streams.
    """

    def __init__(self, pubsub: GooglePubSub) -> None:
        self.ready = asyncio.Event()
        self._pubsub = pubsub
        self._recovery: asyncio.Task[None] | None = None
        self._lost_at = 0.0
        self._watched: list[tuple[Any, Callable[[Any], None]]] = []

    def watch(self, channel: Any) -> None:
        """Hear of `channel` failing (from gRPC's thread) while this loop runs."""
        loop = asyncio.get_running_loop()

        def on_state(state: grpc.ChannelConnectivity) -> None:
            if state is grpc.ChannelConnectivity.TRANSIENT_FAILURE:
                with contextlib.suppress(RuntimeError):  # the loop is closed: nobody to tell
                    loop.call_soon_threadsafe(self.broken, "connection_failed")

        channel.subscribe(on_state, try_to_connect=False)
        self._watched.append((channel, on_state))

    def broken(self, reason: str) -> None:
        """Stop publishing until the broker is checked again; start the recovery if it is not running."""
        pubsub = self._pubsub
        if not pubsub.connected:
            return
        if self.ready.is_set():
            self._lost_at = time.monotonic()
            logger.warning("event=pubsub_link_lost broker=%s reason=%s", pubsub.url, reason)
        self.ready.clear()
        pubsub._forget_known()
        for subscription in pubsub._google_subscriptions():
            subscription._link_broken()
        if self._recovery is None or self._recovery.done():
            self._recovery = asyncio.get_running_loop().create_task(
                self._recover(), name=f"pubsub-recover-{pubsub.url}"
            )

    async def _recover(self) -> None:
        """Until the broker answers: re-create the topics and subscriptions it lost, restart the
        streams. Logs once when it is unreachable, once per re-creation, once when back."""
        pubsub = self._pubsub
        backoff = 0.1
        unreachable = False
        while pubsub.connected:
            try:
                async with asyncio.timeout(pubsub.connect_timeout):
                    await pubsub._ping()
                    topics, subscriptions = await pubsub._recreate()
            except (MessagingError, google_errors.GoogleAPICallError, TimeoutError) as exc:
                if not unreachable:
                    unreachable = True
                    logger.warning(
                        "event=pubsub_broker_down broker=%s error=%r retry=until_reachable",
                        pubsub.url,
                        exc,
                    )
                await asyncio.sleep(backoff)
                backoff = min(2 * backoff, _RECOVERY_MAX_BACKOFF_S)
                continue
            if topics or subscriptions:
                logger.warning(
                    "event=pubsub_recreated broker=%s topics=%s subscriptions=%s reason=%s",
                    pubsub.url,
                    ",".join(topics),
                    ",".join(subscriptions),
                    "the broker came back without them",
                )
            for subscription in pubsub._google_subscriptions():
                subscription._link_restored()
            self.ready.set()
            logger.warning(
                "event=pubsub_link_restored broker=%s down_s=%.1f",
                pubsub.url,
                time.monotonic() - self._lost_at,
            )
            return

    async def close(self) -> None:
        self.ready.clear()
        for channel, callback in self._watched:
            with contextlib.suppress(Exception):
                channel.unsubscribe(callback)
        self._watched.clear()
        task = self._recovery
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
