"""`fmnist serve`: gateway + worker + embedded broker in one process, the zero-setup way to run the service."""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path
from typing import Any

from app.cli.gateway import add_http_arguments, serve_http, settings_from_args
from app.cli.prologue import passive_torch_threads, tune_garbage_collector
from app.logs import configure_logging, kv
from app.settings import Settings

logger = logging.getLogger("app.serve")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="run gateway + worker + embedded broker in one process (the quick start)",
        description=(
            "Run everything in one process: the HTTP gateway, one inference worker and, by default, the "
            "embedded memory:// broker. Open http://127.0.0.1:8000/ for the demo page and /docs for the "
            "API. Settings come from FMNIST_* environment variables; the flags override them. SIGTERM "
            "or Ctrl-C stops the server, then the worker drains."
        ),
    )
    add_http_arguments(parser)
    parser.add_argument(
        "--model", metavar="PATH", type=Path, help="checkpoint to serve (FMNIST_MODEL_PATH)"
    )
    add_batching_arguments(parser)
    parser.set_defaults(func=run)


# Flag -> (setting, metavar, type, what it does); the setting's env var and default join the help.
BATCHING_FLAGS: dict[str, tuple[str, str, type, str]] = {
    "--max-batch-size": ("max_batch_size", "N", int, "largest batch when the queue is deep"),
    "--preferred-batch-size": (
        "preferred_batch_size",
        "N",
        int,
        "batch size that counts as full when the queue is shallow",
    ),
    "--max-wait-ms": (
        "max_wait_ms",
        "MS",
        float,
        "longest wait for a batch to fill, from its oldest image",
    ),
    "--inference-concurrency": (
        "inference_concurrency",
        "N",
        int,
        "forward passes run side by side (default: the usable cores, at most 4; 1 on a GPU)",
    ),
    "--inference-threads": (
        "inference_threads",
        "N",
        int,
        "torch threads per forward pass (default: cores / concurrency)",
    ),
}


def add_batching_arguments(parser: argparse.ArgumentParser) -> None:
    """The worker's batching and concurrency settings as flags, each overriding its FMNIST_ variable."""
    group = parser.add_argument_group(
        "batching", "how the in-process worker batches images (flags override FMNIST_* variables)"
    )
    for flag, (name, metavar, kind, what) in BATCHING_FLAGS.items():
        default = Settings.model_fields[name].default
        shown = f", default {default}" if default is not None else ""
        group.add_argument(
            flag,
            dest=name,
            metavar=metavar,
            type=kind,
            help=f"{what} (FMNIST_{name.upper()}{shown})",
        )


def batching_overrides(args: argparse.Namespace) -> dict[str, object]:
    """The batching settings given as flags (unset flags leave the environment's value)."""
    return {name: getattr(args, name) for name, *_ in BATCHING_FLAGS.values()}


def run(args: argparse.Namespace) -> int:
    passive_torch_threads()
    try:
        settings = settings_from_args(args, model_path=args.model, **batching_overrides(args))
    except ValueError as exc:  # pydantic's ValidationError names the field and the limit
        print(f"fmnist serve: invalid setting: {exc}")
        return 2
    configure_logging(settings.log_level)
    tune_garbage_collector(settings.gc_threshold)
    return asyncio.run(serve_all(settings))


async def serve_all(settings: Settings) -> int:
    """Start the worker (it loads the model), then the gateway on the same broker; stop in reverse."""
    import messaging
    from app.broker import connect_broker
    from app.worker.consumer import Worker
    from ml.checkpoint import CheckpointError

    pubsub = connect_broker(settings)
    try:
        async with pubsub, Worker(settings, pubsub):
            return await serve_http(settings)
    except messaging.MessagingError as exc:
        logger.error(kv("serve_failed", error=exc))
        return 1
    except (CheckpointError, FileNotFoundError) as exc:
        logger.error(
            kv(
                "serve_failed",
                error=exc,
                fix="pass --model PATH (FMNIST_MODEL_PATH) or run `make train`",
            )
        )
        return 1
