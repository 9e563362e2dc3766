"""Small real torch classifiers for runner, worker and model tests, plus fault-injecting variants."""

from __future__ import annotations

import threading
import time

import torch

from ml import ImageClassifier

CLASS_NAMES = [f"class{i}" for i in range(10)]


def small_classifier(**kwargs: object) -> ImageClassifier:
    """An `ImageClassifier` of two narrow stages on the CPU (fast to build, train and compile);
    `kwargs` set or override its other options."""
    options: dict[str, object] = {"widths": (8, 16), "convs_per_stage": (1, 1), "device": "cpu"}
    options.update(kwargs)
    return ImageClassifier(**options)  # type: ignore[arg-type]


class TinyClassifier:
    """A seeded linear softmax classifier on 1×28×28 uint8 images (the `BatchPredictor` shape)."""

    class_names = CLASS_NAMES
    input_shape = (1, 28, 28)
    version = "tiny00000000"

    def __init__(self, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(784, 10, generator=generator) * 0.1
        self.calls: list[int] = []  # batch size of every predict call, in order
        self.call_windows: list[tuple[float, float]] = []  # (start, end) monotonic seconds
        self._active = 0
        self.max_concurrent = 0
        self._lock = threading.Lock()

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        with self._lock:
            self._active += 1
            self.max_concurrent = max(self.max_concurrent, self._active)
        started = time.monotonic()
        try:
            self.before_forward(images)
            logits = images.reshape(len(images), -1).float().div(255.0) @ self.weight
            return logits.softmax(dim=1)
        finally:
            with self._lock:
                self._active -= 1
                self.calls.append(len(images))
                self.call_windows.append((started, time.monotonic()))

    def before_forward(self, images: torch.Tensor) -> None:
        """Hook for fault-injecting subclasses."""


class GatedClassifier(TinyClassifier):
    """Blocks every forward pass until `release()`; `entered` is set when one is waiting."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self._gate = threading.Event()

    def before_forward(self, images: torch.Tensor) -> None:
        self.entered.set()
        if not self._gate.wait(timeout=10):
            raise TimeoutError("test gate never released")

    def release(self) -> None:
        self._gate.set()


class PoisonClassifier(TinyClassifier):
    """Fails any batch that contains an image whose first pixel is 255 (the 'poison' image)."""

    def before_forward(self, images: torch.Tensor) -> None:
        if bool((images[:, 0, 0, 0] == 255).any()):
            raise RuntimeError("poison pixel")


class WrongRowsClassifier(TinyClassifier):
    """Returns one row too few: breaks the one-output-per-input contract."""

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return super().predict(images)[:-1]


def image(value: int = 0, seed: int | None = None) -> torch.Tensor:
    """A 1×28×28 uint8 image: random when `seed` is given, else filled with `value`."""
    if seed is None:
        return torch.full((1, 28, 28), value, dtype=torch.uint8)
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 255, (1, 28, 28), dtype=torch.uint8, generator=generator)
