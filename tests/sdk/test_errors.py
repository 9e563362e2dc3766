"""How answers become exceptions: every status class, odd bodies, failed results, client-side checks."""

from __future__ import annotations

import httpx
import pytest
from fmnist_client import (
    BadRequest,
    Client,
    FmnistError,
    NotFound,
    Overloaded,
    PredictionFailed,
    Timeout,
    Unauthorized,
    Unavailable,
)
from fmnist_client._exceptions import error_from_response

PNG = b"\x89PNG\r\n\x1a\n..."


def _client(answer: httpx.Response) -> Client:
    return Client(
        "http://fmnist.test", transport=httpx.MockTransport(lambda request: answer), retries=0
    )


@pytest.mark.parametrize(
    ("status", "error_class"),
    [
        (400, BadRequest),
        (401, Unauthorized),
        (403, Unauthorized),
        (404, NotFound),
        (413, BadRequest),
        (415, BadRequest),
        (422, BadRequest),
        (431, BadRequest),
        (429, Overloaded),
        (503, Unavailable),
        (504, Timeout),
        (500, FmnistError),
    ],
)
def test_status_maps_to_its_exception(status: int, error_class: type[FmnistError]) -> None:
    """Each documented status raises its exception, carrying the server's code, message and id."""
    body = {"error": {"code": "some_code", "message": "what to do", "request_id": "r-9"}}
    with _client(httpx.Response(status, json=body)) as client, pytest.raises(error_class) as caught:
        client.get("r-9")
    error = caught.value
    assert type(error) is error_class
    assert (error.status_code, error.code, error.message, error.request_id) == (
        status,
        "some_code",
        "what to do",
        "r-9",
    )
    assert str(error) == f"what to do (HTTP {status}, code=some_code, request_id=r-9)"


def test_a_non_json_error_body_still_maps_by_status() -> None:
    """A proxy's HTML 502 page becomes Unavailable with code http_502."""
    with (
        _client(httpx.Response(502, text="<html>Bad Gateway</html>")) as client,
        pytest.raises(Unavailable) as caught,
    ):
        client.get("x")
    assert caught.value.code == "http_502"


def test_a_framework_detail_body_keeps_its_message() -> None:
    """Starlette-style `{"detail": ...}` bodies keep their message."""
    error = error_from_response(405, {"detail": "Method Not Allowed"})
    assert isinstance(error, BadRequest) and error.message == "Method Not Allowed"


def test_a_failed_result_raises_prediction_failed_with_the_result() -> None:
    """A `failed` result raises PredictionFailed carrying the worker's error code and the full result."""
    failed = {
        "request_id": "r-1",
        "status": "failed",
        "error": {"code": "deadline_exceeded", "message": "request expired after 60 s"},
    }
    with (
        _client(httpx.Response(200, json=failed)) as client,
        pytest.raises(PredictionFailed) as caught,
    ):
        client.predict(PNG)
    assert caught.value.code == "deadline_exceeded" and caught.value.request_id == "r-1"
    assert caught.value.prediction.error is not None and caught.value.prediction.status == "failed"


def test_an_unexpected_success_body_is_reported() -> None:
    """A 200 that is not a prediction (wrong URL, a proxy page) raises FmnistError saying so."""
    with (
        _client(httpx.Response(200, text="<html>hi</html>")) as client,
        pytest.raises(FmnistError, match="unexpected response"),
    ):
        client.get("x")


def test_oversized_metadata_fails_before_sending() -> None:
    """Metadata over 1 KiB is refused client-side, naming the limit; nothing is sent."""
    sent: list[httpx.Request] = []
    transport = httpx.MockTransport(lambda request: sent.append(request) or httpx.Response(500))
    with (
        Client("http://fmnist.test", transport=transport) as client,
        pytest.raises(ValueError, match="1024"),
    ):
        client.submit(PNG, metadata={"note": "x" * 2000})
    assert sent == []


def test_non_string_metadata_fails_before_sending() -> None:
    """Metadata values must be strings (the header is a JSON object of strings)."""
    with (
        Client(
            "http://fmnist.test", transport=httpx.MockTransport(lambda r: httpx.Response(500))
        ) as client,
        pytest.raises(TypeError, match="str to str"),
    ):
        client.submit(PNG, metadata={"label": 3})  # type: ignore[dict-item]


def test_non_ascii_metadata_is_sent_escaped() -> None:
    """Non-ASCII metadata travels as ASCII JSON escapes (header values must be latin-1)."""
    seen: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers["X-Fmnist-Metadata"])
        return httpx.Response(202, json={"request_id": "r", "status": "pending"})

    with Client("http://fmnist.test", transport=httpx.MockTransport(answer)) as client:
        client.submit(PNG, metadata={"note": "größe ✓"})
    assert seen == ['{"note":"gr\\u00f6\\u00dfe \\u2713"}']


@pytest.mark.parametrize(
    ("timeout", "wait", "expected"), [(30.0, 60.0, "10"), (2.0, 60.0, "1.6"), (30.0, 0.5, "0.5")]
)
def test_the_gateway_never_holds_a_request_past_our_timeout(
    timeout: float, wait: float, expected: str
) -> None:
    """predict() asks for `?wait=` of at most 10 s and 80 % of the read timeout (then polls)."""
    seen: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.params["wait"])
        return httpx.Response(200, json={"request_id": "r", "status": "completed", "label": 0})

    with Client(
        "http://fmnist.test", timeout=timeout, transport=httpx.MockTransport(answer)
    ) as client:
        client.predict(PNG, wait=wait)
    assert seen == [expected]


def test_request_ids_are_quoted_into_the_path() -> None:
    """An id with '/' or '?' stays one path segment: it cannot reach another route."""
    paths: list[bytes] = []

    def answer(request: httpx.Request) -> httpx.Response:
        paths.append(request.url.raw_path)
        return httpx.Response(
            404, json={"error": {"code": "not_found", "message": "no", "request_id": None}}
        )

    with (
        Client("http://fmnist.test", transport=httpx.MockTransport(answer)) as client,
        pytest.raises(NotFound),
    ):
        client.get("../stats?x=1")
    assert paths == [b"/v1/predictions/..%2Fstats%3Fx%3D1"]
