"""Fashion-MNIST from its four IDX `.gz` files: locating them, parsing them, a seeded train/val split."""

from __future__ import annotations

import gzip
import logging
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

logger = logging.getLogger(__name__)

DATA_DIR_ENV = "FMNIST_DATA_DIR"
DEBIAN_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
TORCHVISION_CACHE = Path.home() / ".cache" / "fmnist-service" / "torchvision"

CLASS_NAMES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
EXPECTED_COUNTS = {"train": 60_000, "test": 10_000}
HOW_TO_GET = (
    "install the data with `apt-get install dataset-fashion-mnist` (files land in "
    f"{DEBIAN_DATA_DIR}), or download the four *-ubyte.gz files from "
    "https://github.com/zalandoresearch/fashion-mnist and set FMNIST_DATA_DIR to their directory"
)

IDX_IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
IDX_LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dimension


class DataError(RuntimeError):
    """The data set is missing, unreadable or not what it claims to be; the message says how to fix it."""


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


def candidate_dirs(data_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """Where the IDX files are looked for, in order: argument, `FMNIST_DATA_DIR`, the Debian package."""
    candidates: list[Path] = []
    if data_dir is not None:
        candidates.append(Path(data_dir))
    from_env = os.environ.get(DATA_DIR_ENV)
    if from_env:
        candidates.append(Path(from_env))
    candidates.append(DEBIAN_DATA_DIR)
    return candidates


def _has_all_files(directory: Path) -> bool:
    return all((directory / name).is_file() for pair in FILES.values() for name in pair)


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
    return raw if _has_all_files(raw) else None


def find_data_dir(data_dir: str | os.PathLike[str] | None = None, *, download: bool = True) -> Path:
    """The first directory holding all four Fashion-MNIST files; raises `DataError` saying where it looked.

    An explicit `data_dir` that lacks the files is an error even when another location has them:
    the caller asked for that directory.
    """
    candidates = candidate_dirs(data_dir)
    if data_dir is not None:
        candidates = candidates[:1]
    for directory in candidates:
        if _has_all_files(directory):
            return directory
    if data_dir is None and download:
        downloaded = _download_with_torchvision()
        if downloaded is not None:
            return downloaded
    looked = ", ".join(str(c) for c in candidates)
    needed = ", ".join(name for pair in FILES.values() for name in pair)
    raise DataError(
        f"Fashion-MNIST files not found (looked in: {looked}; need {needed}). To fix: {HOW_TO_GET}."
    )


def _read_gz(path: Path) -> bytes:
    try:
        with gzip.open(path, "rb") as handle:
            return handle.read()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(
            f"{path} is not a readable gzip file ({exc}); it is corrupt or truncated. To fix: {HOW_TO_GET}."
        ) from exc


def read_idx_images(path: Path) -> torch.Tensor:
    """Parse an IDX3 image file into a uint8 N×1×H×W tensor."""
    raw = _read_gz(path)
    if len(raw) < 16:
        raise DataError(f"{path} is too short to be an IDX image file. To fix: {HOW_TO_GET}.")
    magic, count, rows, cols = struct.unpack(">IIII", raw[:16])
    if magic != IDX_IMAGES_MAGIC:
        raise DataError(
            f"{path} is not an IDX image file (magic {magic:#010x}, expected {IDX_IMAGES_MAGIC:#010x}). "
            f"To fix: {HOW_TO_GET}."
        )
    expected = 16 + count * rows * cols
    if len(raw) != expected:
        raise DataError(
            f"{path} holds {len(raw)} bytes but its header promises {expected} "
            f"({count} images of {rows}×{cols}); the file is corrupt or truncated. To fix: {HOW_TO_GET}."
        )
    pixels = np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(count, 1, rows, cols)
    return torch.from_numpy(pixels.copy())


def read_idx_labels(path: Path, num_classes: int) -> torch.Tensor:
    """Parse an IDX1 label file into an int64 tensor, checking every label is a known class."""
    raw = _read_gz(path)
    if len(raw) < 8:
        raise DataError(f"{path} is too short to be an IDX label file. To fix: {HOW_TO_GET}.")
    magic, count = struct.unpack(">II", raw[:8])
    if magic != IDX_LABELS_MAGIC:
        raise DataError(
            f"{path} is not an IDX label file (magic {magic:#010x}, expected {IDX_LABELS_MAGIC:#010x}). "
            f"To fix: {HOW_TO_GET}."
        )
    if len(raw) != 8 + count:
        raise DataError(
            f"{path} holds {len(raw) - 8} labels but its header promises {count}; the file is corrupt "
            f"or truncated. To fix: {HOW_TO_GET}."
        )
    labels = torch.from_numpy(np.frombuffer(raw, dtype=np.uint8, offset=8).astype(np.int64))
    if count and int(labels.max()) >= num_classes:
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
    """Train/val split of the training set (seeded) plus the test set; `subset` keeps the first N of each
    (after shuffling) for quick runs."""
    directory = find_data_dir(data_dir)
    train, val = split_train_val(load_fashion_mnist("train", directory), val_size, seed)
    test = load_fashion_mnist("test", directory)
    if subset is not None:
        train = train.subset(torch.arange(min(subset, len(train))))
        val = val.subset(torch.arange(min(max(subset // 10, 1), len(val))))
        test = test.subset(torch.arange(min(max(subset // 5, 1), len(test))))
    return FashionMNISTSplits(train=train, val=val, test=test, data_dir=directory)
