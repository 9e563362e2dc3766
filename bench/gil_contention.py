"""How much a busy Python thread (a server's event loop) slows each way of running the forward pass.

    .venv/bin/python -m bench.gil_contention [--model models/fmnist.safetensors] [--batch-size 64]
        [--precision fp32|bf16] [--candidates eager,torchscript,compile,aoti] [--rounds 3]

Builds the whole inference pass of the checkpoint (fused network, temperature, softmax) once per
candidate: the eager module, a frozen TorchScript trace, `torch.compile`, and `torch.export` +
AOTInductor (`aoti_compile_and_package` / `aoti_load_package`). Prints the build cost of each, then,
for a few alternating rounds (the machine is shared: alternation spreads its noise over every
candidate), ms per batch alone and beside a thread that keeps the GIL busy with pure-Python work.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from ml import ImageClassifier
from ml.classifier import _Probabilities
from ml.model import bf16_for_inference, fused_for_inference

Forward = Callable[[torch.Tensor], torch.Tensor]


def ms_per_batch(forward: Callable[[], object], seconds: float) -> float:
    started, count = time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        forward()
        count += 1
    return (time.perf_counter() - started) / count * 1000.0


def build(name: str, whole_pass: torch.nn.Module, example: torch.Tensor) -> Forward:
    """The whole pass run by candidate `name`, built and warmed up on `example`."""
    if name == "eager":
        return whole_pass
    if name == "torchscript":
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.freeze(torch.jit.trace(whole_pass, example, check_trace=False))  # type: ignore[no-any-return]
    if name == "compile":
        compiled = torch.compile(whole_pass, dynamic=True)
        with torch.inference_mode():
            compiled(example)
        return compiled  # type: ignore[return-value]
    if name == "aoti":
        batch = torch.export.Dim("batch", min=1, max=4096)
        program = torch.export.export(whole_pass, (example,), dynamic_shapes=({0: batch},))
        package = Path(tempfile.mkdtemp()) / "pass.pt2"
        torch._inductor.aoti_compile_and_package(program, package_path=str(package))
        return torch._inductor.aoti_load_package(str(package))  # type: ignore[no-any-return]
    raise ValueError(f"unknown candidate {name!r}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/fmnist.safetensors")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--candidates", default="eager,torchscript,compile,aoti")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads per pass")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    classifier = ImageClassifier.load(args.model, device="cpu")
    network = fused_for_inference(classifier.network)
    if args.precision == "bf16":
        network = bf16_for_inference(network)
    whole_pass = _Probabilities(network, classifier.temperature).eval()
    images = torch.randint(0, 256, (args.batch_size, *classifier.input_shape), dtype=torch.uint8)

    names = [n.strip() for n in args.candidates.split(",") if n.strip()]
    forwards: dict[str, Forward] = {}
    for name in names:
        started = time.perf_counter()
        forwards[name] = build(name, whole_pass, images)
        with torch.inference_mode():
            reference = whole_pass(images)
            got = forwards[name](images)
        error = float((got - reference).abs().max())
        print(
            f"{name:12} build {time.perf_counter() - started:6.1f} s   max |p - eager| {error:.1e}"
        )

    stop = threading.Event()

    def keep_the_gil_busy() -> None:
        while not stop.is_set():
            total = 0
            for i in range(1000):
                total += i

    def run(forward: Forward) -> Callable[[], object]:
        def once() -> object:
            with torch.inference_mode():
                return forward(images)

        return once

    alone: dict[str, list[float]] = {n: [] for n in names}
    beside: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(args.rounds):
        for name in names:
            alone[name].append(ms_per_batch(run(forwards[name]), args.seconds))
            stop.clear()
            busy = threading.Thread(target=keep_the_gil_busy)
            busy.start()
            beside[name].append(ms_per_batch(run(forwards[name]), args.seconds))
            stop.set()
            busy.join()
    print(
        f"batch {args.batch_size}, {args.precision}, {args.threads} torch thread(s), "
        f"{args.rounds} alternating rounds: median (min–max) ms per batch"
    )
    for name in names:
        a, b = alone[name], beside[name]
        print(
            f"{name:12} alone {statistics.median(a):7.2f} ({min(a):.2f}–{max(a):.2f})   "
            f"beside a busy Python thread {statistics.median(b):7.2f} ({min(b):.2f}–{max(b):.2f})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
