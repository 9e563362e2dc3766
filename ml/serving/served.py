"""`ServedModel`: one loaded model of any form, as the `ModelRunner` drives it and as the worker announces it."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch

from ml.serving.spec import ModelDescription, Preprocessing

__all__ = ["ServedModel", "content_version"]

# uint8 N×C×H×W on the CPU → N×K probabilities (any float dtype, any device).
Forward = Callable[[torch.Tensor], torch.Tensor]


def content_version(*parts: bytes | str) -> str:
    """First 12 hex chars of the sha256 over `parts`: the same content gives the same version."""
    digest = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()[:12]


class ServedModel:
    """A model ready to serve: `predict` for the `ModelRunner` (it satisfies `ml.BatchPredictor`), and
    `description` for the worker's announcement. Made by `ml.serving.load_model`."""

    def __init__(self, description: ModelDescription, forward: Forward) -> None:
        self.description = description
        self._forward = forward

    @property
    def name(self) -> str:
        return self.description.name

    @property
    def version(self) -> str:
        return self.description.version

    @property
    def tag(self) -> str | None:
        return self.description.tag

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.description.class_names

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.description.input_shape

    @property
    def preprocessing(self) -> Preprocessing:
        return self.description.preprocessing

    @property
    def device(self) -> torch.device:
        return torch.device(self.description.device)

    @property
    def precision(self) -> str:
        return self.description.precision

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 N×C×H×W images → float32 N×K class probabilities on the CPU."""
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if images.ndim != 4 or tuple(images.shape[1:]) != self.input_shape:
            c, h, w = self.input_shape
            raise ValueError(f"images must be N×{c}×{h}×{w}, got shape {tuple(images.shape)}")
        if images.dtype != torch.uint8:
            raise ValueError(f"images must be uint8 (0..255), got {images.dtype}")
        with torch.inference_mode():
            probabilities = self._forward(images)
        if probabilities.dtype is not torch.float32 or probabilities.device.type != "cpu":
            probabilities = probabilities.detach().to("cpu", torch.float32)
        return probabilities

    def __repr__(self) -> str:
        d = self.description
        return (
            f"ServedModel(name={d.name!r}, version={d.version!r}, form={d.form!r}, "
            f"input_shape={d.input_shape}, device={d.device!r}, precision={d.precision!r})"
        )
