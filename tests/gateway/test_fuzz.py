"""Schemathesis against /openapi.json through the ASGI app: no input a client can send produces a 5xx."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.python import asgi

from app.gateway.main import create_app
from tests.gateway.helpers import announcement, gateway_settings

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

# Building the app and its OpenAPI document connects nothing; the lifespan (broker, consumer) starts
# with the first fuzzed request and is stopped by the fixture below. A short wait cap keeps fuzzed
# `?wait=` values from holding the run (no worker answers here).
APP = create_app(gateway_settings(max_sync_wait_s=0.2, max_upload_bytes=64 * 1024))
APP.state.gateway.registry.learn(announcement(heartbeat_s=3600))  # a model with a live worker
# Send raw bytes for the binary media types schemathesis has no serializer for.
schemathesis.serializer.alias(["application/x-npy", "image/bmp"], "application/octet-stream")
schema = schemathesis.openapi.from_dict(APP.openapi())
schema.app = APP  # calls go through the ASGI app, in process, as `from_asgi` would do


@pytest.fixture(scope="module", autouse=True)
def stop_the_app_afterwards() -> Iterator[None]:
    yield
    asgi.shutdown_lifespans()


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_input_produces_a_server_error(case: schemathesis.Case) -> None:
    """Every generated request (bodies, headers, query, path) gets an answer below 500."""
    case.call_and_validate(checks=[not_a_server_error])
