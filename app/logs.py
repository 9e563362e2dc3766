"""Structured logging: one `key=value` line per event, configured once per process; secrets redacted."""

from __future__ import annotations

import logging
import re
import sys
from typing import Any
from urllib.parse import unquote_plus

# Browsers cannot set headers on a websocket, so API keys arrive as `?api_key=`; uvicorn logs
# the raw path of each connection. Keys must never reach a log line, however the name is spelled.
API_KEY_PARAMETER = "api_key"
_SECRET_PARAMETERS = frozenset({API_KEY_PARAMETER, "apikey", "x_api_key", "token", "access_token"})
# A `name=value` pair as it appears in a query string or a key=value log line. The name stops at
# the characters that separate pairs; the value runs to the next separator.
_PARAMETER = re.compile(r"(?P<name>[^\s=&?;,\"'/]+)=(?P<value>[^&\s\"';,]*)")
# Credentials in header form, should a header line ever be logged.
_SECRET_HEADER = re.compile(
    r"((?:authorization|x-api-key)\s*[:=]\s*\"?(?:bearer\s+)?)[^\s\"',;&]+", re.IGNORECASE
)
_MAX_DECODES = 4  # `%255F` decodes to `%5F`, then to `_`; nobody nests deeper by accident


def parameter_name(raw: str) -> str:
    """A query parameter's name as matched for secrets: percent-decoded until stable, case-folded,
    `-` read as `_`."""
    name = raw
    for _ in range(_MAX_DECODES):
        decoded = unquote_plus(name)
        if decoded == name:
            break
        name = decoded
    return name.strip().casefold().replace("-", "_")


def is_api_key_parameter(name: str) -> bool:
    """Whether a (decoded) query parameter name carries the API key: the auth code accepts exactly
    these, so everything it accepts is also redacted."""
    return parameter_name(name) == API_KEY_PARAMETER


def redact(text: str) -> str:
    """`text` with the value of every secret-named parameter and credential header replaced by `***`."""

    def hide(match: re.Match[str]) -> str:
        if parameter_name(match["name"]) in _SECRET_PARAMETERS and match["value"]:
            return f"{match['name']}=***"
        return match[0]

    return _SECRET_HEADER.sub(r"\1***", _PARAMETER.sub(hide, text))


class RedactSecrets(logging.Filter):
    """Rewrites `api_key=...` (in any spelling or encoding) and credential headers to `***`."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "=" not in message and ":" not in message:
            return True
        redacted = redact(message)
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
