"""A generated, seeded image set with easy classes: coloured shapes on noisy dark backgrounds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

SHAPE_NAMES = ["circle", "cross", "square", "triangle"]  # sorted, as folder names sort
_COLOURS = {
    "circle": (220, 40, 40),
    "cross": (230, 210, 40),
    "square": (40, 200, 60),
    "triangle": (50, 80, 230),
}


def shape_image(name: str, rng: np.random.Generator, size: int = 32) -> Image.Image:
    """One RGB `size`×`size` image of shape `name` at a random place and scale, with pixel noise."""
    background = tuple(int(v) for v in rng.integers(0, 80, 3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    r = int(rng.integers(size // 5, size // 3))
    cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
    colour = tuple(int(np.clip(c + rng.integers(-30, 31), 0, 255)) for c in _COLOURS[name])
    if name == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif name == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif name == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    else:
        bar = max(1, r // 4)
        draw.rectangle((cx - r, cy - bar, cx + r, cy + bar), fill=colour)
        draw.rectangle((cx - bar, cy - r, cx + bar, cy + r), fill=colour)
    noisy = np.asarray(image).astype(np.int16) + rng.integers(-20, 21, (size, size, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")


def shapes(count: int, seed: int, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` images (uint8 N×3×size×size) with random labels 0..3 (indices into SHAPE_NAMES)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(SHAPE_NAMES), count)
    images = np.stack(
        [
            np.asarray(shape_image(SHAPE_NAMES[label], rng, size)).transpose(2, 0, 1)
            for label in labels
        ]
    )
    return torch.from_numpy(images), torch.from_numpy(labels)


def write_shape_folder(root: Path, per_class: int, seed: int, size: int = 32) -> Path:
    """An image folder (root/<shape>/<i>.png) with `per_class` images of each shape; returns root."""
    rng = np.random.default_rng(seed)
    for name in SHAPE_NAMES:
        (root / name).mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            shape_image(name, rng, size).save(root / name / f"{index}.png")
    return root
