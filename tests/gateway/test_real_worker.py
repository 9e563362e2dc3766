"""The gateway with the real `Worker` and a real `ImageClassifier` in process: what the model says is what GET says."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import messaging
from app.worker.consumer import Worker
from ml import ImageClassifier
from tests.gateway.helpers import (
    fashion_like,
    gateway_settings,
    npy_bytes,
    png_bytes,
    running_gateway,
)

pytestmark = pytest.mark.timeout(60)


async def test_results_match_the_models_own_predictions() -> None:
    """PNG and .npy uploads go through the real worker; labels and probabilities equal `predict()` on the same pixels."""
    settings = gateway_settings(max_batch_size=16, batch_fill_wait_ms=2.0)
    classifier = ImageClassifier(seed=1)
    images = np.stack([fashion_like(seed) for seed in range(12)])
    expected = classifier.predict(torch.from_numpy(images).unsqueeze(1))
    async with (
        messaging.connect(settings.broker_url) as pubsub,
        Worker(settings, pubsub, classifier),
        running_gateway(settings) as (_, client),
    ):
        single = await client.post(
            "/v1/predictions?wait=10",
            content=png_bytes(images[0]),
            headers={"Content-Type": "image/png"},
        )
        batch = await client.post(
            "/v1/predictions:batch?wait=10",
            content=npy_bytes(images),
            headers={"Content-Type": "application/x-npy"},
        )
    assert single.status_code == 200, single.text
    items = [single.json(), *batch.json()["items"][1:]]
    assert [item["label"] for item in items] == expected.argmax(dim=1).tolist()
    assert np.allclose([item["probabilities"] for item in items], expected.numpy(), atol=1e-5)
    assert all(item["model_version"] == classifier.version for item in items)
    assert max(item["batch_size"] for item in items) > 1  # the npy batch was computed in batches
