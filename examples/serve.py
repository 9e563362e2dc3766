"""Serve any model form through the ModelRunner on a few real Fashion-MNIST test images.

    python examples/serve.py SOURCE [--device auto] [--precision auto] [--count 16]

SOURCE: a checkpoint (.safetensors), an exported program (.pt2 or TorchScript .pt) with a spec
beside it, or a Python class as package.module:Class (see examples/README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from ml import load_fashion_mnist
from ml.runner import ModelRunner
from ml.serving import load_model


async def classify(source: str, device: str, precision: str, count: int) -> None:
    served = load_model(source, device=device, precision=precision)
    print(json.dumps(served.description.to_json(), indent=2))
    test = load_fashion_mnist("test")
    images, labels = test.images[:count], test.labels[:count]
    async with ModelRunner(served, max_batch_size=32, max_wait_ms=5) as runner:
        predictions = await asyncio.gather(*(runner.submit(image) for image in images))
    for prediction, label in zip(predictions, labels.tolist(), strict=True):
        mark = "ok " if prediction.label == label else "NO "
        print(
            f"{mark} {prediction.class_name:12} p={max(prediction.probabilities):.2f}  "
            f"batch of {prediction.batch_size}  version {prediction.model_version}"
        )
    right = sum(p.label == y for p, y in zip(predictions, labels.tolist(), strict=True))
    print(f"{right}/{count} right")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--count", type=int, default=16)
    args = parser.parse_args()
    asyncio.run(classify(args.source, args.device, args.precision, args.count))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
