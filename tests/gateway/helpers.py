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
from app.protocol import METADATA_ATTR, OWNER_ATTR, REQUEST_ID_ATTR, ResultMessage, decode_metadata
from app.settings import Settings
from tests.brokers import broker_env, unique_name

CLASS_NAMES = [f"class-{i}" for i in range(10)]  # the stand-in model's classes


def gateway_settings(broker_url: str | None = None, **overrides: Any) -> Settings:
    """Settings on fresh topics (and a fresh memory broker unless `broker_url` is given)."""
    url = broker_url or f"memory://{unique_name('gw')}"
    env = broker_env(url)
    values: dict[str, Any] = {
        "broker_url": url,
        "kafka_idempotence": env.get("FMNIST_KAFKA_IDEMPOTENCE", "true") == "true",
        "requests_topic": unique_name("req"),
        "results_topic": unique_name("res"),
        "deadletter_topic": unique_name("dlq"),
        "worker_group": unique_name("workers"),
        "broker_connect_timeout_s": 5.0,
    }
    values.update(overrides)
    return Settings(**values)


@contextlib.asynccontextmanager
async def running_gateway(
    settings: Settings, **app_options: Any
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """The real app, started through its lifespan, with an httpx client over the ASGI transport."""
    app = create_app(settings, **app_options)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            yield app, client


def label_of(payload: bytes) -> int:
    """The stand-in worker's "prediction": a function of the pixels, so tests can check the payload."""
    return payload[0] % 10


async def stand_in_worker(
    settings: Settings, *, delay_s: float = 0.0, ready: asyncio.Event | None = None
) -> None:
    """Consume requests like a worker and publish a deterministic result for each (no model, no torch)."""
    async with messaging.connect(
        settings.broker_url, kafka_idempotence=settings.kafka_idempotence
    ) as pubsub:
        await pubsub.ensure_topics(settings.requests_topic, settings.results_topic)
        async with pubsub.subscribe(
            settings.requests_topic, group=settings.worker_group
        ) as requests:
            if ready is not None:
                ready.set()
            async for message in requests:
                if delay_s:
                    await asyncio.sleep(delay_s)
                attributes = message.attributes
                label = label_of(message.data)
                probabilities = [0.0] * 10
                probabilities[label] = 1.0
                result = ResultMessage(
                    request_id=attributes[REQUEST_ID_ATTR],
                    status="completed",
                    label=label,
                    class_name=CLASS_NAMES[label],
                    probabilities=probabilities,
                    model_version="standin00000",
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
                    settings.results_topic, result.to_bytes(), key=result.request_id
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
        yield app, f"127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
