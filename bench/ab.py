"""Interleaved A/B of `fmnist serve` settings: which configuration serves more images/s, on this machine, now.

    .venv/bin/python -m bench.ab --mode batch "FMNIST_MAX_BATCH_SIZE=32" "FMNIST_MAX_BATCH_SIZE=128"
    .venv/bin/python -m bench.ab --mode single --rounds 3 "" "FMNIST_INFERENCE_CONCURRENCY=1"
    .venv/bin/python -m bench.ab --broker kafka --mode single "" "KAFKA_OPTIONS=linger_ms=0"
    .venv/bin/python -m bench.ab --mode single "TREE=/work/wt/before" ""

`TREE=DIR` in a configuration serves the code of another checkout (e.g. a `git worktree` of an older
commit) with this one's Python and packages, for a before/after of code.

Each argument is one configuration: space-separated `FMNIST_*=value` settings for the server (`""`
is the defaults); with `--broker kafka`, `KAFKA_OPTIONS=a=1&b=2` sets the broker URL's query string
(default: none, the backend's defaults) and `WORKERS=n` the number of worker processes (default 1).
Every round starts a fresh server per configuration (`fmnist
serve`, or Tansu + `fmnist worker` + `fmnist gateway` processes), in turn, warms it up
and measures it with wrk: `--mode batch` sends `POST /v1/predictions:batch?wait=30` with 256 real
test PNGs per request at 4 connections, `--mode single` one PNG per `POST /v1/predictions?wait=10`
at 64 connections. Shared machines drift by tens of percent within minutes, so only configurations
measured in the same run, round by round, are compared; the medians are the verdict. Each round
also prints the batch size the results came in (per image, from the gateway's `/metrics`) and the
server's CPU, so that a policy that answers sooner can be checked for batches that stopped filling,
and each server process's CPU per image (µs, from /proc during the measured run: the broker, the
worker, the gateway), which holds up on a shared machine better than images/s.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path

sys.path.insert(
    0, str(Path(__file__).resolve().parents[1])
)  # the repo root, for bench, tests and ml

from bench.http_single import (
    DATA_DIR,
    REPO_ROOT,
    Server,
    group_cpu_seconds,
    machine_context,
    measure,
    multipart_body,
    ours_kafka,
    ours_memory,
    run_wrk,
    write_bodies,
)
from tests.e2e.images import load_test_pngs


def parse_configuration(text: str) -> dict[str, str]:
    settings = {}
    for item in text.split():
        name, sep, value = item.partition("=")
        if not sep or not (name.startswith("FMNIST_") or name in (KAFKA_OPTIONS, TREE, WORKERS)):
            raise SystemExit(
                f"expected FMNIST_NAME=value, {KAFKA_OPTIONS}=query, {TREE}=dir or {WORKERS}=n, got {item!r}"
            )
        settings[name] = value
    return settings


KAFKA_OPTIONS = "KAFKA_OPTIONS"
TREE = "TREE"
WORKERS = "WORKERS"  # worker processes on Kafka (default 1)


def server_for(
    broker: str, checkpoint: Path, log_dir: Path, settings: dict[str, str]
) -> AbstractContextManager[Server]:
    """A fresh server of `broker` with `settings` (and, on Kafka, its URL query)."""
    env = {k: v for k, v in settings.items() if k not in (KAFKA_OPTIONS, TREE, WORKERS)}
    if TREE in settings:
        # Import app, ml and messaging from that checkout: its root on the path, the working
        # directory (this checkout) off it.
        env |= {"PYTHONPATH": str(Path(settings[TREE]).resolve()), "PYTHONSAFEPATH": "1"}
    if broker == "kafka":
        options = settings.get(KAFKA_OPTIONS, "")
        workers = int(settings.get(WORKERS, "1"))
        return ours_kafka(checkpoint, log_dir, options=options, workers=workers, **env)  # type: ignore[arg-type]
    for kafka_only in (KAFKA_OPTIONS, WORKERS):
        if kafka_only in settings:
            raise SystemExit(f"{kafka_only} needs --broker kafka")
    return ours_memory(checkpoint, log_dir, **env)


def mean_batch_size(server: Server) -> float | None:
    """The batch size the server's results came in, averaged per image (warm-up included), from
    the gateway's `fmnist_batch_size` histogram; None when /metrics does not have it."""
    import httpx

    try:
        text = httpx.get(f"{server.url}/metrics", timeout=10).text
    except httpx.HTTPError:
        return None
    values = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in ("fmnist_batch_size_sum", "fmnist_batch_size_count"):
            values[name] = float(value)
    count = values.get("fmnist_batch_size_count")
    return values["fmnist_batch_size_sum"] / count if count else None


def process_cpu_seconds(server: Server) -> dict[str, float]:
    """CPU seconds used so far by each of the server's processes (with its children), by role."""
    return {
        _role(proc.name): group_cpu_seconds({proc.pid})
        for proc in server.processes
        if proc.running()
    }


def _role(name: str) -> str:
    """`bench-worker-0` → `worker`, `bench-tansu` → `tansu`, `serve` → `serve`."""
    parts = name.split("-")
    return parts[1] if parts[0] == "bench" and len(parts) > 1 else name


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configurations", nargs="+", help='e.g. "FMNIST_MAX_BATCH_SIZE=32"')
    parser.add_argument("--mode", choices=["batch", "single"], default="batch")
    parser.add_argument("--broker", choices=["memory", "kafka"], default="memory")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=6.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--connections", type=int, default=None)
    parser.add_argument(
        "--checkpoint", type=Path, default=REPO_ROOT / "models" / "fmnist.safetensors"
    )
    args = parser.parse_args(argv)
    configurations = [
        (text or "defaults", parse_configuration(text)) for text in args.configurations
    ]

    log_dir = Path(tempfile.mkdtemp(prefix="fmnist-bench-ab-"))
    pngs, _ = load_test_pngs(DATA_DIR, 1024)
    if args.mode == "batch":
        per_request, path, connections = 256, "/v1/predictions:batch?wait=30", 4
        groups = [pngs[i : i + per_request] for i in range(0, len(pngs), per_request)]
        bodies = write_bodies(log_dir / "batch", [multipart_body(g, "files") for g in groups])
        body_count = len(groups)
    else:
        per_request, path, connections = 1, "/v1/predictions?wait=10", 64
        bodies = write_bodies(log_dir / "single", [multipart_body([p], "file") for p in pngs[:256]])
        body_count = 256
    connections = args.connections or connections
    print(
        f"# {machine_context()}; {args.broker} broker, mode {args.mode}, {connections} connections; "
        f"logs in {log_dir}"
    )

    rates: dict[str, list[float]] = {name: [] for name, _ in configurations}
    per_cpu_s: dict[str, list[float]] = {name: [] for name, _ in configurations}
    # Per configuration and process role: µs of that process's CPU per image answered, by round.
    us_per_image: dict[str, dict[str, list[float]]] = {name: {} for name, _ in configurations}
    for round_number in range(1, args.rounds + 1):
        for name, settings in configurations:
            with server_for(args.broker, args.checkpoint, log_dir, settings) as server:
                server.path = path
                # The warm-up here, so that each process's CPU is read around the measured run only.
                run_wrk(
                    server.url,
                    path,
                    bodies,
                    body_count,
                    connections=connections,
                    duration_s=args.warmup,
                )
                before = process_cpu_seconds(server)
                result = measure(
                    name,
                    server,
                    bodies,
                    body_count,
                    connections=connections,
                    duration_s=args.duration,
                    warmup_s=0,
                    images_per_request=per_request,
                )
                after = process_cpu_seconds(server)
                batch = mean_batch_size(server)
            images = max(result.completed * per_request, 1)
            for role, cpu_s in after.items():
                spent = cpu_s - before.get(role, cpu_s)
                us_per_image[name].setdefault(role, []).append(spent / images * 1e6)
            rates[name].append(result.images_per_s)
            per_cpu_s[name].append(result.images_per_cpu_s)
            print(
                f"# round {round_number}: {name}: {result.images_per_s:,.0f} images/s, "
                f"{result.images_per_cpu_s:,.0f} per server CPU-s, "
                f"p50 {result.p50_ms:.1f} ms, p99 {result.p99_ms:.1f} ms, "
                f"{result.not_completed} not completed, "
                f"mean batch size {batch or 0:.1f} per image, "
                f"server CPU {result.server_cpu_s / result.seconds / 2:.0%} of 2 cores; "
                "CPU µs per image: "
                + ", ".join(
                    f"{role} {values[-1]:.1f}" for role, values in us_per_image[name].items()
                ),
                flush=True,
            )
    # Images per server CPU-second hold up better than images/s when others load the machine.
    print(
        "| configuration | median images/s | rounds | median per server CPU-s |\n"
        "| --- | ---: | --- | ---: |"
    )
    for name, values in rates.items():
        rounds = " / ".join(f"{v:,.0f}" for v in values)
        cpu = statistics.median(per_cpu_s[name])
        print(f"| {name} | {statistics.median(values):,.0f} | {rounds} | {cpu:,.0f} |")
    print(
        "\n| configuration | process | median CPU µs per image | rounds |\n| --- | --- | ---: | --- |"
    )
    for name, roles in us_per_image.items():
        for role, values in roles.items():
            rounds = " / ".join(f"{v:.1f}" for v in values)
            print(f"| {name} | {role} | {statistics.median(values):.1f} | {rounds} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
