"""GPU check: the shipped model served by `ml.serving.load_model` on CUDA through the `ModelRunner`.

    .venv/bin/python -m bench.gpu_worker [--model ml/shipped/fmnist.safetensors] [--device cuda]
        [--levels 1,8,64,256,1024] [--seconds 5] [--max-batch-size 256] [--precision auto]
        [--check-forms]

For each load level (callers, each submitting one image at a time and waiting for the answer, as a
worker's in-flight messages do), prints images/s, latency percentiles and the batch sizes the runner
chose. Real Fashion-MNIST test images when the files are found, random images otherwise. Fails at
once, saying so, when the device is not available. Runs on the CPU too (`--device cpu`), for a
comparison on the same machine.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections import Counter

import torch

from ml.layout import inference_layout, usable_cores
from ml.runner import ModelRunner
from ml.serving import ServedModel, load_model


def test_images(served: ServedModel, count: int) -> torch.Tensor:
    try:
        from ml import load_fashion_mnist

        images = load_fashion_mnist("test").images
        if tuple(images.shape[1:]) == served.input_shape:
            return images[:count]
    except Exception as exc:  # no data set here: the numbers are the same for random pixels
        print(f"Fashion-MNIST not found ({exc}); random images")
    return torch.randint(0, 256, (count, *served.input_shape), dtype=torch.uint8)


async def one_level(
    served: ServedModel, images: torch.Tensor, callers: int, seconds: float, max_batch_size: int
) -> None:
    done = 0
    latencies: list[float] = []
    async with ModelRunner(
        served, max_batch_size=max_batch_size, max_wait_ms=2, max_queue=max(4096, callers * 2)
    ) as runner:
        before = Counter(runner.stats().batch_sizes)
        stop = time.perf_counter() + seconds

        async def caller(index: int) -> None:
            nonlocal done
            position = index
            while time.perf_counter() < stop:
                started = time.perf_counter()
                await runner.submit(images[position % len(images)])
                latencies.append((time.perf_counter() - started) * 1000.0)
                done += 1
                position += callers

        started = time.perf_counter()
        await asyncio.gather(*(caller(i) for i in range(callers)))
        elapsed = time.perf_counter() - started
        sizes = Counter(runner.stats().batch_sizes)
        sizes.subtract(before)
    latencies.sort()
    p50 = latencies[len(latencies) // 2]
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    common = ", ".join(f"{size}×{count}" for size, count in sizes.most_common(5) if count > 0)
    mean_batch = sum(s * c for s, c in sizes.items()) / max(1, sum(sizes.values()))
    print(
        f"callers {callers:5d}: {done / elapsed:9.0f} images/s   p50 {p50:6.2f} ms   "
        f"p99 {p99:6.2f} ms   mean batch {mean_batch:6.1f}   most used batch sizes {common}"
    )


FORMS = (
    "ml/shipped/fmnist.safetensors",
    "examples/torchvision/mobilenet_v3_small.pt2",
    "examples/torchvision/mobilenet_v3_small.pt",
    "examples.python_model.mirrored:MirroredFashion",
)


def check_forms(device: str) -> None:
    """Each example form loaded on `device` answers as it does eagerly on the CPU (fp32)."""
    for source in FORMS:
        started = time.perf_counter()
        try:
            served = load_model(source, device=device, precision="fp32", runtime="eager")
            reference = load_model(source, device="cpu", precision="fp32", runtime="eager")
        except Exception as exc:  # report every form, even when one cannot load here
            print(f"form {source}: FAILED {exc!r}")
            continue
        seconds = time.perf_counter() - started
        images = torch.randint(0, 256, (32, *served.input_shape), dtype=torch.uint8)
        difference = float((served.predict(images) - reference.predict(images)).abs().max())
        print(
            f"form {served.description.form:10} {source}: device={served.description.device} "
            f"runtime={served.description.runtime} loaded in {seconds:.1f} s, "
            f"max |p - cpu| {difference:.1e}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ml/shipped/fmnist.safetensors")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--levels", default="1,8,64,256,1024")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--max-batch-size", type=int, default=256)
    parser.add_argument(
        "--check-forms", action="store_true", help="first load every example form on the device"
    )
    args = parser.parse_args()
    if args.check_forms:
        check_forms(args.device)

    if args.device == "cpu":  # as the worker lays out passes and threads
        layout = inference_layout(usable_cores(), on_gpu=False)
        torch.set_num_threads(layout.threads)
    started = time.perf_counter()
    served = load_model(args.model, device=args.device, precision=args.precision)
    print(
        f"loaded {served} runtime={served.description.runtime} in "
        f"{time.perf_counter() - started:.1f} s"
    )
    if served.device.type == "cuda":
        print(f"GPU: {torch.cuda.get_device_name(served.device)}, torch {torch.__version__}")
    images = test_images(served, 10000)
    for callers in (int(level) for level in args.levels.split(",")):
        asyncio.run(one_level(served, images, callers, args.seconds, args.max_batch_size))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
