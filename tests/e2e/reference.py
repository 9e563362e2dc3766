"""The checkpoint's own accuracy on given images, computed in-process: the yardstick for the service's."""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image


def checkpoint_accuracy(checkpoint: Path, pngs: Sequence[bytes], labels: Sequence[int]) -> float:
    """Accuracy of `ImageClassifier.predict` on the decoded PNGs, one batched forward pass per 500 images."""
    import torch

    from ml import ImageClassifier

    classifier = ImageClassifier.load(checkpoint)
    pixels = np.stack([np.asarray(Image.open(io.BytesIO(png)).convert("L")) for png in pngs])
    images = torch.from_numpy(pixels).unsqueeze(1)  # N×1×28×28 uint8, as the gateway publishes them
    predicted = torch.cat([classifier.predict(chunk).argmax(dim=1) for chunk in images.split(500)])
    return float((predicted == torch.tensor(list(labels))).float().mean())


def card_accuracy(checkpoint: Path) -> float:
    """The test accuracy the model card beside the checkpoint (`NAME.md`) states, as a fraction."""
    card = checkpoint.with_suffix(".md")
    match = re.search(r"test accuracy\**\s*\|\s*\**([0-9.]+)\s*%", card.read_text())
    if match is None:
        raise ValueError(f"{card} states no '| test accuracy | NN.NN% |' row")
    return float(match.group(1)) / 100
