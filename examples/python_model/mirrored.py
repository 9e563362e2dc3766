"""A model served as a Python class: the shipped Fashion-MNIST classifier with test-time augmentation.

    fmnist serve --model examples.python_model.mirrored:MirroredFashion

(run from the repository root, or install the package that holds the class). It follows the protocol
in `ml.serving.protocol`: `setup(device)` loads the weights once, `predict` answers a batch, here by
averaging the probabilities for each image and its mirror image, which Fashion-MNIST's classes do not
change; `preprocess` and `postprocess` are optional and shown for completeness.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch

from ml import ImageClassifier

CHECKPOINT = Path(__file__).resolve().parents[2] / "ml" / "shipped" / "fmnist.safetensors"


class MirroredFashion:
    """Fashion-MNIST probabilities averaged over each image and its left-right mirror."""

    name = "fmnist-mirrored"
    tag = "tta"
    input_shape = (1, 28, 28)
    # What the gateway should do with an upload before it reaches `preprocess` (announced as is).
    preprocessing: ClassVar[dict[str, object]] = {"resize": "fit", "auto_invert": True}

    def setup(self, device: torch.device) -> None:
        self.classifier = ImageClassifier.load(CHECKPOINT, device=device)
        self.class_names = list(self.classifier.class_names)
        self.version = f"mirrored-{self.classifier.version}"

    def preprocess(self, image: torch.Tensor) -> torch.Tensor:
        """One uint8 1×28×28 image → the image and its mirror, 2×1×28×28."""
        return torch.stack([image, image.flip(-1)])

    def predict(self, batch: torch.Tensor) -> torch.Tensor:
        """N×2×1×28×28 (the stacked `preprocess` outputs) → N×2×10 probabilities."""
        count = batch.shape[0]
        flat = self.classifier.predict(batch.reshape(count * 2, *self.input_shape))
        return flat.reshape(count, 2, -1)

    def postprocess(self, output: torch.Tensor) -> torch.Tensor:
        """The mean over the two views: N×10 probabilities."""
        return output.mean(dim=1)
