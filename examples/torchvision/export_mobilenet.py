"""Train a small torchvision MobileNetV3 on Fashion-MNIST and export it for `fmnist serve --model`.

    python examples/torchvision/export_mobilenet.py [--subset 8000] [--epochs 2]

Writes `mobilenet_v3_small.pt2` (torch.export) and `mobilenet_v3_small.pt` (TorchScript) beside this
file; `model.toml` beside them tells the worker the input shape, scaling and class names. Any
torchvision or timm classifier is served the same way: export it with a dynamic batch dimension and
write a spec. The tests load the committed `.pt2` (see tests/ml/test_serving_exported.py).
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import torch
import torchvision
from torch import nn

from ml import load_fashion_mnist

HERE = Path(__file__).resolve().parent
# The same numbers as model.toml: the exported network takes normalised float images.
MEAN, STD = 0.2860, 0.3530


def build() -> nn.Module:
    """MobileNetV3-Small at a quarter width, its stem taking one channel without downsampling (28×28 input)."""
    model = torchvision.models.mobilenet_v3_small(num_classes=10, width_mult=0.25)
    stem = model.features[0][0]
    model.features[0][0] = nn.Conv2d(1, stem.out_channels, 3, stride=1, padding=1, bias=False)
    return model


def normalise(images: torch.Tensor) -> torch.Tensor:
    return (images.float() / 255.0 - MEAN) / STD


def recalibrate_batchnorm(model: nn.Module, images: torch.Tensor) -> None:
    """Recompute BatchNorm's running statistics as exact averages over `images`: torchvision's
    MobileNet keeps them with momentum 0.01, too slow to settle in a short run."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
    model.train()
    with torch.no_grad():
        for start in range(0, len(images), 512):
            model(normalise(images[start : start + 512]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subset", type=int, default=8000, help="training images used")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    torch.manual_seed(0)
    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    images, labels = train.images[: args.subset], train.labels[: args.subset]
    model = build()
    steps = args.epochs * (len(images) // 128)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    started = time.perf_counter()
    model.train()
    for epoch in range(args.epochs):
        order = torch.randperm(len(images))
        for start in range(0, len(images) - 127, 128):
            batch = order[start : start + 128]
            loss = nn.functional.cross_entropy(model(normalise(images[batch])), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        print(
            f"epoch {epoch + 1}: loss {loss.item():.3f} ({time.perf_counter() - started:.0f} s)",
            flush=True,
        )
    recalibrate_batchnorm(model, images[:4096])
    model.eval()
    with torch.inference_mode():
        predicted = torch.cat(
            [model(normalise(test.images[i : i + 1000])).argmax(1) for i in range(0, 10000, 1000)]
        )
    print(f"test accuracy {(predicted == test.labels).float().mean().item():.4f}")

    example = normalise(test.images[:2])
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, args.out / "mobilenet_v3_small.pt2")
    with warnings.catch_warnings():  # TorchScript is deprecated; this writes the legacy form too
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(model, example)
        torch.jit.save(traced, str(args.out / "mobilenet_v3_small.pt"))
    print(f"wrote {args.out / 'mobilenet_v3_small.pt2'} and .pt")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
