"""Model compute ceiling: `ImageClassifier.predict` images/s at several batch sizes on this CPU.

    .venv/bin/python -m bench.model [--checkpoint models/fmnist.safetensors] [--threads 2]

Prints a markdown table: the shipped path (BatchNorm fused into the convs, channels_last) in fp32 and
in bf16 (`precision="bf16"`), and, for comparison, the same weights run unfused in the default memory
format, so the effect of those choices is visible. Best of several timed windows per cell (the least
disturbed by other processes). A second table gives images per CPU-second of one thread (thread CPU
time, not wall time), which stays meaningful when other processes share the cores.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ml import ImageClassifier
from ml.report import cpu_description, measure_throughput


def time_callable(
    run: Callable[[torch.Tensor], object], images: torch.Tensor, seconds: float, repeats: int
) -> float:
    """Best images/s of `run(images)` over `repeats` windows of `seconds / repeats` each."""
    for _ in range(10):
        run(images)
    best = 0.0
    for _ in range(repeats):
        calls, started = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - started) < seconds / repeats:
            run(images)
            calls += 1
        best = max(best, calls * images.shape[0] / elapsed)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=Path("models/fmnist.safetensors"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-sizes", default="1,32,64,256")
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds per cell")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]

    classifier = ImageClassifier.load(args.checkpoint, device="cpu")
    shipped = measure_throughput(
        classifier, batch_sizes, threads=args.threads, seconds=args.seconds, repeats=args.repeats
    )
    classifier.precision = "bf16"
    bf16 = measure_throughput(
        classifier, batch_sizes, threads=args.threads, seconds=args.seconds, repeats=args.repeats
    )

    torch.set_num_threads(args.threads)
    unfused = classifier.network.eval().to(memory_format=torch.contiguous_format)

    def run_unfused(images: torch.Tensor) -> object:
        with torch.inference_mode():
            return torch.softmax(unfused(images), 1)

    generator = torch.Generator().manual_seed(0)
    plain = []
    for batch_size in batch_sizes:
        images = torch.randint(
            0, 256, (batch_size, *classifier.input_shape), dtype=torch.uint8, generator=generator
        )
        plain.append(time_callable(run_unfused, images, args.seconds, args.repeats))

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"checkpoint {args.checkpoint} version {classifier.version}, {classifier.config.multiply_accumulates():,} MACs/image"
    )
    print(
        f"{cpu_description()}, torch {torch.__version__}, {args.threads} threads, 1-min load average {load:.1f}"
    )
    print()
    print(
        "| batch | predict fp32 images/s | ms/batch | predict bf16 images/s | unfused NCHW fp32 |"
    )
    print("|---:|---:|---:|---:|---:|")
    for result, fast, baseline in zip(shipped, bf16, plain, strict=True):
        print(
            f"| {result.batch_size} | {result.images_per_second:,.0f} | {result.ms_per_batch:.3f} "
            f"| {fast.images_per_second:,.0f} | {baseline:,.0f} |"
        )
    per_cpu = {}
    for precision in ("fp32", "bf16"):
        classifier.precision = precision
        per_cpu[precision] = measure_throughput(
            classifier,
            batch_sizes,
            threads=1,
            seconds=args.seconds,
            repeats=args.repeats,
            clock="thread",
        )
    print()
    print(
        "| batch | fp32 images per CPU-second (1 thread) | bf16 images per CPU-second (1 thread) |"
    )
    print("|---:|---:|---:|")
    for exact, fast in zip(per_cpu["fp32"], per_cpu["bf16"], strict=True):
        print(
            f"| {exact.batch_size} | {exact.images_per_second:,.0f} | {fast.images_per_second:,.0f} |"
        )


if __name__ == "__main__":
    main()
