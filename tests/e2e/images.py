"""Real Fashion-MNIST test images as PNG bytes with their labels, for e2e tests and benchmarks."""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import numpy as np
from PIL import Image

IDX_IMAGES = "t10k-images-idx3-ubyte.gz"
IDX_LABELS = "t10k-labels-idx1-ubyte.gz"


def load_test_images(data_dir: Path, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `count` test images (N×28×28 uint8) and labels (N,) from the IDX files."""
    with gzip.open(data_dir / IDX_IMAGES, "rb") as f:
        raw = f.read()
    images = np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(data_dir / IDX_LABELS, "rb") as f:
        labels = np.frombuffer(f.read(), dtype=np.uint8, offset=8)
    if count > len(images):
        raise ValueError(f"asked for {count} images; the test set has {len(images)}")
    return images[:count], labels[:count].astype(np.int64)


def png_bytes(image: np.ndarray) -> bytes:
    """One grayscale image encoded as PNG (what a user uploads)."""
    buffer = io.BytesIO()
    Image.fromarray(image, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def load_test_pngs(data_dir: Path, count: int) -> tuple[list[bytes], list[int]]:
    """The first `count` test images as PNG bytes, with their true labels."""
    images, labels = load_test_images(data_dir, count)
    return [png_bytes(image) for image in images], [int(label) for label in labels]
