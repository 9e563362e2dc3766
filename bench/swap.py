"""Worker swap benchmark: submit-to-result latency under steady load, before, during and after every
v1 worker is replaced by a v2 worker, on Tansu (issue 15, item 5).

    .venv/bin/python -m bench.swap --rate 25 --steady 10 --after 10

A fresh Tansu (`--partitions` partitions), one `fmnist gateway`, `--workers` v1 `fmnist worker`
processes on `--checkpoint`; v2 is the same weights with another calibration temperature (another
served version, same labels). One client submits single PNGs at `--rate` per second and reads every
result from the websocket stream. After `--steady` s, `--workers` v2 workers start; once they
consume, the v1 workers are SIGTERMed one at a time, each once the groups formed again
(`Stack.retire_workers`; `--together`: all at once), and drain; the load goes on `--after` s.
Latency is from the submit call to the result's arrival on the stream; a request belongs to the
phase in which it was submitted: steady (before the first v2 worker started), swap (until the groups
formed without the last v1 worker), after.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(
    0, str(Path(__file__).resolve().parents[1])
)  # the repo root, for bench, tests and ml

from bench.http_single import DATA_DIR, REPO_ROOT, machine_context
from tests.e2e.images import load_test_pngs
from tests.e2e.processes import kafka_stack
from tests.e2e.swap import SwapRun, percentile, recalibrated_checkpoint, swap_under_load


def report(run: SwapRun) -> list[str]:
    """A Markdown table of the three phases, and the counts the test checks."""
    phases = [
        ("steady", run.latencies_ms(end=run.swap_started)),
        ("swap", run.latencies_ms(run.swap_started, run.swap_ended)),
        ("after", run.latencies_ms(start=run.swap_ended)),
    ]
    steady_p99 = percentile(phases[0][1], 99)
    lines = [
        "| phase | requests | p50 ms | p99 ms | max ms | p99 / steady p99 |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, values in phases:
        p99 = percentile(values, 99)
        lines.append(
            f"| {name} | {len(values)} | {percentile(values, 50):.0f} | {p99:.0f} | "
            f"{max(values, default=float('nan')):.0f} | {p99 / steady_p99:.2f} |"
        )
    accepted = run.accepted
    results = run.delivery.of(accepted)
    failed = sum(1 for r in results.values() if r.status != "completed")
    lines.append("")
    lines.append(
        f"accepted {len(accepted)}, refused {len(run.refused)}, failed {failed}, "
        f"lost {len(run.delivery.missing(accepted))}, "
        f"delivered twice {len(run.delivery.duplicated(accepted))}; "
        f"swap took {run.swap_ended - run.swap_started:.1f} s; "
        f"v1 exit codes {run.drain_exit_codes}"
    )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--checkpoint", type=Path, default=REPO_ROOT / "models" / "fmnist.safetensors"
    )
    parser.add_argument("--workers", type=int, default=2, help="workers of each version")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--rate", type=float, default=25.0, help="submissions per second")
    parser.add_argument("--steady", type=float, default=10.0, help="seconds of load before")
    parser.add_argument("--after", type=float, default=10.0, help="seconds of load after")
    parser.add_argument(
        "--together",
        action="store_true",
        help="SIGTERM the v1 workers at once (Tansu 0.6.0 then never re-forms the group)",
    )
    parser.add_argument("--logs", type=Path, default=None)
    args = parser.parse_args(argv)

    log_dir = args.logs or Path(tempfile.mkdtemp(prefix="fmnist-bench-swap-"))
    pngs, _ = load_test_pngs(DATA_DIR, 256)
    v2 = recalibrated_checkpoint(args.checkpoint, log_dir / "v2")
    old = [f"v1-{i}" for i in range(args.workers)]
    new = [f"v2-{i}" for i in range(args.workers)]
    print(f"# {machine_context()}; checkpoint {args.checkpoint}; logs in {log_dir}")
    print(
        f"# {args.workers} + {args.workers} workers, {args.partitions} partitions, "
        f"{args.rate:g} requests/s, {args.steady:g} s steady, {args.after:g} s after, "
        f"v1 workers stopped {'together' if args.together else 'one by one'}"
    )
    options = f"&partitions={args.partitions}"
    with kafka_stack(log_dir, args.checkpoint, "tansu", url_options=options) as stack:
        stack.ensure_workers(*old)
        stack.start_gateway()
        run = asyncio.run(
            swap_under_load(
                stack,
                "gateway",
                pngs,
                rate=args.rate,
                steady_s=args.steady,
                after_s=args.after,
                old=old,
                new=new,
                new_checkpoint=v2,
                together=args.together,
            )
        )
    print("\n".join(report(run)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
