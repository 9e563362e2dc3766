"""The `ModelRunner` checks every served form must pass: batching, a poison item failing alone, deadlines.

Faults a real model cannot be made to raise on cue (a poison image, a pass held busy) are injected
around the loaded model's own forward pass, so everything else is the real form end to end.
"""

from __future__ import annotations

import asyncio
import threading
import time

import torch

from ml.runner import DeadlineExceeded, ModelError, ModelRunner, Prediction
from ml.serving import ServedModel


def images_for(served: ServedModel, count: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shape = (count, *served.input_shape)
    return list(torch.randint(0, 255, shape, dtype=torch.uint8, generator=generator))


def poisoned(served: ServedModel) -> ServedModel:
    """The same model, whose pass raises for any batch holding an all-255 image."""
    forward = served._forward

    def poisoned_forward(images: torch.Tensor) -> torch.Tensor:
        if bool((images.flatten(1) == 255).all(dim=1).any()):
            raise RuntimeError("poison image")
        return forward(images)

    return ServedModel(served.description, poisoned_forward)


class Gated:
    """The same model, whose passes wait at a gate until `release()`."""

    def __init__(self, served: ServedModel) -> None:
        self.entered = threading.Event()
        self.gate = threading.Event()
        forward = served._forward

        def gated_forward(images: torch.Tensor) -> torch.Tensor:
            self.entered.set()
            self.gate.wait(timeout=10)
            return forward(images)

        self.model = ServedModel(served.description, gated_forward)


async def check_batches(served: ServedModel) -> None:
    """Concurrent submits form one batch, and each caller gets its own image's answer."""
    images = images_for(served, 8)
    expected = served.predict(torch.stack(images))
    async with ModelRunner(served, max_batch_size=8, max_wait_ms=500, concurrency=1) as runner:
        predictions = await asyncio.gather(*(runner.submit(image) for image in images))
    assert {p.batch_size for p in predictions} == {8}
    for prediction, row in zip(predictions, expected, strict=True):
        assert prediction.model_version == served.version
        assert prediction.class_name == served.class_names[int(row.argmax())]
        torch.testing.assert_close(torch.tensor(prediction.probabilities), row, atol=1e-5, rtol=0)


async def check_poison_fails_alone(served: ServedModel) -> None:
    """A batch with a poison image is retried one by one: only that image fails."""
    images = images_for(served, 6)
    images[2] = torch.full(served.input_shape, 255, dtype=torch.uint8)
    async with ModelRunner(served, max_batch_size=6, max_wait_ms=500, concurrency=1) as runner:
        results = await asyncio.gather(
            *(runner.submit(image) for image in images), return_exceptions=True
        )
    assert isinstance(results[2], ModelError), results[2]
    assert all(isinstance(r, Prediction) for i, r in enumerate(results) if i != 2)


async def check_deadline_drops_before_compute(gated: Gated) -> None:
    """An image whose deadline passes while the model is busy fails with DeadlineExceeded."""
    model = gated.model
    first, second, third = images_for(model, 3)
    async with ModelRunner(model, max_batch_size=4, max_wait_ms=0, concurrency=1) as runner:
        busy = asyncio.ensure_future(runner.submit(first))
        await asyncio.wait_for(asyncio.to_thread(gated.entered.wait, 10), timeout=10)
        expiring = asyncio.ensure_future(runner.submit(second, deadline=time.time() + 0.05))
        fresh = asyncio.ensure_future(runner.submit(third, deadline=time.time() + 30))
        await asyncio.sleep(0.2)
        gated.gate.set()
        try:
            await expiring
        except DeadlineExceeded:
            pass
        else:
            raise AssertionError("the expired image was computed")
        assert (await fresh).model_version == model.version
        await busy
