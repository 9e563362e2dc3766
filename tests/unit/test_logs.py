"""Log lines: key=value formatting and secret redaction."""

from __future__ import annotations

import logging

import pytest

from app.logs import RedactSecrets, is_api_key_parameter, kv, redact


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
