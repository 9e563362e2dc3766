"""The checkpoint file: safetensors weights plus JSON metadata, written atomically, read without pickle.

Errors, all subclasses of `CheckpointError`:

    CheckpointError
    ├── CheckpointNotFoundError      no file at that path
    ├── CorruptCheckpointError       unreadable, truncated, or weights that do not match their hash
    └── IncompatibleCheckpointError  a valid file, but not an fmnist-service classifier this code can load
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from ml.readers import (
    FORMAT,
    FORMAT_VERSION,
    METADATA_KEY,
    RETRAIN_HINT,
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    checkpoint_metadata,
    existing_checkpoint,
    parse_safetensors_header,
)

__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "CorruptCheckpointError",
    "IncompatibleCheckpointError",
    "read_checkpoint",
    "weights_version",
    "write_checkpoint",
]


def weights_version(tensors: dict[str, torch.Tensor]) -> str:
    """Short stable id of the weights: first 12 hex chars of sha256 over names, dtypes, shapes and bytes."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:12]


def write_checkpoint(
    path: str | os.PathLike[str], tensors: dict[str, torch.Tensor], metadata: dict[str, Any]
) -> None:
    """Write weights and metadata to `path` atomically (a reader never sees a half-written file)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    cpu_tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    header = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        METADATA_KEY: json.dumps(metadata, sort_keys=True),
    }
    payload = save_safetensors(cpu_tensors, metadata=header)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        temporary.write_bytes(payload)
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


def read_checkpoint(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read and verify a checkpoint: returns `(tensors, metadata)`; raises a `CheckpointError` subclass."""
    source = existing_checkpoint(path)
    payload = source.read_bytes()
    header = parse_safetensors_header(source, io.BytesIO(payload), len(payload))
    metadata = checkpoint_metadata(source, header)
    try:
        tensors = load_safetensors(payload)
    except Exception as exc:  # safetensors raises its own SafetensorError and plain ValueErrors
        raise CorruptCheckpointError(
            f"{source}: the weights cannot be read ({exc}); {RETRAIN_HINT}"
        ) from exc
    recorded = metadata.get("version")
    actual = weights_version(tensors)
    if recorded != actual:
        raise CorruptCheckpointError(
            f"{source}: the weights hash to {actual} but the file records version {recorded!r}; "
            f"the file was modified or damaged; {RETRAIN_HINT}"
        )
    return tensors, metadata
