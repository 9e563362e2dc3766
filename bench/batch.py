"""Batch endpoint benchmark: `POST /v1/predictions:batch?wait=` images/s vs the model's raw compute ceiling.

    .venv/bin/python -m bench.batch --duration 20
    .venv/bin/python -m bench.batch --broker kafka   # gateway + worker processes on Tansu instead

The ceiling is `ImageClassifier.predict` on real test images, in this process, at its best batch
size (nothing else running), with the workers' precision and passes side by side. The endpoint figure is end-to-end through `fmnist serve` (gateway +
worker + memory broker): multipart uploads of `--per-request` real test PNGs each, from wrk at
`--connections` connections, counting only images whose request answered 200 (all completed).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(
    0, str(Path(__file__).resolve().parents[1])
)  # the repo root, for bench, tests and ml

from bench.http_single import (
    DATA_DIR,
    REPO_ROOT,
    TABLE_HEADER,
    machine_context,
    measure,
    multipart_body,
    ours_kafka,
    ours_memory,
    write_bodies,
)
from tests.e2e.images import load_test_images, load_test_pngs

BATCH_SIZES = (32, 64, 128, 256, 512, 1024, 2048)


def compute_ceiling(
    checkpoint: Path, images: int = 4096, min_seconds: float = 2.0
) -> list[tuple[int, float]]:
    """images/s of `ImageClassifier.predict` at each batch size, on real test images (uint8 N×1×28×28),
    laid out as the server's workers compute: the same precision (`FMNIST_INFERENCE_PRECISION`,
    `auto` by default) and the same passes side by side (`worker_layout`: on 2 cores, two threads
    each running its own passes on one torch thread)."""
    import threading

    import torch

    from app.settings import Settings
    from app.worker.inference import resolve_precision, worker_layout
    from ml import ImageClassifier

    settings = Settings()
    # CPU on purpose: the claim is about this machine's cores (ImageClassifier picks CUDA when present).
    classifier = ImageClassifier.load(
        checkpoint, device="cpu", precision=resolve_precision(settings.inference_precision)
    )
    layout = worker_layout(settings, classifier)
    torch.set_num_threads(layout.threads)
    pixels, _ = load_test_images(DATA_DIR, images)
    data = torch.from_numpy(pixels.copy()).unsqueeze(1)
    print(
        f"# ceiling layout: precision {classifier.precision}, {layout.concurrency} passes side by side, "
        f"{layout.threads} torch thread(s) each"
    )
    rates = []
    for batch_size in BATCH_SIZES:
        batches = list(data.split(batch_size))
        classifier.predict(batches[0])  # warm-up: allocator, kernels, the traced graph
        done = [0] * layout.concurrency
        deadline = time.perf_counter() + min_seconds

        def run(
            slot: int,
            batches: list[torch.Tensor] = batches,
            done: list[int] = done,
            deadline: float = deadline,
        ) -> None:
            with torch.inference_mode():
                while time.perf_counter() < deadline:
                    for batch in batches[slot :: layout.concurrency] or batches:
                        classifier.predict(batch)
                        done[slot] += len(batch)

        started = time.perf_counter()
        threads = [threading.Thread(target=run, args=(i,)) for i in range(layout.concurrency)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        rates.append((batch_size, sum(done) / (time.perf_counter() - started)))
    return rates


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--checkpoint", type=Path, default=REPO_ROOT / "models" / "fmnist.safetensors"
    )
    parser.add_argument("--broker", choices=["memory", "kafka"], default="memory")
    parser.add_argument("--per-request", type=int, default=256, help="images per batch request")
    parser.add_argument("--connections", type=int, nargs="+", default=[4])
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--skip-ceiling", action="store_true")
    parser.add_argument("--logs", type=Path, default=None)
    args = parser.parse_args(argv)

    log_dir = args.logs or Path(tempfile.mkdtemp(prefix="fmnist-bench-batch-"))
    print(f"# {machine_context()}; checkpoint {args.checkpoint}; logs in {log_dir}")
    best = None
    if not args.skip_ceiling:
        rates = compute_ceiling(args.checkpoint)
        print("| batch size | images/s (ImageClassifier.predict, in-process) |\n| ---: | ---: |")
        for batch_size, rate in rates:
            print(f"| {batch_size} | {rate:,.0f} |")
        best = max(rates, key=lambda r: r[1])
        print(f"# ceiling: {best[1]:,.0f} images/s at batch size {best[0]}", flush=True)

    pngs, _ = load_test_pngs(DATA_DIR, 1024)
    groups = [pngs[i : i + args.per_request] for i in range(0, len(pngs), args.per_request)]
    groups = [g for g in groups if len(g) == args.per_request]
    bodies = write_bodies(log_dir / "batch", [multipart_body(g, "files") for g in groups])
    launcher = ours_memory if args.broker == "memory" else ours_kafka
    results = []
    with launcher(args.checkpoint, log_dir) as server:
        server.path = "/v1/predictions:batch?wait=30"
        for connections in args.connections:
            result = measure(
                f"batch endpoint ({args.broker}), {args.per_request}/request, {connections} conn",
                server,
                bodies,
                len(groups),
                connections=connections,
                duration_s=args.duration,
                warmup_s=args.warmup,
                images_per_request=args.per_request,
            )
            results.append(result)
            print(f"# {result.row()}", flush=True)
    print(TABLE_HEADER.replace("p50 ms | p99 ms", "p50 ms per request | p99 ms per request"))
    for result in results:
        print(result.row())
    if best is not None:
        top = max(r.images_per_s for r in results)
        print(
            f"# endpoint / ceiling = {top / best[1]:.0%}; goal 10,000 images/s: {'met' if top >= 10_000 else 'MISSED'}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
