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


class KeyValueFormatter(logging.Formatter):
    """Renders every record as one `key=value` line: ours (`kv(...)` messages) as they are, other
    libraries' prose (aiokafka, uvicorn, google) as `event=<their package> msg="..."`, a traceback
    as an escaped `traceback=` field, so that one event is one parseable line."""

    # ISO 8601 without the space logging puts between date and time, which would split `ts=`.
    default_time_format = "%Y-%m-%dT%H:%M:%S"
    default_msec_format = "%s.%03d"

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if not message.startswith("event="):
            message = kv(record.name.split(".")[0], msg=message)
        line = (
            f"ts={self.formatTime(record)} level={record.levelname} logger={record.name} {message}"
        )
        if record.exc_info:
            line += " " + _field("traceback", self.formatException(record.exc_info))
        return line.replace("\r", "\\r").replace("\n", "\\n")


def configure_logging(level: str = "INFO") -> None:
    """Send `fmnist`-style lines to stderr. Safe to call more than once."""
    root = logging.getLogger()
    if not any(getattr(h, "_fmnist", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(KeyValueFormatter())
        handler.addFilter(RedactSecrets())
        handler._fmnist = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level)


def kv(event: str, **fields: Any) -> str:
    """Format an event and its fields as one `event=... key=value` string."""
    return " ".join([f"event={event}", *(_field(key, value) for key, value in fields.items())])


def _field(key: str, value: Any) -> str:
    """`key=value`, the value quoted when it is empty or holds a space, a quote or `=`."""
    text = str(value)
    if not text or any(c in text for c in ' "='):
        text = '"' + text.replace('"', '\\"') + '"'
    return f"{key}={text}"
