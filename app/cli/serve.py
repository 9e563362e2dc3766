"""`fmnist serve`: gateway + worker + embedded broker in one process, the zero-setup way to run the service."""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path
from typing import Any

from app.cli.gateway import add_http_arguments, http_overrides, serve_http
from app.cli.prologue import (
    INVALID_SETTING_STATUS,
    add_batching_arguments,
    batching_overrides,
    start_command,
)
from app.logs import kv
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


def run(args: argparse.Namespace) -> int:
    overrides = {**http_overrides(args), "model_path": args.model, **batching_overrides(args)}
    settings = start_command("serve", overrides, runs_model=True)
    if settings is None:
        return INVALID_SETTING_STATUS
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
