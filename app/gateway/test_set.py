"""The Fashion-MNIST test set read with numpy alone (no torch): for the demo page and `fmnist send-images`.

`ml.data` reads the same IDX files into torch tensors for training; the gateway process must not import
torch, so the two places in `app/` that only need the test images share this reader instead.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np

DEBIAN_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
TEST_IMAGES_FILE = "t10k-images-idx3-ubyte.gz"
TEST_LABELS_FILE = "t10k-labels-idx1-ubyte.gz"
IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension
HOW_TO_GET_DATA = (
    "run `apt-get install dataset-fashion-mnist`, or set FMNIST_DATA_DIR to a directory holding "
    f"{TEST_IMAGES_FILE} and {TEST_LABELS_FILE}"
)


class TestSetMissing(FileNotFoundError):
    """The test files are in none of the places looked at; the message lists them and how to get the data."""

    __test__ = False  # a name pytest would otherwise try to collect


def candidate_dirs(data_dir: Path | None) -> list[Path]:
    """Where to look: only `data_dir` when given, else `FMNIST_DATA_DIR`, then Debian's directory."""
    if data_dir is not None:
        return [data_dir]  # asked for explicitly: do not silently fall back to another copy
    from_env = os.environ.get("FMNIST_DATA_DIR")
    return [*([Path(from_env)] if from_env else []), DEBIAN_DATA_DIR]


def find_test_files(data_dir: Path | None) -> tuple[Path, Path]:
    """The (images, labels) files of the test set; `TestSetMissing` when no candidate holds both."""
    candidates = candidate_dirs(data_dir)
    for directory in candidates:
        images, labels = directory / TEST_IMAGES_FILE, directory / TEST_LABELS_FILE
        if images.is_file() and labels.is_file():
            return images, labels
    looked = ", ".join(str(c) for c in candidates)
    raise TestSetMissing(
        f"the Fashion-MNIST test set is not on this machine (looked in {looked}): {HOW_TO_GET_DATA}"
    )


def count_idx_items(path: Path) -> int:
    """The item count in an IDX file's header, without reading its data."""
    with gzip.open(path, "rb") as handle:
        header = handle.read(8)
    if len(header) < 8:
        raise ValueError(f"{path} is truncated")
    (count,) = struct.unpack(">I", header[4:8])
    return int(count)


def read_idx(path: Path, magic: int) -> np.ndarray:
    """One gzipped IDX file of unsigned bytes as a uint8 array shaped by its header (ValueError if not)."""
    with gzip.open(path, "rb") as handle:
        raw = handle.read()
    if len(raw) < 4 or struct.unpack(">I", raw[:4])[0] != magic:
        raise ValueError(f"{path} is not an IDX file with magic number {magic}")
    ndim = magic & 0xFF
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise ValueError(f"{path} is truncated inside its header")
    dims = struct.unpack(f">{ndim}I", raw[4:header_size])
    body = np.frombuffer(raw, dtype=np.uint8, offset=header_size)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"{path} is truncated: its header says {dims}, it holds {body.size} bytes")
    return body.reshape(dims)
