"""Worker swap benchmark: submit-to-result latency under steady load, before, during and after every
v1 worker is replaced by a v2 worker, on Tansu (issue 15, item 5).

    .venv/bin/python -m bench.swap --rate 25 --steady 10 --after 10
    .venv/bin/python -m bench.swap --via-group --via-weights --rounds 2   # both, alternating

Per run a fresh Tansu (`--partitions` partitions), one `fmnist gateway`, `--workers` v1 `fmnist
worker` processes on `--checkpoint`; v2 is the same weights with another calibration temperature
(another served version, same labels). One client submits single PNGs at `--rate` per second and
reads every result from the websocket stream. After `--steady` s the swap starts; the load goes on
`--after` s once it ended. Two procedures:

- `--via-group` (the default): `--workers` v2 workers start and join the model's shared group; once
  they consume, the v1 workers are SIGTERMed one at a time, each once the groups formed again
  (`Stack.retire_workers`; `--together`: all at once), and drain.
- `--via-weights`: weights {v1: 100}; the v2 workers start (their own version group carries no
  traffic yet); once the gateway lists v2 as ready, weights {v2: 100}; once v1 answered what it was
  sent, the v1 workers are retired one at a time; the split is cleared
  (`tests.e2e.swap.swap_via_weights`, docs/rollout.md "Replacing a version without a pause").

Both given: `--rounds` runs of each, alternating, and one table. Latency is from the submit call to
the result's arrival on the stream; a request belongs to the phase in which it was submitted:
steady (before the swap's first step), swap (until its last step), after.
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

TABLE_HEAD = [
    "| run | phase | requests | p50 ms | p99 ms | max ms | p99 / steady p99 |",
    "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
]


def phase_rows(label: str, run: SwapRun) -> list[str]:
    """Rows of the Markdown table for one run: its three phases."""
    phases = [
        ("steady", run.latencies_ms(end=run.swap_started)),
        ("swap", run.latencies_ms(run.swap_started, run.swap_ended)),
        ("after", run.latencies_ms(start=run.swap_ended)),
    ]
    steady_p99 = percentile(phases[0][1], 99)
    rows = []
    for name, values in phases:
        p99 = percentile(values, 99)
        rows.append(
            f"| {label} | {name} | {len(values)} | {percentile(values, 50):.0f} | {p99:.0f} | "
            f"{max(values, default=float('nan')):.0f} | {p99 / steady_p99:.2f} |"
        )
    return rows


def counts(label: str, run: SwapRun) -> str:
    """The counts the test checks, for one run."""
    accepted = run.accepted
    results = run.delivery.of(accepted)
    failed = sum(1 for r in results.values() if r.status != "completed")
    return (
        f"{label}: accepted {len(accepted)}, refused {len(run.refused)}, failed {failed}, "
        f"lost {len(run.delivery.missing(accepted))}, "
        f"delivered twice {len(run.delivery.duplicated(accepted))}; "
        f"swap took {run.swap_ended - run.swap_started:.1f} s; "
        f"v1 exit codes {run.drain_exit_codes}"
    )


def report(runs: Sequence[tuple[str, SwapRun]]) -> list[str]:
    """A Markdown table of every run's three phases, then each run's counts."""
    rows = [row for label, run in runs for row in phase_rows(label, run)]
    return [*TABLE_HEAD, *rows, "", *(counts(label, run) for label, run in runs)]


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
    parser.add_argument(
        "--via-group",
        action="store_true",
        help="swap through the model's shared group (the default when neither is given)",
    )
    parser.add_argument(
        "--via-weights",
        action="store_true",
        help="swap through the version topics by traffic weights",
    )
    parser.add_argument("--rounds", type=int, default=1, help="runs of each procedure, alternating")
    parser.add_argument("--logs", type=Path, default=None)
    args = parser.parse_args(argv)

    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    modes = [
        m for m, on in (("via-group", args.via_group), ("via-weights", args.via_weights)) if on
    ]
    modes = modes or ["via-group"]
    log_dir = args.logs or Path(tempfile.mkdtemp(prefix="fmnist-bench-swap-"))
    pngs, _ = load_test_pngs(DATA_DIR, 256)
    v2 = recalibrated_checkpoint(args.checkpoint, log_dir / "v2")
    print(f"# {machine_context()}; checkpoint {args.checkpoint}; logs in {log_dir}")
    print(
        f"# {args.workers} + {args.workers} workers, {args.partitions} partitions, "
        f"{args.rate:g} requests/s, {args.steady:g} s steady, {args.after:g} s after, "
        f"v1 workers stopped {'together' if args.together else 'one by one'}; "
        f"{args.rounds} round(s) of {', '.join(modes)}"
    )
    runs = []
    for round_ in range(1, args.rounds + 1):
        for mode in modes:
            label = f"{mode} {round_}" if args.rounds > 1 else mode
            runs.append((label, one_run(args, mode, label, pngs, v2, log_dir)))
            print("\n".join([*TABLE_HEAD, *phase_rows(*runs[-1])]), flush=True)
    print()
    print("\n".join(report(runs)))
    return 0


def one_run(
    args: argparse.Namespace, mode: str, label: str, pngs: list[bytes], v2: Path, log_dir: Path
) -> SwapRun:
    """One swap by `mode` on a fresh stack."""
    old = [f"v1-{i}" for i in range(args.workers)]
    new = [f"v2-{i}" for i in range(args.workers)]
    options = f"&partitions={args.partitions}"
    run_dir = log_dir / label.replace(" ", "-")
    with kafka_stack(run_dir, args.checkpoint, "tansu", url_options=options) as stack:
        stack.ensure_workers(*old)
        stack.start_gateway()
        return asyncio.run(
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
                via_weights=mode == "via-weights",
            )
        )


if __name__ == "__main__":
    raise SystemExit(main())
