"""app/worker/inference.py: the worker's precision choice and inference layout."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from app.settings import Settings
from app.worker import inference


@pytest.mark.parametrize(
    ("capabilities", "expected"),
    [
        ({"avx512_bf16": True}, True),
        ({"amx_tile": True}, True),
        ({"avx2": True}, False),
        ({}, False),
    ],
)
def test_native_bf16_reads_torch_public_cpu_capabilities(
    monkeypatch: pytest.MonkeyPatch, capabilities: dict[str, bool], expected: bool
) -> None:
    """native_bf16 is true exactly when torch reports AVX512-BF16 or AMX tiles."""
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    assert inference.native_bf16() is expected


def test_native_bf16_falls_back_to_the_private_probes_on_older_torch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without get_capabilities, the private torch.cpu probes decide."""
    monkeypatch.delattr(torch.cpu, "get_capabilities")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert inference.native_bf16() is True


def test_worker_layout_takes_the_settings_and_otherwise_the_cores(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Explicit concurrency and threads win; by default one pass per core on CPU, one on a GPU."""
    monkeypatch.setattr(inference, "usable_cores", lambda: 4)
    cpu, gpu = SimpleNamespace(device="cpu"), SimpleNamespace(device="cuda:0")
    assert inference.worker_layout(Settings(), cpu) == (4, 1)  # type: ignore[arg-type]
    assert inference.worker_layout(Settings(), gpu) == (1, 4)  # type: ignore[arg-type]
    explicit = Settings(inference_concurrency=2, inference_threads=3)
    assert inference.worker_layout(explicit, cpu) == (2, 3)  # type: ignore[arg-type]
