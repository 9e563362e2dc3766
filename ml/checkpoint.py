"""The checkpoint file: safetensors weights plus JSON metadata, written atomically, read without pickle.

Errors, all subclasses of `CheckpointError`:

    CheckpointError
    ├── CheckpointNotFoundError      no file at that path
    ├── CorruptCheckpointError       unreadable, truncated, or weights that do not match their hash
    └── IncompatibleCheckpointError  a valid file, but not an fmnist-service classifier this code can load
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

FORMAT = "fmnist-service/image-classifier"
FORMAT_VERSION = 1
METADATA_KEY = "fmnist"
# A safetensors header is JSON; anything bigger than this is not one of ours and is not parsed.
MAX_HEADER_BYTES = 16 * 1024 * 1024


class CheckpointError(RuntimeError):
    """A checkpoint could not be loaded; the message says which file and what to do."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No checkpoint at the given path."""


class CorruptCheckpointError(CheckpointError):
    """The file is damaged: not parseable, truncated, or its weights differ from the recorded hash."""


class IncompatibleCheckpointError(CheckpointError):
    """The file is intact but is not a classifier checkpoint this version can load."""


RETRAIN_HINT = (
    "retrain with `fmnist train --out PATH` or restore the file from the repository (models/)"
)


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


def _read_header(path: Path, payload: bytes) -> dict[str, Any]:
    if len(payload) < 8:
        raise CorruptCheckpointError(
            f"{path} is {len(payload)} bytes, too short to be a safetensors file; {RETRAIN_HINT}"
        )
    (header_size,) = struct.unpack("<Q", payload[:8])
    if header_size > MAX_HEADER_BYTES or 8 + header_size > len(payload):
        raise CorruptCheckpointError(
            f"{path}: header claims {header_size} bytes but the file has {len(payload) - 8} after the "
            f"size field; the file is truncated or not a safetensors file; {RETRAIN_HINT}"
        )
    try:
        header = json.loads(payload[8 : 8 + header_size])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptCheckpointError(
            f"{path}: the safetensors header is not valid JSON ({exc}); {RETRAIN_HINT}"
        ) from exc
    if not isinstance(header, dict):
        raise CorruptCheckpointError(
            f"{path}: the safetensors header is not a JSON object; {RETRAIN_HINT}"
        )
    return header


def read_checkpoint(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read and verify a checkpoint: returns `(tensors, metadata)`; raises a `CheckpointError` subclass."""
    source = Path(path)
    if not source.is_file():
        raise CheckpointNotFoundError(
            f"no checkpoint at {source} (set FMNIST_MODEL_PATH, or train one with `fmnist train --out {source}`)"
        )
    payload = source.read_bytes()
    header = _read_header(source, payload)
    file_metadata = header.get("__metadata__") or {}
    if not isinstance(file_metadata, dict) or file_metadata.get("format") != FORMAT:
        raise IncompatibleCheckpointError(
            f"{source} is a safetensors file but not an fmnist-service classifier checkpoint "
            f"(metadata 'format' is {file_metadata.get('format') if isinstance(file_metadata, dict) else None!r}, "
            f"expected {FORMAT!r}); {RETRAIN_HINT}"
        )
    try:
        format_version = int(file_metadata.get("format_version", ""))
    except ValueError:
        format_version = -1
    if format_version != FORMAT_VERSION:
        raise IncompatibleCheckpointError(
            f"{source} has checkpoint format version {file_metadata.get('format_version')!r}; this "
            f"fmnist-service reads version {FORMAT_VERSION}. Upgrade fmnist-service or retrain."
        )
    try:
        metadata = json.loads(file_metadata[METADATA_KEY])
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise CorruptCheckpointError(
            f"{source}: classifier metadata missing or not JSON ({exc}); {RETRAIN_HINT}"
        ) from exc
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
