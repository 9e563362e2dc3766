"""Scaling benchmark: images/s through the batch endpoint with 1, 2 and 4 workers (and partitions) on Tansu.

    .venv/bin/python -m bench.scaling --duration 15

For each worker count N: a fresh Tansu, N `fmnist worker` processes, one `fmnist gateway`, topics
created with `--partitions` partitions (default: N, so each worker owns one or more). Load is the
batch endpoint (256 real test PNGs per request, wrk at 4 connections) so that the workers, not
the HTTP layer, are what is measured. CPU seconds are split by process (gateway, workers, broker,
wrk): on 2 cores, that split is what says where the limit is.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(
    0, str(Path(__file__).resolve().parents[1])
)  # the repo root, for bench, tests and ml

from bench.http_single import (
    DATA_DIR,
    DEFAULT_KAFKA_OPTIONS,
    REPO_ROOT,
    group_cpu_seconds,
    machine_context,
    multipart_body,
    ours_kafka,
    run_wrk,
    write_bodies,
)
from tests.e2e.images import load_test_pngs


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--checkpoint", type=Path, default=REPO_ROOT / "models" / "fmnist.safetensors"
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--partitions", type=int, default=None, help="default: one per worker")
    parser.add_argument("--per-request", type=int, default=256)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--logs", type=Path, default=None)
    parser.add_argument(
        "--kafka-options", default=DEFAULT_KAFKA_OPTIONS, help="broker URL query string"
    )
    args = parser.parse_args(argv)

    log_dir = args.logs or Path(tempfile.mkdtemp(prefix="fmnist-bench-scaling-"))
    pngs, _ = load_test_pngs(DATA_DIR, 1024)
    groups = [pngs[i : i + args.per_request] for i in range(0, len(pngs), args.per_request)]
    bodies = write_bodies(log_dir / "batch", [multipart_body(g, "files") for g in groups])
    print(f"# {machine_context()}; checkpoint {args.checkpoint}; logs in {log_dir}")
    rows = []
    for workers in args.workers:
        partitions = args.partitions or workers
        with ours_kafka(
            args.checkpoint,
            log_dir,
            workers=workers,
            partitions=partitions,
            options=args.kafka_options,
        ) as server:
            server.path = "/v1/predictions:batch?wait=30"
            run_wrk(
                server.url,
                server.path,
                bodies,
                len(groups),
                connections=args.connections,
                duration_s=args.warmup,
            )
            roles = {
                "gateway": {p.pid for p in server.processes if p.name == "bench-gateway"},
                "workers": {p.pid for p in server.processes if p.name.startswith("bench-worker")},
                "broker": {p.pid for p in server.processes if p.name == "bench-tansu"},
            }
            before = {role: group_cpu_seconds(pids) for role, pids in roles.items()}
            summary, wrk_cpu = run_wrk(
                server.url,
                server.path,
                bodies,
                len(groups),
                connections=args.connections,
                duration_s=args.duration,
            )
            used = {role: group_cpu_seconds(pids) - before[role] for role, pids in roles.items()}
        seconds = summary["duration_us"] / 1e6
        images_per_s = summary["completed"] * args.per_request / seconds
        share = {role: cpu / seconds / 2 for role, cpu in {**used, "wrk": wrk_cpu}.items()}
        row = (
            f"| {workers} | {partitions} | {images_per_s:,.0f} | {summary['p50_us'] / 1000:.0f} | "
            f"{summary['p99_us'] / 1000:.0f} | {summary['requests'] - summary['completed']} | "
            f"{share['gateway']:.0%} | {share['workers']:.0%} | {share['broker']:.0%} | {share['wrk']:.0%} |"
        )
        rows.append(row)
        print(f"# {row}", flush=True)
    print(
        "| workers | partitions | images/s | p50 ms/request | p99 ms/request | non-200 | "
        "gateway CPU | workers CPU | Tansu CPU | wrk CPU |\n"
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    )
    print("\n".join(rows))
    print("# CPU columns: share of the machine's 2 cores over the measured run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
