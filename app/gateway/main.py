"""The gateway application: `create_app(settings)` wires routes, errors, edge limits and the broker lifespan.

    uvicorn --factory app.gateway.main:create_app      # or `fmnist gateway` / `fmnist serve`

Nothing here (nor anything it imports) imports torch: images are decoded with Pillow and numpy.
"""

from __future__ import annotations

import inspect
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.gateway import (
    catalog,
    demo,
    ops,
    predictions,
    replay_api,
    rollout_routes,
    shadow_api,
    stream,
)
from app.gateway.docs import install_docs
from app.gateway.errors import ApiError, error_body, install_error_handlers
from app.gateway.service import Gateway, PubSubFactory
from app.gateway.v2 import rest as v2_rest
from app.logs import kv
from app.settings import Settings, get_settings

log = logging.getLogger(__name__)

# One request header above this size is refused with 431; the whole block's limit is a setting
# (FMNIST_MAX_HEADER_BYTES), which the server (app/gateway/server.py) applies as the bytes arrive.
MAX_HEADER_VALUE_BYTES = 8 * 1024
# What a request whose client left before sending its body counts as in /metrics (nginx's convention).
CLIENT_CLOSED_REQUEST = 499
# A client refused for a full body budget may try again this soon: bodies in flight finish in seconds.
# At most this long is spent waiting for the broker at startup; the gateway then serves 503s and
# keeps reconnecting in the background.
MAX_STARTUP_WAIT_S = 15.0

DESCRIPTION = """
Image classification behind a pub/sub broker with dynamic batching.

Submit an image (`POST /v1/predictions`), get a request id at once (202), then poll
`GET /v1/predictions/{id}`, wait for it with `?wait=SECONDS`, or have it pushed over
`WS /v1/predictions/stream`. Errors are `{"error": {"code", "message", "request_id"}}`.
When `FMNIST_API_KEYS` is set, `/v1` routes need `Authorization: Bearer KEY` or `X-API-Key: KEY`.
"""


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Connect to the broker and start the results consumer; a broker that is down does not stop startup."""
    gateway: Gateway = app.state.gateway
    wait_s = min(gateway.settings.broker_connect_timeout_s + 1.0, MAX_STARTUP_WAIT_S)
    await gateway.start(wait_s=wait_s)
    log.info(
        kv(
            "gateway_started",
            gateway_id=gateway.gateway_id,
            broker=gateway.broker_url,
            ready=gateway.ready,
            auth="on" if gateway.api_keys.enabled else "off",
            admin_calls=gateway.api_keys.admin_mode,
        )
    )
    try:
        yield
    finally:
        await gateway.stop()
        log.info(kv("gateway_stopped", gateway_id=gateway.gateway_id))


class EdgeMiddleware:
    """Refuses oversized headers (431), bounds the request body bytes held in total (503), and
    records every HTTP request's route, status and latency."""

    def __init__(self, app: ASGIApp, gateway: Gateway) -> None:
        self.app = app
        self.metrics = gateway.metrics
        settings = gateway.settings
        self.max_header_bytes = settings.max_header_bytes
        self.bodies = gateway.bodies

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        oversized = _oversized_header(scope["headers"], self.max_header_bytes)
        if oversized is not None:
            await _refuse_headers(scope, send, oversized)
            return
        if scope["type"] == "websocket":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        bodies = self.bodies
        held = 0
        body_done = False

        async def receive_bounded() -> Message:
            # The body's read timeout is the server's (app/gateway/server.py): it costs nothing per request.
            nonlocal held, body_done
            message = await receive()
            if body_done:  # later reads only wait for a disconnect
                return message
            if message["type"] == "http.request":
                size = len(message.get("body", b""))
                if size:
                    bodies.take(size)
                    held += size
                body_done = not message.get("more_body", False)
            elif message["type"] == "http.disconnect":
                # Gone mid-body: answered (to nobody) like any client error, not logged as a crash.
                raise ApiError(
                    CLIENT_CLOSED_REQUEST,
                    "client_closed_request",
                    "the client closed the connection before its body arrived",
                )
            return message

        try:
            await self.app(scope, receive_bounded, send_and_record)
        finally:
            bodies.release(held)
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope["method"]
            self.metrics.http_requests.labels(template, method, str(status)).inc()
            self.metrics.http_latency.labels(template, method).observe(
                time.perf_counter() - started
            )


def _oversized_header(headers: list[tuple[bytes, bytes]], max_total: int) -> str | None:
    total = 0
    for name, value in headers:
        if len(value) > MAX_HEADER_VALUE_BYTES:
            return f"header {name.decode('latin-1')} is {len(value)} bytes; the limit is {MAX_HEADER_VALUE_BYTES}"
        total += len(name) + len(value)
    if total > max_total:
        return (
            f"request headers are {total} bytes; the limit is {max_total} (FMNIST_MAX_HEADER_BYTES)"
        )
    return None


async def _refuse_headers(scope: Scope, send: Send, reason: str) -> None:
    body = json.dumps(error_body("header_too_large", reason)).encode()
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008, "reason": "header too large"})
        return
    await send(
        {
            "type": "http.response.start",
            "status": 431,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def create_app(
    settings: Settings | None = None,
    *,
    pubsub_factory: PubSubFactory | None = None,
    replay: replay_api.ReplayHook | None = None,
) -> FastAPI:
    """The gateway ASGI app. `pubsub_factory` replaces `messaging.connect` (tests inject broker
    faults); `replay` runs `POST /v1/models/{name}/replay` (`fmnist serve` installs one)."""
    settings = settings or get_settings()
    gateway = Gateway(settings, pubsub_factory)
    app = FastAPI(
        title="fmnist-service",
        version=_version(),
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # /docs and /redoc: install_docs, from local files
        redoc_url=None,
        openapi_tags=[
            {"name": "predictions", "description": "Submit images, read and stream results."},
            {"name": "operations", "description": "Health, readiness and metrics."},
            {
                "name": "open inference protocol (v2)",
                "description": "KServe/Triton v2 REST API (also served over gRPC).",
            },
        ],
        **_telemetry_options(settings),
    )
    app.state.settings = settings
    app.state.gateway = gateway
    app.state.replay = replay
    app.state.stream_slots = stream.StreamSlots(settings.stream_max_connections)
    install_error_handlers(app)
    app.include_router(predictions.router)
    app.include_router(catalog.router)
    app.include_router(shadow_api.router)
    app.include_router(rollout_routes.router)
    app.include_router(replay_api.router)
    app.include_router(v2_rest.router)
    app.include_router(stream.router)
    app.include_router(ops.router)
    app.include_router(demo.router)
    install_docs(app)
    app.add_middleware(EdgeMiddleware, gateway=gateway)
    return app


def _telemetry_options(settings: Settings) -> dict[str, Any]:
    """FastAPI's native OpenTelemetry switches, where this FastAPI has them.

    Off unless `FMNIST_OPENTELEMETRY` is set: per request it reads the environment and the global
    providers. Switching it off together with making the dependencies async gave +19% single-image
    images/s in `bench/http_single.py` (942 vs 792); its own share was not measured separately.
    """
    if "telemetry" not in inspect.signature(FastAPI.__init__).parameters:
        return {}
    enabled = settings.opentelemetry
    return {"telemetry": {"tracing": enabled, "metrics": enabled, "logs": enabled}}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fmnist-service")
    except PackageNotFoundError:
        return "0.0.0"
