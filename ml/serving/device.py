"""Where a served model runs (`auto`, `cpu`, `cuda`, `cuda:N`) and in which arithmetic (`fp32`, `bf16`, `auto`)."""

from __future__ import annotations

import torch

__all__ = ["DEVICES", "PRECISIONS", "native_bf16", "resolve_device", "resolve_precision"]

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")


def resolve_device(choice: str | torch.device) -> torch.device:
    """`auto` is CUDA when torch sees a GPU, else the CPU; `cuda` (or `cuda:N`) without a usable GPU
    is a `ValueError` that says so, rather than a model silently served on the CPU."""
    if isinstance(choice, torch.device):
        choice = str(choice)
    text = choice.strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "cuda" or text.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {choice!r} asked for, but torch {torch.__version__} sees no usable GPU "
                "(a CPU-only torch build, no driver, or CUDA_VISIBLE_DEVICES hides it); "
                "use device 'auto' or 'cpu'"
            )
        device = torch.device(text)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {choice!r} asked for, but only {torch.cuda.device_count()} GPU(s) are visible"
            )
        return device
    raise ValueError(f"device must be one of {DEVICES} or 'cuda:N', got {choice!r}")


def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX)."""
    cpu = torch.cpu
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def resolve_precision(choice: str, device: torch.device) -> str:
    """`auto` is bf16 on a CPU with native bfloat16 (as OpenVINO's CPU plugin chooses by default) and
    fp32 elsewhere, GPUs included; `fp32` and `bf16` are taken as asked."""
    if choice not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {choice!r}")
    if choice != "auto":
        return choice
    return "bf16" if device.type == "cpu" and native_bf16() else "fp32"
