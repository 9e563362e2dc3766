"""The one place that turns `Settings` into a `PubSub` (gateway, worker and `fmnist serve` all use it)."""

from __future__ import annotations

from app.settings import Settings
from messaging import PubSub, connect


def connect_broker(settings: Settings) -> PubSub:
    """An unconnected `PubSub` for `FMNIST_BROKER_URL` (its options in the URL)."""
    return connect(
        settings.broker_url,
        connect_timeout=settings.broker_connect_timeout_s,
    )
