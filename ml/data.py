"""Fashion-MNIST from its four IDX `.gz` files: locating them, parsing them, a seeded train/val split."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ml import readers
from ml.readers import (
    CLASS_NAMES,
    EXPECTED_COUNTS,
    FILES,
    HOW_TO_GET,
    IDX_IMAGES_MAGIC,
    IDX_LABELS_MAGIC,
    DataError,
    has_files,
    read_idx,
)

__all__ = [
    "CLASS_NAMES",
    "DataError",
    "FashionMNISTSplits",
    "TensorImageDataset",
    "fashion_mnist_splits",
    "find_data_dir",
    "load_fashion_mnist",
    "read_idx_images",
    "read_idx_labels",
    "split_train_val",
]

logger = logging.getLogger(__name__)

TORCHVISION_CACHE = Path.home() / ".cache" / "fmnist-service" / "torchvision"


class TensorImageDataset(Dataset[tuple[torch.Tensor, int]]):
    """Images (uint8 N×C×H×W) and integer labels held in memory; yields `(C×H×W uint8 tensor, label)`."""

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str]
    ) -> None:
        if images.ndim != 4:
            raise ValueError(f"images must be N×C×H×W, got shape {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(
                f"need one label per image: {images.shape[0]} images, labels shape {tuple(labels.shape)}"
            )
        self.images = images
        self.labels = labels.long()
        self.class_names = list(class_names)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])

    def subset(self, indices: torch.Tensor) -> TensorImageDataset:
        """A new dataset holding only `indices` (a copy, so the parent can be freed)."""
        return TensorImageDataset(
            self.images[indices].clone(), self.labels[indices].clone(), self.class_names
        )


@dataclass(frozen=True)
class FashionMNISTSplits:
    """The seeded train/validation split of the 60k training images, and the separate 10k test set."""

    train: TensorImageDataset
    val: TensorImageDataset
    test: TensorImageDataset
    data_dir: Path


def _download_with_torchvision() -> Path | None:
    """Fetch the files with torchvision when it is installed (it is optional); None when unavailable."""
    try:
        from torchvision.datasets import FashionMNIST
    except ImportError:
        return None
    logger.info("event=data_download source=torchvision root=%s", TORCHVISION_CACHE)
    try:
        FashionMNIST(root=str(TORCHVISION_CACHE), train=True, download=True)
        FashionMNIST(root=str(TORCHVISION_CACHE), train=False, download=True)
    except Exception as exc:  # network errors come in many types; all mean "not available"
        logger.warning("event=data_download_failed error=%r", str(exc))
        return None
    raw = TORCHVISION_CACHE / "FashionMNIST" / "raw"
    return raw if has_files(raw) else None


def find_data_dir(data_dir: str | os.PathLike[str] | None = None, *, download: bool = True) -> Path:
    """`ml.readers.find_data_dir`, falling back to a torchvision download when no location has the
    files and the caller named no directory (`download=False` forbids it)."""
    try:
        return readers.find_data_dir(data_dir)
    except DataError:
        if data_dir is None and download:
            downloaded = _download_with_torchvision()
            if downloaded is not None:
                return downloaded
        raise


def read_idx_images(path: Path) -> torch.Tensor:
    """Parse an IDX3 image file into a uint8 N×1×H×W tensor."""
    pixels = read_idx(path, IDX_IMAGES_MAGIC)
    count, rows, cols = pixels.shape
    return torch.from_numpy(pixels.reshape(count, 1, rows, cols).copy())


def read_idx_labels(path: Path, num_classes: int) -> torch.Tensor:
    """Parse an IDX1 label file into an int64 tensor, checking every label is a known class."""
    labels = torch.from_numpy(read_idx(path, IDX_LABELS_MAGIC).astype(np.int64))
    if labels.numel() and int(labels.max()) >= num_classes:
        raise DataError(
            f"{path} has label {int(labels.max())}, outside 0..{num_classes - 1}. To fix: {HOW_TO_GET}."
        )
    return labels


def load_fashion_mnist(
    part: str, data_dir: str | os.PathLike[str] | None = None
) -> TensorImageDataset:
    """The 60k training images (`part="train"`) or the 10k test images (`part="test"`)."""
    if part not in FILES:
        raise ValueError(f"part must be one of {sorted(FILES)}, got {part!r}")
    directory = find_data_dir(data_dir)
    images_name, labels_name = FILES[part]
    images = read_idx_images(directory / images_name)
    labels = read_idx_labels(directory / labels_name, len(CLASS_NAMES))
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{directory}: {images.shape[0]} images but {labels.shape[0]} labels in the {part} set. "
            f"To fix: {HOW_TO_GET}."
        )
    if images.shape[0] != EXPECTED_COUNTS[part]:
        logger.warning(
            "event=data_unexpected_count part=%s count=%d expected=%d",
            part,
            images.shape[0],
            EXPECTED_COUNTS[part],
        )
    return TensorImageDataset(images, labels, CLASS_NAMES)


def split_train_val(
    dataset: TensorImageDataset, val_size: int, seed: int
) -> tuple[TensorImageDataset, TensorImageDataset]:
    """Carve a seeded validation set of `val_size` images out of `dataset`; the same seed gives the same split."""
    if not 0 <= val_size < len(dataset):
        raise ValueError(f"val_size must be in 0..{len(dataset) - 1}, got {val_size}")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(dataset), generator=generator)
    return dataset.subset(order[val_size:]), dataset.subset(order[:val_size])


def fashion_mnist_splits(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    val_size: int = 5_000,
    seed: int = 0,
    subset: int | None = None,
) -> FashionMNISTSplits:
    """Train/val split of the training set (seeded) plus the whole test set.

    `subset` keeps only that many of the 60k training images (a seeded random choice) for quick runs;
    the validation split is carved out of them, at most a tenth of them (`val_size` otherwise), and
    the 10k test set is untouched, so the test accuracy of a quick run compares with a full one."""
    directory = find_data_dir(data_dir)
    train = load_fashion_mnist("train", directory)
    if subset is not None:
        if subset < 2:
            raise ValueError(f"subset must be at least 2 training images, got {subset}")
        if subset < len(train):
            generator = torch.Generator().manual_seed(seed)
            train = train.subset(torch.randperm(len(train), generator=generator)[:subset])
        val_size = min(val_size, len(train) // 10)
    train, val = split_train_val(train, val_size, seed)
    test = load_fashion_mnist("test", directory)
    return FashionMNISTSplits(train=train, val=val, test=test, data_dir=directory)
