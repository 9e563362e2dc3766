"""Fashion-MNIST loading: the real files, directory resolution, the seeded split, corrupt-file errors."""

from __future__ import annotations

import gzip
import shutil
import struct
from pathlib import Path

import pytest
import torch

from ml.data import (
    CLASS_NAMES,
    DataError,
    fashion_mnist_splits,
    find_data_dir,
    load_fashion_mnist,
    read_idx_images,
    read_idx_labels,
    split_train_val,
)

FILE_NAMES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


@pytest.mark.data
def test_real_test_set_has_10k_uint8_images_and_known_labels(fashion_mnist_dir: Path) -> None:
    """The 10k test images load as uint8 1×28×28 with labels 0..9 and ten class names."""
    test = load_fashion_mnist("test", fashion_mnist_dir)
    assert test.images.shape == (10_000, 1, 28, 28)
    assert test.images.dtype == torch.uint8
    assert set(test.labels.unique().tolist()) == set(range(10))
    assert test.class_names == list(CLASS_NAMES)
    image, label = test[0]
    assert image.shape == (1, 28, 28) and image.dtype == torch.uint8
    assert isinstance(label, int)


@pytest.mark.data
def test_split_is_seeded_disjoint_and_sized(fashion_mnist_dir: Path) -> None:
    """The validation split has val_size images, never overlaps train, and a seed reproduces it."""
    splits = fashion_mnist_splits(fashion_mnist_dir, val_size=5_000, seed=3)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (55_000, 5_000, 10_000)
    again = fashion_mnist_splits(fashion_mnist_dir, val_size=5_000, seed=3)
    assert torch.equal(splits.val.images, again.val.images)
    other = fashion_mnist_splits(fashion_mnist_dir, val_size=5_000, seed=4)
    assert not torch.equal(splits.val.images, other.val.images)
    val_rows = {bytes(row) for row in splits.val.images[:500].flatten(1).numpy()}
    train_rows = {bytes(row) for row in splits.train.images.flatten(1).numpy()}
    # Fashion-MNIST has a handful of duplicate images; a real overlap would share hundreds.
    assert len(val_rows & train_rows) < 5


def test_split_of_a_small_set_keeps_every_item_once() -> None:
    """train + val is a permutation of the input: nothing lost, nothing duplicated."""
    from ml.data import TensorImageDataset

    images = torch.arange(20, dtype=torch.uint8).view(20, 1, 1, 1).expand(20, 1, 2, 2).clone()
    dataset = TensorImageDataset(images, torch.arange(20) % 2, ["a", "b"])
    train, val = split_train_val(dataset, val_size=5, seed=0)
    seen = sorted(train.images[:, 0, 0, 0].tolist() + val.images[:, 0, 0, 0].tolist())
    assert seen == list(range(20)) and len(val) == 5


def test_missing_files_error_says_where_it_looked_and_how_to_get_them(tmp_path: Path) -> None:
    """An explicit directory without the files names that directory and the apt-get command."""
    with pytest.raises(DataError) as info:
        find_data_dir(tmp_path)
    assert str(tmp_path) in str(info.value)
    assert "apt-get install dataset-fashion-mnist" in str(info.value)
    assert "FMNIST_DATA_DIR" in str(info.value)


@pytest.mark.data
def test_env_var_directory_is_used(
    fashion_mnist_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FMNIST_DATA_DIR is searched before the Debian package directory."""
    for name in FILE_NAMES:
        (tmp_path / name).symlink_to(fashion_mnist_dir / name)
    monkeypatch.setenv("FMNIST_DATA_DIR", str(tmp_path))
    assert find_data_dir() == tmp_path


def test_corrupt_gzip_is_reported_as_corrupt(tmp_path: Path) -> None:
    """Bytes that are not gzip give a DataError naming the file and how to re-get the data."""
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(b"this is not gzip at all")
    with pytest.raises(DataError, match="corrupt or truncated") as info:
        read_idx_images(path)
    assert str(path) in str(info.value)


def test_truncated_image_file_is_reported(tmp_path: Path) -> None:
    """A header promising more pixels than the file holds is a DataError, not a reshape crash."""
    path = tmp_path / "images.gz"
    path.write_bytes(gzip.compress(struct.pack(">IIII", 0x803, 10, 28, 28) + bytes(28 * 28 * 3)))
    with pytest.raises(DataError, match="header promises"):
        read_idx_images(path)


def test_label_file_with_wrong_magic_is_rejected(tmp_path: Path) -> None:
    """An image file passed as labels is recognised by its magic number."""
    path = tmp_path / "labels.gz"
    path.write_bytes(gzip.compress(struct.pack(">IIII", 0x803, 1, 1, 1) + b"\x00"))
    with pytest.raises(DataError, match="not an IDX label file"):
        read_idx_labels(path, num_classes=10)


@pytest.mark.data
def test_a_corrupted_copy_of_the_real_files_fails_loudly(
    fashion_mnist_dir: Path, tmp_path: Path
) -> None:
    """Cutting the real test-label file short gives a DataError from load_fashion_mnist."""
    for name in FILE_NAMES:
        shutil.copy(fashion_mnist_dir / name, tmp_path / name)
    damaged = tmp_path / "t10k-labels-idx1-ubyte.gz"
    damaged.write_bytes(damaged.read_bytes()[:-100])
    with pytest.raises(DataError, match="t10k-labels"):
        load_fashion_mnist("test", tmp_path)


@pytest.mark.data
def test_subset_limits_the_training_images_and_leaves_the_test_set_whole(
    fashion_mnist_dir: Path,
) -> None:
    """subset=N: N training images in all (a tenth of them for validation), the 10k test set untouched."""
    splits = fashion_mnist_splits(fashion_mnist_dir, val_size=5_000, seed=0, subset=3_000)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (2_700, 300, 10_000)


@pytest.mark.data
def test_subset_is_a_seeded_sample_of_every_class(fashion_mnist_dir: Path) -> None:
    """A subset is drawn at random by the seed, so every class is in it and the seed reproduces it."""
    splits = fashion_mnist_splits(fashion_mnist_dir, seed=1, subset=1_000)
    again = fashion_mnist_splits(fashion_mnist_dir, seed=1, subset=1_000)
    assert torch.equal(splits.train.images, again.train.images)
    assert set(splits.train.labels.tolist()) == set(range(10))
