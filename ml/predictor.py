"""What `ModelRunner` needs from a model (`BatchPredictor`), and one forward pass over a batch."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from ml.runner_errors import ModelError

__all__ = ["BatchPredictor", "ForwardResult", "forward_pass"]


@runtime_checkable
class BatchPredictor(Protocol):
    """What the runner needs from a model; `ml.ImageClassifier` satisfies it."""

    @property
    def class_names(self) -> Sequence[str]: ...

    @property
    def input_shape(self) -> tuple[int, int, int]: ...

    @property
    def version(self) -> str: ...

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 N×C×H×W → float32 N×K class probabilities."""
        ...


# What one forward pass returns to the loop: labels, probability rows, milliseconds it took.
ForwardResult = tuple[list[int], list[list[float]], float]


def forward_pass(
    classifier: BatchPredictor, num_classes: int, images: list[torch.Tensor | np.ndarray]
) -> ForwardResult:
    """One forward pass over `images`, converted to Python lists (in the executor thread, off the
    event loop); a `ModelError` unless the model returns one row per image, one column per class."""
    started = time.perf_counter()
    if all(type(image) is np.ndarray for image in images):
        # Arrays (a worker's zero-copy views of message payloads) stack in numpy: no torch call,
        # so no GIL hand-off, per image.
        batch = torch.from_numpy(np.stack(images))
    else:
        batch = torch.stack(
            [
                torch.as_tensor(np.array(image)) if isinstance(image, np.ndarray) else image
                for image in images
            ]
        )
    with torch.inference_mode():
        probabilities = classifier.predict(batch)
    expected = (len(images), num_classes)
    if tuple(probabilities.shape) != expected:
        raise ModelError(
            f"model returned probabilities of shape {tuple(probabilities.shape)} for "
            f"{len(images)} images; expected {expected} (one row per image, one column per class)"
        )
    if probabilities.dtype is not torch.float32 or probabilities.device.type != "cpu":
        probabilities = probabilities.detach().to("cpu", torch.float32)
    # Every torch call releases and retakes the GIL, and retaking it waits while the event loop
    # runs Python: the labels come from the Python rows instead of a torch argmax.
    rows = probabilities.tolist()
    labels = [row.index(max(row)) for row in rows]
    inference_ms = (time.perf_counter() - started) * 1000.0
    return labels, rows, inference_ms
