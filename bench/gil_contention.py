"""How much a busy Python thread (a server's event loop) slows the model's forward pass.

    .venv/bin/python -m bench.gil_contention [--model models/fmnist.safetensors] [--batch-size 64]

Prints ms per batch for the eager fused module and for the TorchScript graph `ImageClassifier.predict`
uses on the CPU, alone and beside a thread that keeps the GIL busy with pure-Python work.
"""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Callable

import torch

from ml import ImageClassifier


def ms_per_batch(forward: Callable[[], object], seconds: float) -> float:
    started, count = time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        forward()
        count += 1
    return (time.perf_counter() - started) / count * 1000.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/fmnist.safetensors")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=1.5)
    args = parser.parse_args()

    classifier = ImageClassifier.load(args.model, device="cpu")
    images = torch.randint(0, 256, (args.batch_size, *classifier.input_shape), dtype=torch.uint8)
    classifier.predict(images)  # builds the fused module and the graph
    batch = images.contiguous(memory_format=torch.channels_last)
    graph = classifier._cpu_graph(batch)
    eager = classifier._inference
    assert graph is not None and eager is not None

    def run(module: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], object]:
        def forward() -> object:
            with torch.inference_mode():
                return module(batch)

        return forward

    stop = threading.Event()

    def keep_the_gil_busy() -> None:
        while not stop.is_set():
            total = 0
            for i in range(1000):
                total += i

    for name, module in (("eager", eager), ("torchscript", graph)):
        alone = ms_per_batch(run(module), args.seconds)
        stop.clear()
        busy = threading.Thread(target=keep_the_gil_busy)
        busy.start()
        beside = ms_per_batch(run(module), args.seconds)
        stop.set()
        busy.join()
        print(
            f"{name:12} alone {alone:7.2f} ms   beside a busy Python thread {beside:7.2f} ms  (batch {args.batch_size})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
