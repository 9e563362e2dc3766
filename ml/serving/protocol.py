"""`ServableModel`: the protocol a Python class implements to be served as `package.module:Class`.

In the spirit of LitServe's `LitAPI`: the worker makes one instance (no arguments), calls `setup(device)`
once, then `predict` on each batch the `ModelRunner` forms. The metadata the announcement needs is read
from the instance after `setup`, so it may come from class attributes or from a loaded file.

```python
class Shapes:
    name = "shapes"                        # optional: the served name (default: the class name)
    class_names = ["circle", "square"]     # required: one per output column
    input_shape = (3, 32, 32)              # required: C, H, W of the uint8 images it is given
    tag = "v1"                             # optional
    version = "..."                        # optional: else a hash of the class's source file
    preprocessing = {"mean": [0.5], "std": [0.25], "resize": "fit"}  # optional, announced as is

    def setup(self, device: torch.device) -> None:
        self.net = build_and_load_weights().to(device).eval()
        self.device = device

    def preprocess(self, image: torch.Tensor) -> torch.Tensor:   # optional: uint8 C×H×W, one image
        return image.float().div(255)

    def predict(self, batch: torch.Tensor) -> torch.Tensor:      # stacked preprocess outputs
        return self.net(batch.to(self.device))

    def postprocess(self, output: torch.Tensor) -> torch.Tensor: # optional: → N×K probabilities
        return output.softmax(dim=1)
```

`predict` runs under `torch.inference_mode()` (and under `torch.autocast` for precision `bf16`), in
one of the runner's executor threads; with `concurrency` above one it is called from several threads
at once. An exception fails the batch, and the runner then retries its images one at a time, so a poison
image fails alone. Without `postprocess`, `predict` must return probabilities (rows summing to one).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch

__all__ = ["ServableModel"]


@runtime_checkable
class ServableModel(Protocol):
    """What `ml.serving.load_model("package.module:Class")` needs from the class; see the module docstring."""

    class_names: Sequence[str]
    input_shape: tuple[int, int, int]

    def setup(self, device: torch.device) -> None: ...

    def predict(self, batch: Any) -> Any: ...
