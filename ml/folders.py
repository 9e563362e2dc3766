"""Image-folder data sets: one sub-folder per class, as `torchvision.datasets.ImageFolder` reads them.

Class names are the sorted sub-folder names; every file with a common image extension below a class
folder (sub-folders included) is one image of that class. Each image is converted to one input shape
by the image policy the gateway applies to uploads (`ml.imaging`), so a model trains on the pixels it
will be served. The shape is the data's own (its most common size and mode) unless given.

Loading is eager: every image is decoded once into one uint8 N×C×H×W tensor (N·C·H·W bytes: 2,000
RGB 32×32 images take 6 MB), which lets training augment whole batches. A set that would not fit in
the memory available is refused with a `DataError` before decoding. Pillow only, no torchvision.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ml.data import TensorImageDataset
from ml.imaging import to_model_input
from ml.readers import DataError

__all__ = [
    "IMAGE_EXTENSIONS",
    "FolderSplits",
    "check_classes",
    "describe",
    "find_images",
    "folder_for_model",
    "folder_splits",
    "infer_input_shape",
    "load_image_folder",
    "stratified_split",
]

# torchvision's `IMG_EXTENSIONS` plus GIF, compared case-insensitively.
IMAGE_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".png",
    ".ppm",
    ".pgm",
    ".bmp",
    ".tif",
    ".tiff",
    ".webp",
    ".gif",
)
# Pillow modes that hold one channel (with or without alpha); every other mode converts to RGB.
_GRAY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "F"}
# Share of the memory available now that the decoded tensor may take, leaving room for training.
_MEMORY_SHARE = 0.5


@dataclass(frozen=True)
class FolderSplits:
    """A folder data set split into seeded, stratified training and validation sets."""

    train: TensorImageDataset
    val: TensorImageDataset
    root: Path

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every image."""
        c, h, w = self.train.images.shape[1:]
        return (int(c), int(h), int(w))

    @property
    def class_names(self) -> list[str]:
        return self.train.class_names


def find_images(root: str | os.PathLike[str]) -> tuple[list[str], list[tuple[Path, int]]]:
    """(class names, [(image path, label)]) of an image folder, in ImageFolder's order."""
    directory = Path(root)
    if not directory.is_dir():
        raise DataError(
            f"{directory} is not a directory; give a folder with one sub-folder per class"
        )
    classes = sorted(entry.name for entry in os.scandir(directory) if entry.is_dir())
    if len(classes) < 2:
        raise DataError(
            f"{directory} has {len(classes)} class folder(s); a classifier needs at least two "
            "(one sub-folder per class, e.g. DIR/cat/1.png, DIR/dog/2.png)"
        )
    items: list[tuple[Path, int]] = []
    empty = []
    for label, name in enumerate(classes):
        files = sorted(
            Path(base) / file
            for base, _, names in os.walk(directory / name, followlinks=True)
            for file in names
            if file.lower().endswith(IMAGE_EXTENSIONS)
        )
        if not files:
            empty.append(name)
        items.extend((path, label) for path in files)
    if empty:
        raise DataError(
            f"{directory}: class folder(s) {empty} hold no image ({', '.join(IMAGE_EXTENSIONS)}); "
            "remove them or add images"
        )
    return classes, items


def _open(path: Path) -> Image.Image:
    try:
        return Image.open(path)
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path} is not a readable image: {exc}") from exc


def infer_input_shape(paths: Sequence[Path]) -> tuple[int, int, int]:
    """(C, H, W) from the headers: 1 channel when most images are grayscale, else 3; the most common size."""
    modes: Counter[int] = Counter()
    sizes: Counter[tuple[int, int]] = Counter()
    for path in paths:
        with _open(path) as image:
            modes[1 if image.mode in _GRAY_MODES else 3] += 1
            sizes[image.size] += 1
    if not sizes:
        raise DataError("no images to infer an input shape from")
    (width, height), _ = sizes.most_common(1)[0]
    return (modes.most_common(1)[0][0], height, width)


def _available_memory() -> int | None:
    """Bytes of memory available now, or None where the platform does not say."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def load_image_folder(
    root: str | os.PathLike[str],
    *,
    channels: int | None = None,
    size: tuple[int, int] | None = None,
) -> TensorImageDataset:
    """Every image below `root` as uint8 `channels`×H×W (`size` = (H, W)), labels from the folders.

    Without `channels` or `size` they come from the data (`infer_input_shape`). Images are converted by
    the gateway's image policy (`ml.imaging.to_model_input`)."""
    classes, items = find_images(root)
    paths = [path for path, _ in items]
    if channels is None or size is None:
        inferred = infer_input_shape(paths)
        channels = inferred[0] if channels is None else channels
        size = inferred[1:] if size is None else size
    height, width = int(size[0]), int(size[1])
    if channels not in (1, 3) or height < 1 or width < 1:
        raise DataError(
            f"can convert images to 1 or 3 channels of a positive size, not {channels}×{height}×{width}"
        )
    needed = len(items) * channels * height * width
    available = _available_memory()
    if available is not None and needed > _MEMORY_SHARE * available:
        raise DataError(
            f"{root}: {len(items)} images of {channels}×{height}×{width} need {needed / 2**20:.0f} MiB "
            f"in memory, more than half the {available / 2**20:.0f} MiB available; pass a smaller size"
        )
    images = np.empty((len(items), channels, height, width), dtype=np.uint8)
    for index, path in enumerate(paths):
        try:
            with _open(path) as image:
                image.load()
                pixels = to_model_input(image, channels, height, width)
        except DataError:
            raise
        # Decoders raise many types on a damaged file; all of them mean "unreadable".
        except Exception as exc:
            raise DataError(f"{path} could not be decoded: {exc}") from exc
        images[index] = np.frombuffer(pixels, dtype=np.uint8).reshape(channels, height, width)
    labels = torch.tensor([label for _, label in items], dtype=torch.int64)
    return TensorImageDataset(torch.from_numpy(images), labels, classes)


def stratified_split(
    dataset: TensorImageDataset, val_fraction: float, seed: int
) -> tuple[TensorImageDataset, TensorImageDataset]:
    """(train, val): `val_fraction` of every class (rounded, at least one where the class has two or
    more images) held out, chosen by `seed`; the same seed gives the same split."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    generator = torch.Generator().manual_seed(seed)
    val_parts, train_parts = [], []
    for label in range(len(dataset.class_names)):
        members = torch.nonzero(dataset.labels == label).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        count = round(val_fraction * len(members))
        if val_fraction > 0 and count == 0 and len(members) >= 2:
            count = 1
        val_parts.append(members[:count])
        train_parts.append(members[count:])
    val = torch.cat(val_parts).sort().values
    train = torch.cat(train_parts).sort().values
    return dataset.subset(train), dataset.subset(val)


def folder_splits(
    root: str | os.PathLike[str],
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    channels: int | None = None,
    size: tuple[int, int] | None = None,
) -> FolderSplits:
    """`load_image_folder` split by `stratified_split`: what `ImageClassifier.fit` takes."""
    dataset = load_image_folder(root, channels=channels, size=size)
    train, val = stratified_split(dataset, val_fraction, seed)
    return FolderSplits(train=train, val=val, root=Path(root))


def check_classes(
    folder_classes: Sequence[str], model_classes: Sequence[str], root: object
) -> list[int]:
    """The model's label for each folder class; a `DataError` naming the folders the model does not know."""
    index = {name: i for i, name in enumerate(model_classes)}
    unknown = [name for name in folder_classes if name not in index]
    if unknown:
        raise DataError(
            f"{root} has class folder(s) {unknown} that the model does not know; "
            f"its classes are {list(model_classes)}"
        )
    return [index[name] for name in folder_classes]


def folder_for_model(
    root: str | os.PathLike[str],
    input_shape: tuple[int, int, int],
    class_names: Sequence[str],
    *,
    convert: bool = False,
) -> TensorImageDataset:
    """A folder as a model's labelled evaluation set: labels are the model's indices of the folder names.

    The folder may hold some of the model's classes, never others. Its images must have the model's
    input shape (most common size and mode), or, with `convert=True`, are fitted to it by the image
    policy as the gateway fits uploads; otherwise a `DataError` names both shapes."""
    classes, items = find_images(root)
    mapping = check_classes(classes, class_names, root)
    channels, height, width = input_shape
    if not convert:
        found = infer_input_shape([path for path, _ in items])
        if found != tuple(input_shape):
            raise DataError(
                f"{root} holds {'×'.join(map(str, found))} images (C×H×W, most common), the model takes "
                f"{'×'.join(map(str, input_shape))}; convert them by the image policy (convert=True) "
                "or use a model trained on this shape"
            )
    dataset = load_image_folder(root, channels=channels, size=(height, width))
    labels = torch.tensor(mapping, dtype=torch.int64)[dataset.labels]
    return TensorImageDataset(dataset.images, labels, class_names)


def describe(root: str | os.PathLike[str], dataset: TensorImageDataset, part: str = "") -> str:
    """One line for model cards and reports: which folder, how many images of which shape and classes."""
    c, h, w = (int(n) for n in dataset.images.shape[1:])
    present = sorted(set(dataset.labels.tolist()))
    names = ", ".join(dataset.class_names[i] for i in present)
    where = f"{part} of image folder" if part else "image folder"
    return f"{where} `{Path(root)}`: {len(dataset)} images, {c}×{h}×{w}, classes {names}"
