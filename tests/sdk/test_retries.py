"""Bounded retries on 429/503 and refused connections, honouring `Retry-After` (faults injected by a mock transport)."""

from __future__ import annotations

import email.utils
import time
from collections.abc import Callable

import httpx
import pytest
from fmnist_client import AsyncClient, BadRequest, Client, Overloaded, Unavailable
from fmnist_client._base import RetryPolicy, parse_retry_after

PENDING = {"request_id": "r-1", "status": "pending"}
DONE = {"request_id": "r-1", "status": "completed", "label": 9, "class_name": "Ankle boot"}
PNG = b"\x89PNG\r\n\x1a\nnot really a png"


def _overloaded(retry_after: str | None = "2") -> httpx.Response:
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    body = {
        "error": {
            "code": "too_many_requests",
            "message": "10000 requests in flight",
            "request_id": None,
        }
    }
    return httpx.Response(429, headers=headers, json=body)


def _script(
    *responses: httpx.Response | Exception,
) -> tuple[httpx.MockTransport, list[httpx.Request]]:
    """A transport answering with `responses` in order, recording every request."""
    seen: list[httpx.Request] = []
    queue = list(responses)

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        outcome = queue.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    return httpx.MockTransport(answer), seen


def _client(transport: httpx.MockTransport, sleeps: list[float], **kwargs: int) -> Client:
    client = Client("http://fmnist.test", transport=transport, **kwargs)
    client._sleep = sleeps.append
    return client


def test_429_is_retried_after_the_servers_retry_after() -> None:
    """A 429 with `Retry-After: 2` is retried once, 2 s later, with the same request."""
    transport, seen = _script(_overloaded("2"), httpx.Response(202, json=PENDING))
    sleeps: list[float] = []
    with _client(transport, sleeps) as client:
        handle = client.submit(PNG)
    assert handle.request_id == "r-1"
    assert sleeps == [2.0]
    assert [r.headers["Idempotency-Key"] for r in seen] == [seen[0].headers["Idempotency-Key"]] * 2


def test_retries_are_bounded_and_then_raise_overloaded() -> None:
    """After `retries` retries the 429 surfaces as `Overloaded` with the server's code and Retry-After."""
    transport, seen = _script(*[_overloaded("1") for _ in range(3)])
    sleeps: list[float] = []
    with _client(transport, sleeps, retries=2) as client, pytest.raises(Overloaded) as caught:
        client.submit(PNG)
    assert len(seen) == 3 and sleeps == [1.0, 1.0]
    assert (caught.value.status_code, caught.value.code, caught.value.retry_after) == (
        429,
        "too_many_requests",
        1.0,
    )
    assert "too_many_requests" in str(caught.value)


def test_503_without_retry_after_backs_off_exponentially() -> None:
    """Without `Retry-After`, waits grow exponentially (full jitter under 0.25·2^n s)."""
    transport, _ = _script(*[httpx.Response(503) for _ in range(4)])
    sleeps: list[float] = []
    with _client(transport, sleeps, retries=3) as client, pytest.raises(Unavailable):
        client.get("r-1")
    assert len(sleeps) == 3
    assert all(0 <= s <= 0.25 * 2**n for n, s in enumerate(sleeps))


def test_refused_connections_are_retried_then_reported() -> None:
    """A refused connection is retried (nothing was sent), then raised as `Unavailable` naming the URL."""
    refused = httpx.ConnectError("Connection refused")
    transport, seen = _script(refused, refused, refused)
    sleeps: list[float] = []
    with (
        _client(transport, sleeps, retries=2) as client,
        pytest.raises(Unavailable, match=r"fmnist\.test"),
    ):
        client.get("r-1")
    assert len(seen) == 3 and len(sleeps) == 2


def test_client_errors_are_not_retried() -> None:
    """A 415 is the caller's mistake: raised at once as `BadRequest`, no retry."""
    body = {
        "error": {"code": "unsupported_media_type", "message": "not an image", "request_id": None}
    }
    transport, seen = _script(httpx.Response(415, json=body))
    sleeps: list[float] = []
    with (
        _client(transport, sleeps) as client,
        pytest.raises(BadRequest, match="unsupported_media_type"),
    ):
        client.submit(b"hello")
    assert len(seen) == 1 and sleeps == []


def test_retry_after_is_capped() -> None:
    """An absurd `Retry-After` is capped at the policy's `max_delay`, so a call cannot hang for hours."""
    assert RetryPolicy(max_delay=30).delay(0, 86_400) == 30


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("3", lambda s: s == 3.0),
        ("0.5", lambda s: s == 0.5),
        ("soon", lambda s: s is None),
        (None, lambda s: s is None),
    ],
)
def test_retry_after_seconds_are_parsed(
    header: str | None, expected: Callable[[float | None], bool]
) -> None:
    """`Retry-After` delta-seconds parse; garbage is ignored."""
    assert expected(parse_retry_after(header))


def test_retry_after_http_date_is_parsed() -> None:
    """`Retry-After` as an HTTP date becomes the seconds until then."""
    header = email.utils.formatdate(time.time() + 10, usegmt=True)
    parsed = parse_retry_after(header)
    assert parsed is not None and 8 <= parsed <= 10


async def test_async_client_honours_retry_after() -> None:
    """The async client retries a 429 after `Retry-After` as well, then polls to the result."""
    answers = [_overloaded("1"), httpx.Response(202, json=PENDING), httpx.Response(200, json=DONE)]
    sleeps: list[float] = []

    async def record_sleep(seconds: float) -> None:
        sleeps.append(seconds)

    def answer(request: httpx.Request) -> httpx.Response:
        return answers.pop(0)

    async with AsyncClient("http://fmnist.test", transport=httpx.MockTransport(answer)) as client:
        client._sleep = record_sleep
        prediction = await client.predict(PNG, wait=5)
    assert prediction.class_name == "Ankle boot"
    assert sleeps[0] == 1.0 and len(sleeps) == 2  # the retry, then one poll interval
