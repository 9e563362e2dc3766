"""The SDK and models: listing them, pinning a version, and the model errors."""

from __future__ import annotations

import numpy as np
import pytest
from fmnist_client import NotFound, Unavailable

from tests.sdk.conftest import ClientFactory

IMAGE = np.zeros((28, 28), np.uint8)


async def test_models_lists_the_served_model(asgi_client: ClientFactory) -> None:
    """client.models() and client.model(name) describe the worker's model: shape, classes, readiness."""
    async with asgi_client() as client:
        models = await client.models()
        one = await client.model("fmnist")
    assert [m.name for m in models] == ["fmnist"]
    assert one == models[0]
    assert one.ready and one.default and one.live_workers == 1
    assert one.input_shape == (1, 28, 28) and len(one.class_names) == 10
    assert len(one.versions) == 1 and one.versions[0].ready


async def test_a_pinned_prediction_names_its_model_and_version(asgi_client: ClientFactory) -> None:
    """predict(model=, version=) comes back from that model at that version."""
    async with asgi_client() as client:
        (model,) = await client.models()
        version = model.versions[0].version
        prediction = await client.predict(IMAGE, model="fmnist", version=version)
        (many,) = await client.predict_many([IMAGE], model="fmnist", version=version)
    assert (prediction.model, prediction.model_version) == ("fmnist", version)
    assert (many.model, many.model_version) == ("fmnist", version)


async def test_an_unknown_model_raises_not_found(asgi_client: ClientFactory) -> None:
    """predict(model="nope") raises NotFound with code model_not_found, naming the known models."""
    async with asgi_client() as client:
        with pytest.raises(NotFound) as raised:
            await client.predict(IMAGE, model="nope")
        with pytest.raises(NotFound):
            await client.model("nope")
    assert raised.value.code == "model_not_found" and "fmnist" in raised.value.message


async def test_an_unknown_version_raises_not_found(asgi_client: ClientFactory) -> None:
    """predict(version="nope") raises NotFound with code version_not_found."""
    async with asgi_client() as client:
        with pytest.raises(NotFound) as raised:
            await client.predict(IMAGE, version="nope")
    assert raised.value.code == "version_not_found"


async def test_a_model_without_a_worker_raises_unavailable(asgi_client: ClientFactory) -> None:
    """Before any worker announced a model, predict() raises Unavailable (model_unavailable)."""
    async with asgi_client(worker=False, announce=False) as client:
        with pytest.raises(Unavailable) as raised:
            await client.predict(IMAGE)
    assert raised.value.code == "model_unavailable"
