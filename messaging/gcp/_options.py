"""The gcp:// URL options, read and checked once when the PubSub is made."""

from __future__ import annotations

import os
from dataclasses import dataclass

from messaging._url import BrokerURL, OptionReader


@dataclass(frozen=True)
class GcpOptions:
    emulator: str | None = None
    ack_deadline_s: int = 60
    max_latency_ms: float = 5.0
    ordering: bool = True
    topic_retention_s: int = 86_400

    @classmethod
    def from_url(cls, url: BrokerURL) -> GcpOptions:
        read = OptionReader(url)
        ordering = (read.text("ordering", "true") or "true").lower()
        if ordering not in ("true", "false", "1", "0"):
            raise ValueError(f"broker URL option ordering={ordering!r}: expected true or false")
        options = cls(
            emulator=read.text("emulator", None) or os.environ.get("PUBSUB_EMULATOR_HOST") or None,
            ack_deadline_s=read.integer("ack_deadline_s", cls.ack_deadline_s, minimum=10),
            max_latency_ms=read.number("max_latency_ms", cls.max_latency_ms),
            ordering=ordering in ("true", "1"),
            topic_retention_s=read.integer("topic_retention_s", cls.topic_retention_s),
        )
        read.finish()
        if options.ack_deadline_s > 600:
            raise ValueError("broker URL option ack_deadline_s: Pub/Sub allows at most 600 seconds")
        if options.topic_retention_s and not 600 <= options.topic_retention_s <= 2_678_400:
            raise ValueError(
                "broker URL option topic_retention_s: Pub/Sub allows 600 to 2678400 seconds (or 0 for none)"
            )
        return options
