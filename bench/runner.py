"""Benchmark: ModelRunner under saturation vs the classifier called directly at its best batch size.

    .venv/bin/python -m bench.runner [--model models/fmnist.safetensors] [--requests 4096] [--rounds 5]

Same process, same checkpoint, same real Fashion-MNIST test images, measured in alternating rounds
so that machine noise hits both sides alike:

1. direct: `classifier.predict` over the images in chunks of each candidate batch size; the best
   batch size (highest images/s) is the baseline;
2. saturated runner: N concurrent `await runner.submit(image)` (one asyncio task per image, as
   callers do), `max_batch_size` = the direct best, every other setting the runner's default
   (concurrency: one pass per usable core); the ratio runner/direct is the claim (goal >= 0.9);
3. light load: one caller, one image at a time; p50 latency vs the goal `max_wait_ms + one
   batch's forward pass` (at max_batch_size), and the overhead beyond `max_wait_ms + forward(1)`.

Results are checked: every runner prediction must equal the direct prediction for its image.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from ml import ImageClassifier, load_fashion_mnist
from ml.data import read_idx_images
from ml.runner import ModelRunner, default_concurrency
from ml.runner_stats import LatencySummary

CANDIDATE_BATCH_SIZES = (1, 8, 16, 32, 64, 128, 256, 512)


def direct_throughput(classifier: ImageClassifier, images: torch.Tensor, batch_size: int) -> float:
    """Images per second of `predict` over slices of an already stacked N×C×H×W tensor.

    The strictest baseline: no per-image work at all, not even the stack a server must do."""
    started = time.perf_counter()
    for start in range(0, len(images), batch_size):
        classifier.predict(images[start : start + batch_size])
    return len(images) / (time.perf_counter() - started)


def best_direct_throughput(
    classifier: ImageClassifier,
    images: torch.Tensor,
    batch_size: int,
    side_thread: ThreadPoolExecutor,
) -> float:
    """The better of `direct_throughput` on the main thread and on a side thread.

    Measured on this machine: torch's CPU forward on the main thread can run several times slower
    than on a side thread (the runner's executor) until a side thread has run once, so the
    baseline takes the best of both, never the runner's home advantage."""
    on_main = direct_throughput(classifier, images, batch_size)
    on_side = side_thread.submit(direct_throughput, classifier, images, batch_size).result()
    return max(on_main, on_side)


async def runner_throughput(
    classifier: ImageClassifier, images: list[torch.Tensor], max_batch_size: int, max_wait_ms: float
) -> tuple[float, list[int], dict[int, int]]:
    """Images per second of N concurrent submits; also the labels and the batch size histogram."""
    async with ModelRunner(
        classifier,
        max_batch_size=max_batch_size,
        max_wait_ms=max_wait_ms,
        max_queue=max(len(images), max_batch_size),
    ) as runner:
        started = time.perf_counter()
        predictions = await asyncio.gather(*(runner.submit(image) for image in images))
        elapsed = time.perf_counter() - started
        histogram = runner.stats().batch_sizes
    return len(images) / elapsed, [p.label for p in predictions], histogram


async def light_load_latencies(
    classifier: ImageClassifier, images: list[torch.Tensor], max_batch_size: int, max_wait_ms: float
) -> tuple[list[float], list[float]]:
    """Milliseconds per request for one caller sending one image at a time, and each one's forward pass."""
    latencies, inference = [], []
    async with ModelRunner(
        classifier, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms
    ) as runner:
        for image in images:
            started = time.perf_counter()
            prediction = await runner.submit(image)
            latencies.append((time.perf_counter() - started) * 1000.0)
            inference.append(prediction.inference_ms)
    return latencies, inference


def forward_ms(classifier: ImageClassifier, batch: torch.Tensor, repeats: int = 100) -> float:
    """Median milliseconds of one forward pass over `batch` (N×C×H×W)."""
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        classifier.predict(batch)
        timings.append((time.perf_counter() - started) * 1000.0)
    return LatencySummary.of(timings).p50


def load_classifier(args: argparse.Namespace) -> ImageClassifier:
    if args.untrained:
        return ImageClassifier(device=args.device)
    if not args.model.is_file():
        sys.exit(
            f"{args.model} not found: train it (`make train`), pass --model PATH, or use --untrained"
        )
    return ImageClassifier.load(args.model, device=args.device)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=Path("models/fmnist.safetensors"))
    parser.add_argument(
        "--untrained", action="store_true", help="use a fresh untrained ImageClassifier"
    )
    parser.add_argument(
        "--device", default=None, help="cpu / cuda (default: the classifier's default)"
    )
    parser.add_argument(
        "--requests", type=int, default=4096, help="concurrent submits per saturated round"
    )
    parser.add_argument(
        "--rounds", type=int, default=5, help="alternating direct/runner rounds; best of each"
    )
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument(
        "--max-batch-size", type=int, default=None, help="default: the direct best batch size"
    )
    parser.add_argument("--light-requests", type=int, default=200)
    parser.add_argument(
        "--batch-sizes",
        type=int,
        nargs="+",
        default=list(CANDIDATE_BATCH_SIZES),
        help="direct sweep",
    )
    parser.add_argument(
        "--data-dir", type=Path, default=None, help="folder with t10k-images-idx3-ubyte.gz"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's)"
    )
    return parser.parse_args()


def bench_images(args: argparse.Namespace) -> torch.Tensor:
    """The first `--requests` Fashion-MNIST test images as one contiguous N×1×28×28 tensor."""
    if (
        args.data_dir is not None
    ):  # only the test images are needed (e.g. on a machine without the rest)
        images = read_idx_images(args.data_dir / "t10k-images-idx3-ubyte.gz")
    else:
        images = load_fashion_mnist("test").images
    return images[: min(args.requests, len(images))].contiguous()


def best_batch_size(
    classifier: ImageClassifier,
    images: torch.Tensor,
    batch_sizes: list[int],
    side_thread: ThreadPoolExecutor,
) -> int:
    """The batch size at which `predict` is fastest, after a warm-up (the first calls build the
    fused inference model and allocator caches)."""
    for batch_size in batch_sizes:
        best_direct_throughput(classifier, images[: 4 * batch_size], batch_size, side_thread)
    sweep = {bs: best_direct_throughput(classifier, images, bs, side_thread) for bs in batch_sizes}
    print(
        "direct sweep (images/s): " + ", ".join(f"bs{bs}={ips:,.0f}" for bs, ips in sweep.items())
    )
    return max(sweep, key=lambda bs: sweep[bs])


def saturated_ratio(
    classifier: ImageClassifier,
    images: torch.Tensor,
    args: argparse.Namespace,
    best_batch: int,
    max_batch_size: int,
    side_thread: ThreadPoolExecutor,
) -> float | None:
    """Alternating direct and saturated-runner rounds: the runner/direct ratio of the best rounds,
    or None when a runner prediction differs from the direct one."""
    direct_rounds: list[float] = []
    runner_rounds: list[float] = []
    histogram: dict[int, int] = {}
    expected = classifier.predict(images).argmax(dim=1).tolist()
    for _ in range(args.rounds):
        direct_rounds.append(best_direct_throughput(classifier, images, best_batch, side_thread))
        throughput, labels, histogram = asyncio.run(
            runner_throughput(classifier, list(images), max_batch_size, args.max_wait_ms)
        )
        runner_rounds.append(throughput)
        mismatches = sum(a != b for a, b in zip(labels, expected, strict=True))
        if mismatches:
            print(f"FAIL: {mismatches} runner predictions differ from direct predict")
            return None
    direct_best, runner_best = max(direct_rounds), max(runner_rounds)
    print(
        f"direct best: batch_size={best_batch} {direct_best:,.0f} images/s "
        f"(rounds: {', '.join(f'{x:,.0f}' for x in direct_rounds)})"
    )
    print(
        f"runner saturated: max_batch_size={max_batch_size} max_wait_ms={args.max_wait_ms:g} "
        f"{runner_best:,.0f} images/s (rounds: {', '.join(f'{x:,.0f}' for x in runner_rounds)}); "
        f"batch sizes of the last round: {histogram}"
    )
    ratio = runner_best / direct_best
    print(
        f"ratio runner/direct = {ratio:.3f} (goal >= 0.9) {'OK' if ratio >= 0.9 else 'BELOW GOAL'}"
    )
    return ratio


def light_load_meets_goal(
    classifier: ImageClassifier, images: torch.Tensor, args: argparse.Namespace, max_batch_size: int
) -> bool:
    """One caller, one image at a time: p50 within `max_wait_ms` + one full batch's forward pass."""
    one_forward = forward_ms(classifier, images[:1])
    full_batch_forward = forward_ms(classifier, images[:max_batch_size], 30)
    latencies, inference = asyncio.run(
        light_load_latencies(
            classifier, list(images[: args.light_requests]), max_batch_size, args.max_wait_ms
        )
    )
    latency, forward = LatencySummary.of(latencies), LatencySummary.of(inference)
    goal = args.max_wait_ms + full_batch_forward
    print(
        f"light load (1 caller, 1 image at a time, {latency.count} requests): p50={latency.p50:.2f} ms, "
        f"p99={latency.p99:.2f} ms, runner-measured forward p50={forward.p50:.2f} ms; "
        f"forward(1)={one_forward:.2f} ms, forward({max_batch_size})={full_batch_forward:.2f} ms"
    )
    print(
        f"goal p50 <= max_wait_ms + one batch's forward = {args.max_wait_ms:g} + {full_batch_forward:.2f} = "
        f"{goal:.2f} ms {'OK' if latency.p50 <= goal else 'ABOVE GOAL'}; overhead beyond max_wait_ms + "
        f"forward(1): {latency.p50 - args.max_wait_ms - one_forward:.2f} ms"
    )
    return latency.p50 <= goal


def main() -> int:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    classifier = load_classifier(args)
    images = bench_images(args)
    print(
        f"model={classifier.version} device={classifier.device} torch_threads={torch.get_num_threads()} "
        f"runner_concurrency={default_concurrency(classifier)} images={len(images)} "
        "(Fashion-MNIST test set)"
    )
    side_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench-direct")
    best_batch = best_batch_size(classifier, images, args.batch_sizes, side_thread)
    max_batch_size = args.max_batch_size or best_batch
    ratio = saturated_ratio(classifier, images, args, best_batch, max_batch_size, side_thread)
    if ratio is None:
        return 1
    light_ok = light_load_meets_goal(classifier, images, args, max_batch_size)
    return 0 if ratio >= 0.9 and light_ok else 1


if __name__ == "__main__":
    sys.exit(main())
