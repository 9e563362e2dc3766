"""Fixtures for SDK tests: the real gateway app with an in-process worker, over ASGI or a real uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from fmnist_client import AsyncClient

import messaging
from app.gateway.main import create_app
from app.gateway.service import Gateway
from app.settings import Settings
from app.worker.consumer import Worker
from ml import CLASS_NAMES, ImageClassifier
from tests.e2e.processes import free_port
from tests.gateway.helpers import announcement


def sdk_settings(**overrides: Any) -> Settings:
    """Settings on a fresh in-memory broker, so tests never see each other's messages."""
    values: dict[str, Any] = {
        "broker_url": f"memory://sdk-{uuid.uuid4().hex[:8]}",
        "batch_fill_wait_ms": 2.0,
    }
    values.update(overrides)
    return Settings(**values)


def service_app(
    settings: Settings, classifier: ImageClassifier | None, *, announce: bool = True
) -> FastAPI:
    """The gateway app; with a classifier, a worker on the same broker runs inside its lifespan
    (what `fmnist serve` does), so one ASGI app answers predictions end to end."""
    app = create_app(settings)
    gateway_lifespan = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with gateway_lifespan(app):
            gateway = app.state.gateway
            if classifier is None:
                if announce:  # a model with a live worker that never answers: requests wait
                    gateway.registry.learn(announcement(heartbeat_s=3600))
                yield
                return
            async with (
                messaging.connect(settings.broker_url) as pubsub,
                Worker(settings, pubsub, classifier) as worker,
            ):
                await gateway_learned(gateway, worker.model_name)
                yield

    app.router.lifespan_context = lifespan
    return app


async def gateway_learned(gateway: Gateway, name: str) -> None:
    """Wait until `gateway` counts a live worker for the model `name`."""
    async with asyncio.timeout(10):
        while True:
            if any(v.ready for v in gateway.registry.versions(name)):
                return
            await asyncio.sleep(0.01)


@pytest.fixture(scope="session")
def classifier() -> ImageClassifier:
    """A real, untrained Fashion-MNIST-shaped classifier: the SDK tests check plumbing, not accuracy."""
    return ImageClassifier(class_names=CLASS_NAMES, seed=0)


ClientFactory = Callable[..., AbstractAsyncContextManager[AsyncClient]]


@pytest.fixture
def asgi_client(classifier: ImageClassifier) -> ClientFactory:
    """`async with asgi_client(worker=True, api_key=None, **settings) as client`: an `AsyncClient`
    talking to the real app through `httpx.ASGITransport` (lifespan run by hand, no sockets)."""

    @asynccontextmanager
    async def open_client(
        *,
        worker: bool = True,
        announce: bool = True,
        api_key: str | None = None,
        **overrides: Any,
    ) -> AsyncIterator[AsyncClient]:
        app = service_app(
            sdk_settings(**overrides), classifier if worker else None, announce=announce
        )
        transport = httpx.ASGITransport(app=app)
        async with (
            app.router.lifespan_context(app),
            AsyncClient(
                "http://fmnist.test", api_key=api_key, transport=transport, retries=0
            ) as client,
        ):
            yield client

    return open_client


class LiveServer:
    """uvicorn serving an app on a free port from a background thread (its own event loop)."""

    def __init__(self, app: FastAPI) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            lifespan="on",
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, name=f"uvicorn-{self.port}", daemon=True
        )

    def __enter__(self) -> LiveServer:
        self.thread.start()
        for _ in range(600):
            if self.server.started:
                return self
            if not self.thread.is_alive():
                raise RuntimeError("uvicorn exited during startup; see the captured log")
            time.sleep(0.01)
        raise TimeoutError("uvicorn did not start within 6 s")

    def __exit__(self, *exc_info: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


@pytest.fixture
def live_server(classifier: ImageClassifier) -> Iterator[Callable[..., LiveServer]]:
    """`live_server(**settings)` starts the app with a worker under real uvicorn; all stop at teardown."""
    started: list[LiveServer] = []

    def start(**overrides: Any) -> LiveServer:
        server = LiveServer(service_app(sdk_settings(**overrides), classifier)).__enter__()
        started.append(server)
        return server

    yield start
    for server in reversed(started):
        server.__exit__(None, None, None)


class TcpProxy:
    """A TCP relay in front of a server whose connections the test can cut, and refuse for a while."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.accepting = True
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.cut()
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    def cut(self) -> None:
        """Drop every open connection abruptly (no websocket close frame: a network failure)."""
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _relay(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        if not self.accepting:
            client_writer.transport.abort()
            return
        upstream_reader, upstream_writer = await asyncio.open_connection(
            "127.0.0.1", self.target_port
        )
        self._writers |= {client_writer, upstream_writer}

        async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            writer.transport.abort()

        await asyncio.gather(
            pump(client_reader, upstream_writer), pump(upstream_reader, client_writer)
        )
        self._writers -= {client_writer, upstream_writer}
