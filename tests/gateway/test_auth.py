"""API keys: 401 without, 403 with a wrong one, Bearer or X-API-Key, and each key sees only its own results."""

from __future__ import annotations

import pytest
from starlette.requests import HTTPConnection

from app.gateway.auth import ApiKeys, key_fingerprint
from app.gateway.errors import ApiError
from tests.gateway.helpers import (
    fashion_like,
    gateway_settings,
    png_bytes,
    running_gateway,
    worker_running,
)

pytestmark = pytest.mark.timeout(30)

PNG = {"Content-Type": "image/png"}
KEYS = ["alice-key", "bob-key"]


async def test_missing_key_is_401() -> None:
    """Every /v1 route needs a key when FMNIST_API_KEYS is set."""
    async with running_gateway(gateway_settings(api_keys=KEYS)) as (_, client):
        submit = await client.post(
            "/v1/predictions", content=png_bytes(fashion_like()), headers=PNG
        )
        stats = await client.get("/v1/stats")
        poll = await client.get("/v1/predictions/anything")
    for response in (submit, stats, poll):
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "unauthorized"
    assert submit.headers["www-authenticate"] == "Bearer"


async def test_wrong_key_is_403() -> None:
    """A key that is not configured is refused with 403."""
    async with running_gateway(gateway_settings(api_keys=KEYS)) as (_, client):
        response = await client.get("/v1/stats", headers={"Authorization": "Bearer eve-key"})
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "forbidden"


@pytest.mark.parametrize(
    "headers", [{"Authorization": "Bearer alice-key"}, {"X-API-Key": "alice-key"}]
)
async def test_bearer_and_x_api_key_are_both_accepted(headers: dict[str, str]) -> None:
    """Either header carries the key."""
    async with running_gateway(gateway_settings(api_keys=KEYS)) as (_, client):
        response = await client.post(
            "/v1/predictions", content=png_bytes(fashion_like()), headers={**PNG, **headers}
        )
    assert response.status_code == 202


async def test_a_key_reads_only_its_own_results() -> None:
    """Bob gets 404 for Alice's request; Alice reads it; the owner on the wire is a fingerprint, not the key."""
    settings = gateway_settings(api_keys=KEYS)
    alice = {"X-API-Key": "alice-key"}
    async with running_gateway(settings) as (app, client), worker_running(settings):
        submitted = await client.post(
            "/v1/predictions?wait=5", content=png_bytes(fashion_like()), headers={**PNG, **alice}
        )
        request_id = submitted.json()["request_id"]
        as_bob = await client.get(f"/v1/predictions/{request_id}", headers={"X-API-Key": "bob-key"})
        as_alice = await client.get(f"/v1/predictions/{request_id}", headers=alice)
        stored = app.state.gateway.store.get_result(request_id)
    assert as_bob.status_code == 404
    assert as_alice.status_code == 200 and as_alice.json()["status"] == "completed"
    assert stored is not None and stored.result.owner == key_fingerprint("alice-key") != "alice-key"


async def test_idempotency_keys_are_scoped_per_api_key() -> None:
    """Two API keys using the same Idempotency-Key get two different requests."""
    async with running_gateway(gateway_settings(api_keys=KEYS)) as (_, client):
        ids = []
        for key in KEYS:
            response = await client.post(
                "/v1/predictions",
                content=png_bytes(fashion_like()),
                headers={**PNG, "X-API-Key": key, "Idempotency-Key": "same"},
            )
            ids.append(response.json()["request_id"])
    assert ids[0] != ids[1]


async def test_probes_metrics_and_docs_need_no_key() -> None:
    """Health, readiness, metrics and the docs stay open for orchestrators and humans."""
    async with running_gateway(gateway_settings(api_keys=KEYS)) as (_, client):
        statuses = [
            (await client.get(path)).status_code
            for path in ("/healthz", "/readyz", "/metrics", "/openapi.json")
        ]
    assert statuses == [200, 200, 200, 200]


def websocket_connection(query: bytes) -> HTTPConnection:
    """A websocket handshake's connection with only a query string, as the server builds it."""
    return HTTPConnection({"type": "websocket", "query_string": query, "headers": []})


@pytest.mark.parametrize(
    "query", [b"api_key=alice-key", b"api%5Fkey=alice-key", b"API_KEY=alice-key"]
)
def test_websocket_key_is_read_under_every_spelling_the_logs_redact(query: bytes) -> None:
    """Each spelling of `api_key` that the log redaction hides authenticates, and no other."""
    owner = ApiKeys(KEYS).owner_of(websocket_connection(query))
    assert owner == key_fingerprint("alice-key")


def test_a_websocket_key_given_twice_with_different_values_is_401() -> None:
    """`?api_key=a&api%5Fkey=b` is refused rather than guessing which key was meant."""
    with pytest.raises(ApiError) as refused:
        ApiKeys(KEYS).owner_of(websocket_connection(b"api_key=alice-key&api%5Fkey=bob-key"))
    assert refused.value.status == 401


def http_connection(key: str | None) -> HTTPConnection:
    headers = [] if key is None else [(b"x-api-key", key.encode())]
    return HTTPConnection({"type": "http", "query_string": b"", "headers": headers})


def test_admin_keys_alone_guard_only_the_admin_calls() -> None:
    """With only FMNIST_ADMIN_API_KEYS set, other routes stay open and admin calls need an admin key."""
    keys = ApiKeys([], admin_keys=["root-key"])
    with pytest.raises(ApiError) as missing:
        keys.admin_of(http_connection(None))
    assert keys.owner_of(http_connection(None)) == ""
    assert missing.value.status == 401
    assert keys.admin_of(http_connection("root-key")) == key_fingerprint("root-key")


def test_an_admin_key_works_as_an_api_key() -> None:
    """An admin key is accepted on the ordinary routes too, under its own fingerprint."""
    keys = ApiKeys(KEYS, admin_keys=["root-key"])
    assert keys.owner_of(http_connection("root-key")) == key_fingerprint("root-key")
