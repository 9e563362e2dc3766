"""Structured logging: one `key=value` line per event, configured once per process."""

from __future__ import annotations

import logging
import re
import sys
from typing import Any

# Browsers cannot set headers on a websocket, so API keys arrive as `?api_key=`; uvicorn logs
# the full path of each connection. Keys must never reach a log line.
_SECRET_QUERY = re.compile(r"((?:api_key|apikey|token)=)[^&\s\"']+", re.IGNORECASE)


class RedactSecrets(logging.Filter):
    """Rewrites `api_key=...` (and similar) in a record's message to `api_key=***`."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = _SECRET_QUERY.sub(r"\1***", message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


def configure_logging(level: str = "INFO") -> None:
    """Send `fmnist`-style lines to stderr. Safe to call more than once."""
    root = logging.getLogger()
    if not any(getattr(h, "_fmnist", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            logging.Formatter("ts=%(asctime)s level=%(levelname)s logger=%(name)s %(message)s")
        )
        handler.addFilter(RedactSecrets())
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
