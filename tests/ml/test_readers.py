"""The torch-free readers: Fashion-MNIST IDX files, their directory, and a checkpoint's header."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import pytest

from ml.checkpoint import read_checkpoint
from ml.data import load_fashion_mnist
from ml.readers import (
    IDX_IMAGES_MAGIC,
    IDX_LABELS_MAGIC,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    DataError,
    count_idx_items,
    fashion_mnist_test_files,
    read_checkpoint_metadata,
    read_idx,
)
from tests.ml.test_package import modules_loaded_after


@pytest.mark.data
def test_reading_the_test_set_and_a_checkpoint_header_imports_no_torch(
    fashion_mnist_dir: Path, shipped_checkpoint: Path
) -> None:
    """The test images, their labels and the shipped checkpoint's metadata are read without torch."""
    code = (
        "from ml.readers import *\n"
        f"images, labels = fashion_mnist_test_files({str(fashion_mnist_dir)!r})\n"
        "assert read_idx(images, 0x803).shape == (10000, 28, 28)\n"
        "assert read_idx(labels, 0x801).shape == (10000,)\n"
        f"assert len(read_checkpoint_metadata({str(shipped_checkpoint)!r})['class_names']) == 10"
    )
    assert "torch" not in modules_loaded_after(code)


@pytest.mark.data
def test_read_idx_gives_the_pixels_and_labels_the_torch_loader_gives(
    fashion_mnist_dir: Path,
) -> None:
    """`read_idx` and `load_fashion_mnist` agree on every test image and label."""
    images, labels = fashion_mnist_test_files(fashion_mnist_dir)
    test = load_fashion_mnist("test", fashion_mnist_dir)
    assert (read_idx(images, IDX_IMAGES_MAGIC) == test.images[:, 0].numpy()).all()
    assert (read_idx(labels, IDX_LABELS_MAGIC) == test.labels.numpy()).all()


@pytest.mark.data
def test_count_idx_items_reads_the_header_only(fashion_mnist_dir: Path) -> None:
    """The item count comes from the header: 10,000 test labels."""
    _, labels = fashion_mnist_test_files(fashion_mnist_dir)
    assert count_idx_items(labels) == 10_000


def test_an_explicit_directory_without_the_test_set_is_named_in_the_error(tmp_path: Path) -> None:
    """A directory lacking the test files is a DataError naming it and the apt-get command."""
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist") as info:
        fashion_mnist_test_files(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_an_idx_file_of_the_wrong_kind_is_rejected_by_its_magic(tmp_path: Path) -> None:
    """Labels asked for, an image file given: a DataError saying it is not an IDX label file."""
    path = tmp_path / "images.gz"
    path.write_bytes(gzip.compress(struct.pack(">IIII", IDX_IMAGES_MAGIC, 1, 1, 1) + b"\x00"))
    with pytest.raises(DataError, match="not an IDX label file"):
        read_idx(path, IDX_LABELS_MAGIC)


def test_the_header_metadata_is_what_the_full_read_verifies(shipped_checkpoint: Path) -> None:
    """`read_checkpoint_metadata` returns the metadata `read_checkpoint` returns with the weights."""
    _, metadata = read_checkpoint(shipped_checkpoint)
    assert read_checkpoint_metadata(shipped_checkpoint) == metadata


def test_a_missing_checkpoint_is_not_found(tmp_path: Path) -> None:
    """No file at the path: CheckpointNotFoundError with the command that makes one."""
    with pytest.raises(CheckpointNotFoundError, match="fmnist train"):
        read_checkpoint_metadata(tmp_path / "absent.safetensors")


def test_a_header_that_is_not_json_is_corrupt(tmp_path: Path) -> None:
    """A size field followed by bytes that are not JSON: CorruptCheckpointError."""
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", 4) + b"{{{{")
    with pytest.raises(CorruptCheckpointError, match="not valid JSON"):
        read_checkpoint_metadata(path)
