"""Checkpoints: damaged, foreign and mismatched files are rejected with a CheckpointError, never executed."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ml import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    ImageClassifier,
    IncompatibleCheckpointError,
)
from ml.checkpoint import read_checkpoint, weights_version, write_checkpoint


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    """A small, valid checkpoint."""
    path = tmp_path / "model.safetensors"
    ImageClassifier(widths=(4, 8), convs_per_stage=(1, 1), device="cpu").save(path)
    return path


def test_a_valid_checkpoint_loads(saved: Path) -> None:
    """The fixture itself loads (so the rejections below are about the damage, not the file)."""
    assert ImageClassifier.load(saved, device="cpu").input_shape == (1, 28, 28)


def test_missing_file_is_a_not_found_error(tmp_path: Path) -> None:
    """No file: CheckpointNotFoundError, which is also a FileNotFoundError, with the train command."""
    with pytest.raises(CheckpointNotFoundError, match="fmnist train") as info:
        ImageClassifier.load(tmp_path / "absent.safetensors")
    assert isinstance(info.value, FileNotFoundError)


@pytest.mark.parametrize("keep", [0, 5, 100, -10])
def test_truncated_file_is_corrupt(saved: Path, keep: int) -> None:
    """A file cut short anywhere (header or tensor data) raises CorruptCheckpointError."""
    payload = saved.read_bytes()
    saved.write_bytes(payload[:keep])
    with pytest.raises(CorruptCheckpointError):
        ImageClassifier.load(saved)


def test_random_bytes_are_corrupt(saved: Path) -> None:
    """Garbage is rejected as corrupt."""
    saved.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(CorruptCheckpointError):
        ImageClassifier.load(saved)


def test_a_flipped_weight_byte_is_detected(saved: Path) -> None:
    """Changing one byte of tensor data breaks the recorded weights hash."""
    payload = bytearray(saved.read_bytes())
    payload[-3] ^= 0xFF
    saved.write_bytes(bytes(payload))
    with pytest.raises(CorruptCheckpointError, match="hash"):
        ImageClassifier.load(saved)


def test_foreign_safetensors_file_is_incompatible(tmp_path: Path) -> None:
    """A valid safetensors file without our metadata is IncompatibleCheckpointError."""
    path = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(3)}, str(path))
    with pytest.raises(IncompatibleCheckpointError, match="not an fmnist-service classifier"):
        ImageClassifier.load(path)


def test_newer_format_version_is_incompatible(saved: Path) -> None:
    """A format version this code does not know says to upgrade."""
    payload = saved.read_bytes()
    (size,) = struct.unpack("<Q", payload[:8])
    header = payload[8 : 8 + size]
    assert b'"format_version":"1"' in header
    edited = header.replace(b'"format_version":"1"', b'"format_version":"9"')
    saved.write_bytes(payload[:8] + edited + payload[8 + size :])
    with pytest.raises(IncompatibleCheckpointError, match="Upgrade"):
        ImageClassifier.load(saved)


def test_weights_that_do_not_fit_the_recorded_architecture_are_incompatible(tmp_path: Path) -> None:
    """Tensors of one architecture under another's metadata: IncompatibleCheckpointError, not a crash."""
    small = ImageClassifier(widths=(4, 8), convs_per_stage=(1, 1), device="cpu")
    other = ImageClassifier(widths=(6, 8), convs_per_stage=(1, 1), device="cpu")
    tensors = small.network.state_dict()
    metadata = {**other.metadata(), "version": weights_version(tensors)}
    path = tmp_path / "mismatch.safetensors"
    write_checkpoint(path, tensors, metadata)
    with pytest.raises(IncompatibleCheckpointError, match="do not fit"):
        ImageClassifier.load(path)


def test_a_pickle_is_rejected_without_running_it(tmp_path: Path) -> None:
    """A torch.save/pickle file posing as a checkpoint is refused and its payload never runs."""
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (Path.touch, (str(marker),))  # type: ignore[return-value]

    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(CheckpointError):
        ImageClassifier.load(path)
    assert not marker.exists()


def test_read_checkpoint_returns_metadata_with_version(saved: Path) -> None:
    """The metadata carries architecture, class names, normalisation and a matching version."""
    tensors, metadata = read_checkpoint(saved)
    assert metadata["version"] == weights_version(tensors)
    assert {"architecture", "class_names", "normalization", "input_shape", "seed"} <= set(metadata)
