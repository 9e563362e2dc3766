"""Structured logging: one `key=value` line per event, configured once per process."""

from __future__ import annotations

import logging
import sys
from typing import Any


def configure_logging(level: str = "INFO") -> None:
    """Send `fmnist`-style lines to stderr. Safe to call more than once."""
    root = logging.getLogger()
    if not any(getattr(h, "_fmnist", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            logging.Formatter("ts=%(asctime)s level=%(levelname)s logger=%(name)s %(message)s")
        )
        handler._fmnist = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level)


def kv(event: str, **fields: Any) -> str:
    """Format an event and its fields as one `event=... key=value` string."""
    parts = [f"event={event}"]
    for key, value in fields.items():
        text = str(value)
        if not text or any(c in text for c in ' "='):
            text = '"' + text.replace('"', '\\"') + '"'
        parts.append(f"{key}={text}")
    return " ".join(parts)
