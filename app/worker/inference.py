"""How a worker runs the model: which checkpoint, which precision, and how passes share the cores.

The only module of `app.worker` besides `consumer` that imports torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from app.settings import Settings
from ml.layout import InferenceLayout, inference_layout, usable_cores

if TYPE_CHECKING:
    from ml.runner import BatchPredictor

__all__ = ["load_classifier", "native_bf16", "resolve_precision", "worker_layout"]

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
