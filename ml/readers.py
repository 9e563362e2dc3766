"""Torch-free readers: the Fashion-MNIST IDX files, where they live, and a checkpoint's header.

The gateway process never imports torch, yet its demo page and `fmnist send-images` need the test
images and a checkpoint's class names; `ml.data` and `ml.checkpoint` build their torch objects on
these same readers, so there is one parser of each format.

Errors:

    DataError                        the data set is missing, unreadable or not what it claims to be
    CheckpointError                  a checkpoint could not be loaded
    ├── CheckpointNotFoundError      no file at that path
    ├── CorruptCheckpointError       unreadable, truncated, or weights that do not match their hash
    └── IncompatibleCheckpointError  a valid file, but not an fmnist-service classifier this code can load
"""

from __future__ import annotations

import gzip
import json
import os
import struct
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

__all__ = [
    "CLASS_NAMES",
    "CheckpointError",
    "CheckpointNotFoundError",
    "CorruptCheckpointError",
    "DataError",
    "IncompatibleCheckpointError",
    "checkpoint_metadata",
    "count_idx_items",
    "existing_checkpoint",
    "fashion_mnist_test_files",
    "find_data_dir",
    "parse_safetensors_header",
    "read_checkpoint_header",
    "read_checkpoint_metadata",
    "read_idx",
]

# --- Fashion-MNIST ----------------------------------------------------------------------------------

DATA_DIR_ENV = "FMNIST_DATA_DIR"
DEBIAN_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")

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

# (images file, labels file) of each part of the data set.
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
_IDX_KINDS = {IDX_IMAGES_MAGIC: "IDX image file", IDX_LABELS_MAGIC: "IDX label file"}


class DataError(RuntimeError):
    """The data set is missing, unreadable or not what it claims to be; the message says how to fix it."""


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


def has_files(directory: Path, parts: tuple[str, ...] = tuple(FILES)) -> bool:
    """`directory` holds the images and labels files of every part in `parts`."""
    return all((directory / name).is_file() for part in parts for name in FILES[part])


def find_data_dir(
    data_dir: str | os.PathLike[str] | None = None, *, parts: tuple[str, ...] = tuple(FILES)
) -> Path:
    """The first directory holding the files of `parts`; raises `DataError` saying where it looked.

    An explicit `data_dir` that lacks the files is an error even when another location has them:
    the caller asked for that directory.
    """
    candidates = candidate_dirs(data_dir)
    if data_dir is not None:
        candidates = candidates[:1]
    for directory in candidates:
        if has_files(directory, parts):
            return directory
    looked = ", ".join(str(c) for c in candidates)
    needed = ", ".join(name for part in parts for name in FILES[part])
    raise DataError(
        f"Fashion-MNIST files not found (looked in: {looked}; need {needed}). To fix: {HOW_TO_GET}."
    )


def fashion_mnist_test_files(data_dir: str | os.PathLike[str] | None = None) -> tuple[Path, Path]:
    """The (images, labels) files of the 10k test set, found as `find_data_dir` finds them."""
    directory = find_data_dir(data_dir, parts=("test",))
    images_name, labels_name = FILES["test"]
    return directory / images_name, directory / labels_name


def _read_gz(path: Path) -> bytes:
    try:
        with gzip.open(path, "rb") as handle:
            return handle.read()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(
            f"{path} is not a readable gzip file ({exc}); it is corrupt or truncated. To fix: {HOW_TO_GET}."
        ) from exc


def read_idx(path: Path, magic: int) -> np.ndarray:
    """A gzipped IDX file of unsigned bytes as a read-only uint8 array shaped by its header.

    `magic` is the kind expected (`IDX_IMAGES_MAGIC`: N×H×W, `IDX_LABELS_MAGIC`: N); anything
    else, a short file or a body that does not match the header is a `DataError`."""
    kind = _IDX_KINDS.get(magic, "IDX file")
    raw = _read_gz(path)
    ndim = magic & 0xFF
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise DataError(f"{path} is too short to be an {kind}. To fix: {HOW_TO_GET}.")
    (found,) = struct.unpack(">I", raw[:4])
    if found != magic:
        raise DataError(
            f"{path} is not an {kind} (magic {found:#010x}, expected {magic:#010x}). "
            f"To fix: {HOW_TO_GET}."
        )
    dims = struct.unpack(f">{ndim}I", raw[4:header_size])
    expected = header_size + int(np.prod(dims))
    if len(raw) != expected:
        raise DataError(
            f"{path} holds {len(raw)} bytes but its header promises {expected} (dimensions "
            f"{'×'.join(map(str, dims))}); the file is corrupt or truncated. To fix: {HOW_TO_GET}."
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(dims)


def count_idx_items(path: Path) -> int:
    """The item count in an IDX file's header, without reading its data."""
    try:
        with gzip.open(path, "rb") as handle:
            header = handle.read(8)
    except (OSError, EOFError) as exc:
        raise DataError(
            f"{path} is not a readable gzip file ({exc}). To fix: {HOW_TO_GET}."
        ) from exc
    if len(header) < 8:
        raise DataError(f"{path} is too short to be an IDX file. To fix: {HOW_TO_GET}.")
    (count,) = struct.unpack(">I", header[4:8])
    return int(count)


# --- checkpoint header ------------------------------------------------------------------------------

FORMAT = "fmnist-service/image-classifier"
FORMAT_VERSION = 1
METADATA_KEY = "fmnist"
# A safetensors header is JSON; anything bigger than this is not one of ours and is not parsed.
MAX_HEADER_BYTES = 16 * 1024 * 1024
RETRAIN_HINT = (
    "retrain with `fmnist train --out PATH` or restore the file from the repository (models/)"
)


class CheckpointError(RuntimeError):
    """A checkpoint could not be loaded; the message says which file and what to do."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No checkpoint at the given path."""


class CorruptCheckpointError(CheckpointError):
    """The file is damaged: not parseable, truncated, or its weights differ from the recorded hash."""


class IncompatibleCheckpointError(CheckpointError):
    """The file is intact but is not a classifier checkpoint this version can load."""


def parse_safetensors_header(path: Path, source: BinaryIO, size: int) -> dict[str, Any]:
    """The header JSON of a safetensors stream of `size` bytes, positioned at its start."""
    size_field = source.read(8)
    if len(size_field) < 8:
        raise CorruptCheckpointError(
            f"{path} is {size} bytes, too short to be a safetensors file; {RETRAIN_HINT}"
        )
    (header_size,) = struct.unpack("<Q", size_field)
    if header_size > MAX_HEADER_BYTES or 8 + header_size > size:
        raise CorruptCheckpointError(
            f"{path}: header claims {header_size} bytes but the file has {size - 8} after the "
            f"size field; the file is truncated or not a safetensors file; {RETRAIN_HINT}"
        )
    try:
        header = json.loads(source.read(header_size))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptCheckpointError(
            f"{path}: the safetensors header is not valid JSON ({exc}); {RETRAIN_HINT}"
        ) from exc
    if not isinstance(header, dict):
        raise CorruptCheckpointError(
            f"{path}: the safetensors header is not a JSON object; {RETRAIN_HINT}"
        )
    return header


def existing_checkpoint(path: str | os.PathLike[str]) -> Path:
    """`path` as a Path when a file is there; `CheckpointNotFoundError` saying how to get one if not."""
    source = Path(path)
    if not source.is_file():
        raise CheckpointNotFoundError(
            f"no checkpoint at {source} (set FMNIST_MODEL_PATH, or train one with `fmnist train --out {source}`)"
        )
    return source


def read_checkpoint_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The safetensors header JSON of the checkpoint at `path`, reading only the header's bytes."""
    source = existing_checkpoint(path)
    with source.open("rb") as handle:
        return parse_safetensors_header(source, handle, source.stat().st_size)


def checkpoint_metadata(path: Path, header: dict[str, Any]) -> dict[str, Any]:
    """The classifier metadata a checkpoint's header carries, after checking its format and version."""
    file_metadata = header.get("__metadata__") or {}
    if not isinstance(file_metadata, dict) or file_metadata.get("format") != FORMAT:
        found = file_metadata.get("format") if isinstance(file_metadata, dict) else None
        raise IncompatibleCheckpointError(
            f"{path} is a safetensors file but not an fmnist-service classifier checkpoint "
            f"(metadata 'format' is {found!r}, expected {FORMAT!r}); {RETRAIN_HINT}"
        )
    try:
        format_version = int(file_metadata.get("format_version", ""))
    except ValueError:
        format_version = -1
    if format_version != FORMAT_VERSION:
        raise IncompatibleCheckpointError(
            f"{path} has checkpoint format version {file_metadata.get('format_version')!r}; this "
            f"fmnist-service reads version {FORMAT_VERSION}. Upgrade fmnist-service or retrain."
        )
    try:
        metadata = json.loads(file_metadata[METADATA_KEY])
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise CorruptCheckpointError(
            f"{path}: classifier metadata missing or not JSON ({exc}); {RETRAIN_HINT}"
        ) from exc
    if not isinstance(metadata, dict):
        raise CorruptCheckpointError(
            f"{path}: classifier metadata is not a JSON object; {RETRAIN_HINT}"
        )
    return metadata


def read_checkpoint_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The classifier metadata (classes, version, input shape, …) of a checkpoint, weights unread."""
    return checkpoint_metadata(Path(path), read_checkpoint_header(path))
