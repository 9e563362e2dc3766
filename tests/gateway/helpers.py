"""Helpers for gateway tests: fresh settings, the app run through its lifespan, a stand-in worker, images."""

from __future__ import annotations

import asyncio
import contextlib
import io
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import numpy as np
from fastapi import FastAPI
from PIL import Image

import messaging
from app.gateway.main import create_app
from app.gateway.service import Gateway
from app.protocol import (
    METADATA_ATTR,
    OWNER_ATTR,
    REQUEST_ID_ATTR,
    SHAPE_ATTR,
    ModelAnnouncement,
    ResultMessage,
    decode_metadata,
    requests_topic_for,
    result_attributes,
    worker_group_for,
)
from app.settings import Settings
from tests.brokers import broker_env, unique_name

CLASS_NAMES = [f"class-{i}" for i in range(10)]  # the stand-in model's classes
STAND_IN_MODEL = "fmnist"
STAND_IN_VERSION = "standin00000"
# Gateways started by `running_gateway` / `serving`: `worker_running` waits until they know its model.
_GATEWAYS: list[Gateway] = []


def gateway_settings(broker_url: str | None = None, **overrides: Any) -> Settings:
    """Settings on fresh topics (and a fresh memory broker unless `broker_url` is given)."""
    url = broker_url or f"memory://{unique_name('gw')}"
    env = broker_env(url)
    values: dict[str, Any] = {
        "broker_url": env["FMNIST_BROKER_URL"],
        "requests_topic": unique_name("req"),
        "results_topic": unique_name("res"),
        "deadletter_topic": unique_name("dlq"),
        "worker_group": unique_name("workers"),
        "control_topic": unique_name("ctl"),
        "broker_connect_timeout_s": 5.0,
    }
    values.update(overrides)
    return Settings(**values)


@contextlib.asynccontextmanager
async def running_gateway(
    settings: Settings, **app_options: Any
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """The real app, started through its lifespan, with an httpx client over the ASGI transport."""
    announce = app_options.pop("announce", True)
    app = create_app(settings, **app_options)
    async with app.router.lifespan_context(app), _known_gateway(app.state.gateway):
        if announce and app.state.gateway.ready:
            await announce_model(settings)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            yield app, client


@contextlib.asynccontextmanager
async def _known_gateway(gateway: Gateway) -> AsyncIterator[None]:
    _GATEWAYS.append(gateway)
    try:
        yield
    finally:
        _GATEWAYS.remove(gateway)


def announcement(
    worker_id: str = "stand-in",
    *,
    name: str = STAND_IN_MODEL,
    version: str = STAND_IN_VERSION,
    tag: str | None = None,
    input_shape: tuple[int, int, int] = (1, 28, 28),
    classes: list[str] | None = None,
    status: str = "live",
    heartbeat_s: float = 60.0,
) -> ModelAnnouncement:
    """A stand-in worker's announcement (live for three `heartbeat_s` without heartbeats)."""
    return ModelAnnouncement.model_validate(
        {
            "worker_id": worker_id,
            "name": name,
            "version": version,
            "tag": tag,
            "input_shape": input_shape,
            "class_names": classes or CLASS_NAMES,
            "preprocessing": {"channels": input_shape[0], "auto_invert": input_shape[0] == 1},
            "precision": "fp32",
            "device": "cpu",
            "status": status,
            "sent_at": time.time(),
            "heartbeat_s": heartbeat_s,
        }
    )


async def announce_model(settings: Settings, model: ModelAnnouncement | None = None) -> None:
    """Announce `model` (default: the stand-in's, live for minutes) as if a worker served it, and wait
    until the running gateways know it: requests for it are accepted and wait on its topic."""
    model = model or announcement("announcer")
    async with messaging.connect(settings.broker_url) as pubsub:
        await pubsub.ensure_topics(
            settings.control_topic, requests_topic_for(settings.requests_topic, model.name)
        )
        await pubsub.publish(settings.control_topic, sent_now(model).to_bytes(), key=model.name)
    await gateways_know(settings, model.name, model.version, live=model.status == "live")


def sent_now(model: ModelAnnouncement) -> ModelAnnouncement:
    """The announcement as a worker sends it now: an announcement made at import time (a test
    module's constant) would otherwise be older than the liveness window when the test runs."""
    return model.model_copy(update={"sent_at": time.time()})


async def gateways_know(settings: Settings, name: str, version: str, live: bool = True) -> None:
    """Wait until every gateway of these settings sees `name` at `version` live (or not live)."""
    async with asyncio.timeout(15):
        while True:
            pending = [
                gateway
                for gateway in _GATEWAYS
                if gateway.settings.control_topic == settings.control_topic
                and not any(
                    v.version == version and v.ready == live
                    for v in gateway.registry.versions(name)
                )
            ]
            if not pending:
                return
            await asyncio.sleep(0.01)


def label_of(payload: bytes) -> int:
    """The stand-in worker's "prediction": a function of the pixels, so tests can check the payload."""
    return payload[0] % 10


async def stand_in_worker(
    settings: Settings,
    *,
    delay_s: float = 0.0,
    ready: asyncio.Event | None = None,
    model: ModelAnnouncement | None = None,
    pinned_only: bool = False,
    routing_attributes: bool = True,
) -> None:
    """Consume requests like a worker and publish a deterministic result for each (no model, no torch).

    Results carry a worker's routing attributes (`result_attributes`) unless `routing_attributes`
    is False, as from an older worker.

    It announces `model` (default: `announcement()`) on the control topic, and reads the model's topic
    (or, with `pinned_only`, only the topic of requests pinned to its version)."""
    model = model or announcement()
    version = model.version if pinned_only else None
    topic = requests_topic_for(settings.requests_topic, model.name, version)
    async with messaging.connect(settings.broker_url) as pubsub:
        await pubsub.ensure_topics(topic, settings.results_topic, settings.control_topic)
        async with pubsub.subscribe(
            topic, group=worker_group_for(settings.worker_group, model.name, version)
        ) as requests:
            await pubsub.publish(settings.control_topic, sent_now(model).to_bytes(), key=model.name)
            await gateways_know(settings, model.name, model.version)
            if ready is not None:
                ready.set()
            async for message in requests:
                if delay_s:
                    await asyncio.sleep(delay_s)
                attributes = message.attributes
                c, h, w = model.input_shape
                if attributes.get(SHAPE_ATTR) != f"{c},{h},{w}" or len(message.data) != c * h * w:
                    # As a real worker: a payload that is not the model's input is refused.
                    await message.ack()
                    continue
                label = label_of(message.data)
                probabilities = [0.0] * 10
                probabilities[label] = 1.0
                result = ResultMessage(
                    request_id=attributes[REQUEST_ID_ATTR],
                    status="completed",
                    label=label,
                    class_name=model.class_names[label % len(model.class_names)],
                    probabilities=probabilities,
                    model=model.name,
                    model_version=model.version,
                    batch_id=unique_name("batch"),
                    batch_size=1,
                    queue_ms=0.5,
                    inference_ms=0.25,
                    worker_id="stand-in",
                    completed_at=time.time(),
                    owner=attributes.get(OWNER_ATTR, ""),
                    metadata=decode_metadata(attributes.get(METADATA_ATTR)),
                )
                await pubsub.publish(
                    settings.results_topic,
                    result.to_bytes(),
                    # An older worker put the request id in the key instead of the attributes.
                    key=None if routing_attributes else result.request_id,
                    attributes=result_attributes(attributes, result.completed_at, result.request_id)
                    if routing_attributes
                    else None,
                )
                await message.ack()


@contextlib.asynccontextmanager
async def worker_running(settings: Settings, **options: Any) -> AsyncIterator[None]:
    """Run `stand_in_worker` for the duration of the block."""
    ready = asyncio.Event()
    task = asyncio.create_task(stand_in_worker(settings, ready=ready, **options))
    try:
        async with asyncio.timeout(30):
            waiter = asyncio.ensure_future(ready.wait())
            await asyncio.wait({waiter, task}, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                task.result()
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def png_bytes(pixels: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode).save(buffer, "PNG")
    return buffer.getvalue()


def encode(image: Image.Image, image_format: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


def fashion_like(seed: int = 0) -> np.ndarray:
    """A 28×28 light object on a dark border, like a Fashion-MNIST image; pixel [0,0] is `seed % 10`."""
    rng = np.random.default_rng(seed)
    pixels = np.zeros((28, 28), np.uint8)
    pixels[4:24, 6:22] = rng.integers(60, 256, size=(20, 16), dtype=np.uint8)
    pixels[0, 0] = seed % 10  # the stand-in worker's label
    return pixels


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


@contextlib.asynccontextmanager
async def serving(settings: Settings, **app_options: Any) -> AsyncIterator[tuple[FastAPI, str]]:
    """The real app behind a real uvicorn on a free port (for websockets); yields (app, "127.0.0.1:PORT")."""
    import uvicorn

    from app.gateway.server import uvicorn_config

    announce = app_options.pop("announce", True)
    app = create_app(settings, **app_options)
    server = uvicorn.Server(uvicorn_config(app, settings, host="127.0.0.1", port=0))
    task = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(15):
            while not server.started:
                if task.done():
                    task.result()
                await asyncio.sleep(0.02)
        port = server.servers[0].sockets[0].getsockname()[1]
        async with _known_gateway(app.state.gateway):
            if announce and app.state.gateway.ready:
                await announce_model(settings)
            yield app, f"127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
