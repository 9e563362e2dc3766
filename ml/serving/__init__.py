"""Serving any model: `load_model(source, device=, precision=) -> ServedModel`, for the `ModelRunner`.

Three forms (`load_model`'s docstring): an `ImageClassifier` checkpoint, an exported program
(`torch.export` `.pt2` or TorchScript `.pt`) with a spec beside it (`ml.serving.spec`), and a Python
class implementing `ml.serving.protocol.ServableModel`. Each becomes a `ServedModel`, whose
`description` (`ModelDescription.to_json()`) is what a worker announces. On the CPU the whole pass
runs as an AOTInductor program where the form allows it (`ml.serving.compiled`).

Errors: `ModelLoadError` (a `ValueError`), with `ModelSpecError` under it; checkpoints raise the
`CheckpointError` tree of `ml.checkpoint`.
"""

from __future__ import annotations

from ml.serving.compiled import RUNTIMES, default_cache_dir
from ml.serving.device import DEVICES, PRECISIONS, native_bf16, resolve_device, resolve_precision
from ml.serving.loading import load_model, model_form
from ml.serving.protocol import ServableModel
from ml.serving.served import ServedModel, content_version
from ml.serving.spec import (
    RESIZE_POLICIES,
    ModelDescription,
    ModelLoadError,
    ModelSpec,
    ModelSpecError,
    Preprocessing,
    find_spec,
    read_spec,
)

__all__ = [
    "DEVICES",
    "PRECISIONS",
    "RESIZE_POLICIES",
    "RUNTIMES",
    "ModelDescription",
    "ModelLoadError",
    "ModelSpec",
    "ModelSpecError",
    "Preprocessing",
    "ServableModel",
    "ServedModel",
    "content_version",
    "default_cache_dir",
    "find_spec",
    "load_model",
    "model_form",
    "native_bf16",
    "read_spec",
    "resolve_device",
    "resolve_precision",
]
