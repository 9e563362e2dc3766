"""How a worker runs the model: which checkpoint, which precision, and how passes share the cores.

The only module of `app.worker` besides `consumer` that imports torch.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from app.protocol import ModelAnnouncement, check_model_name
from app.settings import Settings
from ml.layout import InferenceLayout, inference_layout, usable_cores

if TYPE_CHECKING:
    from ml.runner import BatchPredictor, ModelRunner

__all__ = [
    "announcement_of",
    "load_classifier",
    "load_served_model",
    "native_bf16",
    "resolve_precision",
    "start_runner",
    "worker_layout",
]

# CPU features that compute bfloat16 in hardware (AVX512-BF16, AMX tiles).
_BF16_FEATURES = ("avx512_bf16", "amx_tile")


def worker_layout(settings: Settings, classifier: BatchPredictor) -> InferenceLayout:
    """`FMNIST_INFERENCE_CONCURRENCY` and `FMNIST_INFERENCE_THREADS`, or `ml.layout`'s default for
    this process's cores (one pass per core on CPU, one pass on a GPU)."""
    return inference_layout(
        usable_cores(),
        on_gpu=str(getattr(classifier, "device", "cpu")) != "cpu",
        concurrency=settings.inference_concurrency,
        threads=settings.inference_threads,
    )


async def start_runner(
    settings: Settings, classifier: BatchPredictor, *, owns_model: bool
) -> ModelRunner:
    """A started `ModelRunner` for `classifier` with the worker's batching settings and layout."""
    from ml.runner import ModelRunner

    layout = worker_layout(settings, classifier)
    if owns_model:  # this worker loaded the process's model, so it sets torch's thread count
        torch.set_num_threads(layout.threads)
    runner = ModelRunner(
        classifier,
        max_batch_size=settings.max_batch_size,
        max_wait_ms=settings.batch_fill_wait_ms,
        max_queue=max(settings.max_queued_images, settings.max_batch_size),
        concurrency=layout.concurrency,
        preferred_batch_size=min(settings.preferred_batch_size, settings.max_batch_size),
        fill_when_idle=settings.batch_fill_when_idle,
    )
    await runner.start()
    return runner


def _cpu_capabilities() -> Mapping[str, Any]:
    """The CPU features torch detected. `torch.cpu.get_capabilities()` is public in recent torch;
    older releases the project allows only have the private `torch.cpu._is_*_supported` probes."""
    get_capabilities = getattr(torch.cpu, "get_capabilities", None)
    if get_capabilities is not None:
        capabilities: Mapping[str, Any] = get_capabilities()
        return capabilities
    private_probes = {
        "avx512_bf16": "_is_avx512_bf16_supported",
        "amx_tile": "_is_amx_tile_supported",
    }
    return {
        feature: bool(getattr(torch.cpu, probe, lambda: False)())
        for feature, probe in private_probes.items()
    }


def native_bf16() -> bool:
    """This CPU computes bfloat16 in hardware (AVX512-BF16 or AMX), so bf16 inference pays off."""
    capabilities = _cpu_capabilities()
    return any(bool(capabilities.get(feature, False)) for feature in _BF16_FEATURES)


def resolve_precision(choice: str) -> str:
    """`FMNIST_INFERENCE_PRECISION` made concrete: `auto` is bf16 on a CPU-only machine whose CPU has
    native bfloat16 (as OpenVINO's CPU plugin chooses by default), fp32 elsewhere (GPUs included)."""
    if choice != "auto":
        return choice
    return "bf16" if native_bf16() and not torch.cuda.is_available() else "fp32"


def load_classifier(settings: Settings) -> BatchPredictor:
    """Load the checkpoint the worker serves, `settings.model_path` (blocking: call it in a thread)."""
    from ml import ImageClassifier

    classifier: BatchPredictor = ImageClassifier.load(
        settings.model_path, precision=resolve_precision(settings.inference_precision)
    )
    return classifier


def load_served_model(settings: Settings, source: str, name: str | None = None) -> BatchPredictor:
    """Load `source` (a checkpoint, an exported program with its spec, or `package.module:Class`) with
    `ml.serving.load_model` on `FMNIST_DEVICE` in `FMNIST_INFERENCE_PRECISION` (blocking: call it in a thread)."""
    from ml.serving import load_model

    served: BatchPredictor = load_model(
        source, device=settings.device, precision=settings.inference_precision, name=name
    )
    return served


def announcement_of(
    model: BatchPredictor, settings: Settings, worker_id: str, *, name: str | None = None
) -> ModelAnnouncement:
    """What the worker announces for `model`: its `ml.serving` description, or, for a bare predictor
    (an `ImageClassifier`), what its attributes say (named after `FMNIST_MODEL_PATH`'s stem)."""
    description = getattr(model, "description", None)
    if description is not None:
        data = description.to_json()
        return ModelAnnouncement(
            worker_id=worker_id,
            name=check_model_name(name or data["name"]),
            version=data["version"],
            tag=data.get("tag"),
            input_shape=tuple(data["input_shape"]),
            dtype=data.get("input_dtype", "uint8"),
            class_names=tuple(data["class_names"]),
            preprocessing=data["preprocessing"],
            precision=data["precision"],
            device=data["device"],
            sent_at=time.time(),
            heartbeat_s=settings.heartbeat_interval_s,
        )
    shape = tuple(getattr(model, "input_shape", (1, 28, 28)))
    return ModelAnnouncement(
        worker_id=worker_id,
        name=check_model_name(name or Path(settings.model_path).stem.split(".")[0]),
        version=str(model.version),
        input_shape=(int(shape[0]), int(shape[1]), int(shape[2])),
        class_names=tuple(str(c) for c in model.class_names),
        preprocessing={"channels": int(shape[0]), "auto_invert": int(shape[0]) == 1},
        precision=str(getattr(model, "precision", "")),
        device=str(getattr(model, "device", "cpu")),
        sent_at=time.time(),
        heartbeat_s=settings.heartbeat_interval_s,
    )
