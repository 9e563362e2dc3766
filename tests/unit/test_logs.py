"""Log lines: key=value formatting and secret redaction."""

from __future__ import annotations

import logging

from app.logs import RedactSecrets, kv


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
