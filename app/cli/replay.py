"""`fmnist replay`: re-run a model's retained requests through a candidate version and report how
the candidate compares with what the live version answered, without touching any client.

Reads the model's requests topic (`requests_topic_for`) from a time, or its last N requests, in a
consumer group of its own (the live workers' group and position are never touched), runs them
through the candidate in-process (`ml.serving.load_model`, batched by a `ModelRunner`), reads the
live results of the same window from the results topic (its own group too), joins the two by request
id (`app.rollout.compare`) and writes the report (`app.rollout.report`).

It needs a broker that keeps a log other processes can read: Kafka (retention) or Pub/Sub (seek).
The embedded broker (`memory://`) lives inside `fmnist serve`'s process, out of this one's reach:
`fmnist serve` replays there itself (`POST /v1/models/{name}/replay`, `app.cli.serve_replay`, which
reuses the window, the candidate's runner and the join defined here).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from app.cli.prologue import INVALID_SETTING_STATUS, start_command
from app.cli.replay_engine import QUIET_S, replay
from app.logs import kv

logger = logging.getLogger("app.replay")

_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)")
_UNIT_S = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "replay",
        help="re-run a model's retained requests through a candidate version and compare",
        description=(
            "Re-run the requests a model received (from --since TIME, or its --last N) through a "
            "candidate version loaded in this process, join them with what the live version answered, "
            "and write a report (Markdown with plots: agreement, the live-vs-candidate confusion "
            "matrix, accuracy on requests whose metadata carries a `label`, latency) to --out. Clients "
            "see nothing: the replay reads in consumer groups of its own and publishes nothing. "
            "It needs a broker that keeps the log: Kafka (retention) or Pub/Sub (seek). The embedded "
            "broker (memory://) lives inside `fmnist serve`'s process, so this command cannot reach it: "
            "there, POST /v1/models/NAME/replay replays inside `fmnist serve`."
        ),
    )
    parser.add_argument("--model", required=True, metavar="NAME", help="the live model's name")
    parser.add_argument(
        "--version",
        required=True,
        dest="candidate",
        metavar="CANDIDATE",
        help="the candidate: a checkpoint (.safetensors), an exported program (.pt2, or TorchScript "
        ".pt, with its spec beside it) or package.module:Class, as `fmnist worker --model` takes",
    )
    _add_window_arguments(parser)
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="DIR",
        help="where the report goes (default: replay-MODEL-YYYYMMDD-HHMMSS)",
    )
    parser.add_argument(
        "--broker",
        metavar="URL",
        help="broker URL, kafka://host:9092 or gcp://PROJECT (FMNIST_BROKER_URL)",
    )
    _add_candidate_runtime_arguments(parser)
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bars (for logs and CI)"
    )
    parser.set_defaults(func=run)


def _add_window_arguments(parser: argparse.ArgumentParser) -> None:
    """--since / --last (one of them) and --quiet: which requests the replay reads, and when it
    has read them all."""
    window = parser.add_mutually_exclusive_group(required=True)
    window.add_argument(
        "--since",
        metavar="TIME",
        type=_since_argument,
        help="replay the requests from TIME: an ISO time (2026-12-01T10:00, local unless it has "
        "an offset) or a time ago (90s, 10m, 2h, 1d)",
    )
    window.add_argument(
        "--last",
        metavar="N",
        type=_positive_int,
        help="replay the last N requests the broker still holds",
    )
    parser.add_argument(
        "--quiet",
        type=float,
        default=QUIET_S,
        metavar="SECONDS",
        help="caught up once nothing from the window arrived for this long (default: %(default)g)",
    )


def _add_candidate_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    """--device, --precision and --runtime: how the candidate runs in this process."""
    parser.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        help="where the candidate runs (FMNIST_DEVICE; auto: CUDA when available)",
    )
    parser.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        help="the candidate's arithmetic (FMNIST_INFERENCE_PRECISION); the workers' own gives "
        "comparable answers",
    )
    parser.add_argument(
        "--runtime",
        choices=["auto", "aoti", "eager"],
        default="auto",
        help="the candidate's CPU runtime; eager skips compiling (default: %(default)s, as workers)",
    )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parse_since(text: str, now: float) -> float:
    """Unix seconds for `--since`: an ISO time (naive means local time), or a time before `now`
    (`90s`, `10m`, `2h`, `1d`, or bare seconds). ValueError on anything else or a future time."""
    duration = _DURATION.fullmatch(text.strip())
    if duration:
        amount, unit = duration.groups()
        return now - float(amount) * _UNIT_S[unit]
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"{text!r} is neither an ISO time (2026-12-01T10:00) nor a time ago (90s, 10m, 2h, 1d)"
        ) from None
    since = moment.timestamp()  # a naive time is taken as local time
    if since > now:
        raise ValueError(f"{text!r} is in the future")
    return since


def _since_argument(text: str) -> float:
    try:
        return parse_since(text, time.time())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    overrides = {
        "broker_url": args.broker,
        "device": args.device,
        "inference_precision": args.precision,
    }
    settings = start_command("replay", overrides, runs_model=True)
    if settings is None:
        return INVALID_SETTING_STATUS
    if settings.broker_url.startswith("memory://"):
        print(
            "fmnist replay: the embedded broker (memory://) lives inside `fmnist serve`'s process, "
            "so another process cannot read its requests; replay inside it with POST "
            f"/v1/models/{args.model}/replay (docs/rollout.md), or pass --broker kafka://HOST:9092 "
            "or gcp://PROJECT (FMNIST_BROKER_URL)",
            file=sys.stderr,
        )
        return INVALID_SETTING_STATUS
    if args.quiet <= 0:
        print(f"fmnist replay: --quiet must be > 0 seconds, got {args.quiet:g}", file=sys.stderr)
        return INVALID_SETTING_STATUS
    out_dir = args.out or Path(f"replay-{args.model}-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        outcome = asyncio.run(
            replay(
                settings,
                model=args.model,
                candidate=args.candidate,
                since=args.since,
                last=args.last,
                quiet_s=args.quiet,
                runtime=args.runtime,
                out_dir=out_dir,
                progress=not args.no_progress,
            )
        )
    except Exception as exc:
        return replay_failed(exc, "replay")
    if outcome.summary is None or outcome.report is None:
        print(
            f"fmnist replay: no request of model {args.model!r} retained in the window; check "
            "--model, --since/--last and the topic's retention",
            file=sys.stderr,
        )
        return 1
    for line in outcome.summary.headline():
        print(line)
    if outcome.missing_live:
        print(f"no live result for {outcome.missing_live} of {outcome.replayed} replayed requests")
    print(f"report         {outcome.report}")
    return 0


def replay_failed(exc: Exception, command: str) -> int:
    """Print why the replay of `fmnist COMMAND` could not run, with what to change; returns the exit
    status. Re-raises what no flag or setting can fix."""
    import messaging
    from ml.checkpoint import CheckpointError
    from ml.serving import ModelLoadError

    if isinstance(exc, ModelLoadError | CheckpointError | FileNotFoundError):
        fix = (
            "--version takes what `fmnist worker --model` takes (docs/model.md)"
            if command == "replay"
            else "CANDIDATE with --replay-last is what `fmnist worker --model` takes (docs/model.md)"
        )
    elif isinstance(exc, messaging.MessagingError):
        fix = "check --broker / FMNIST_BROKER_URL"
    elif isinstance(exc, ValueError):
        fix = "check --model and the flags"
    else:
        raise exc
    logger.error(kv("replay_failed", error=exc, fix=fix))
    print(f"fmnist {command}: {exc} ({fix})", file=sys.stderr)
    return 1
