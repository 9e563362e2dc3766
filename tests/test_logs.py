"""Log lines: key=value formatting and secret redaction."""

from __future__ import annotations

import logging
import shlex
import sys

import pytest

from app.logs import (
    KeyValueFormatter,
    RedactSecrets,
    configure_logging,
    is_api_key_parameter,
    kv,
    redact,
)


def test_kv_quotes_values_with_spaces() -> None:
    """Values with spaces or quotes are quoted so each line stays parseable."""
    assert (
        kv("published", request_id="abc", note='a "b"')
        == 'event=published request_id=abc note="a \\"b\\""'
    )


def test_api_key_in_a_uvicorn_line_is_redacted() -> None:
    """An API key in a websocket path (uvicorn's connection log) never reaches the output."""
    record = logging.LogRecord(
        "uvicorn.error",
        logging.INFO,
        __file__,
        1,
        '%s - "WebSocket %s" [accepted]',
        ("127.0.0.1:5000", "/v1/predictions/stream?after=3&api_key=sekret-123"),
        None,
    )
    assert RedactSecrets().filter(record)
    message = record.getMessage()
    assert "sekret" not in message
    assert "api_key=***" in message and "after=3" in message


def _formatted(record: logging.LogRecord) -> dict[str, str]:
    """A record through our formatter, parsed as shell-style key=value tokens."""
    line = KeyValueFormatter().format(record)
    assert "\n" not in line
    tokens = shlex.split(line)
    assert all("=" in token for token in tokens), line
    return dict(token.split("=", 1) for token in tokens)


def test_a_third_party_record_becomes_a_key_value_line() -> None:
    """aiokafka's prose comes out as `event=aiokafka msg="..."` next to the level and logger."""
    record = logging.LogRecord(
        "aiokafka.conn",
        logging.ERROR,
        __file__,
        1,
        "Unable connect to node with id %s: %s",
        (1, "[Errno 111] Connect call failed ('127.0.0.1', 9092)"),
        None,
    )
    fields = _formatted(record)
    assert fields["event"] == "aiokafka" and fields["level"] == "ERROR"
    assert fields["logger"] == "aiokafka.conn"
    assert fields["msg"] == (
        "Unable connect to node with id 1: [Errno 111] Connect call failed ('127.0.0.1', 9092)"
    )
    assert "T" in fields["ts"]


def test_our_kv_records_keep_their_fields() -> None:
    """A `kv(...)` message is not wrapped again: its event and fields stay top-level."""
    record = logging.LogRecord(
        "app.worker", logging.INFO, __file__, 1, kv("batch", size=32, note="a b"), None, None
    )
    fields = _formatted(record)
    assert fields["event"] == "batch" and fields["size"] == "32" and fields["note"] == "a b"
    assert "msg" not in fields


def test_a_traceback_stays_on_the_events_line() -> None:
    """An exception's traceback rides along as one escaped `traceback=` field, not extra lines."""
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord(
            "uvicorn.error", logging.ERROR, __file__, 1, "Exception in ASGI application\n", None,
            sys.exc_info(),
        )  # fmt: skip
    fields = _formatted(record)
    assert fields["event"] == "uvicorn"
    assert "ValueError: boom" in fields["traceback"] and "\\n" in fields["traceback"]


def test_configure_logging_renders_with_the_key_value_formatter() -> None:
    """The handler configure_logging installs uses KeyValueFormatter (and still redacts)."""
    configure_logging("INFO")
    handlers = [h for h in logging.getLogger().handlers if getattr(h, "_fmnist", False)]
    assert len(handlers) == 1
    assert isinstance(handlers[0].formatter, KeyValueFormatter)
    assert any(isinstance(f, RedactSecrets) for f in handlers[0].filters)


def uvicorn_websocket_record(path: str) -> logging.LogRecord:
    """The line uvicorn logs for a websocket connection, with `path` as the client sent it."""
    return logging.LogRecord(
        "uvicorn.error",
        logging.INFO,
        __file__,
        1,
        '%s - "WebSocket %s" [accepted]',
        ("127.0.0.1:5000", path),
        None,
    )


@pytest.mark.parametrize(
    "query",
    [
        "api%5Fkey=sekret-123",
        "API_KEY=sekret-123",
        "Api%5fKey=sekret-123",
        "api%255Fkey=sekret-123",
        "api-key=sekret-123",
        "ids=a&api_key=sekret-123&api_key=sekret-123",
        "api_key=other&api%5Fkey=sekret-123",
        "%61pi_key=sekret-123",
    ],
)
def test_api_key_in_any_encoding_is_redacted(query: str) -> None:
    """The key is hidden whatever spelling or percent-encoding of `api_key` carries it."""
    record = uvicorn_websocket_record(f"/v1/predictions/stream?{query}")
    RedactSecrets().filter(record)
    assert "sekret" not in record.getMessage()


def test_credential_headers_are_redacted() -> None:
    """`Authorization: Bearer KEY` and `X-API-Key: KEY` in a log line lose their value."""
    line = redact("headers authorization: Bearer sekret-1 x-api-key=sekret-2 other=kept")
    assert "sekret" not in line and "other=kept" in line


@pytest.mark.parametrize("name", ["api_key", "API_KEY", "api%5Fkey", "Api-Key"])
def test_every_name_auth_accepts_is_a_name_redaction_hides(name: str) -> None:
    """The auth code's test for the key parameter and the redaction agree on each spelling."""
    assert is_api_key_parameter(name)
    assert "sekret" not in redact(f"/stream?{name}=sekret")
