"""`fmnist serve`: gateway + worker + embedded broker in one process, the zero-setup way to run the service."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
from typing import Any

from app.cli.gateway import add_http_arguments, http_overrides, serve_http
from app.cli.prologue import (
    INVALID_SETTING_STATUS,
    add_batching_arguments,
    add_model_arguments,
    batching_overrides,
    model_options,
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
            "embedded memory:// broker, one worker per --model. Open http://127.0.0.1:8000/ for the demo page and /docs for the "
            "API. Settings come from FMNIST_* environment variables; the flags override them. SIGTERM "
            "or Ctrl-C stops the server, then the worker drains."
        ),
    )
    add_http_arguments(parser)
    add_model_arguments(parser)
    parser.add_argument(
        "--shadow",
        metavar="PATH",
        help="also run this model as a shadow of the first --model, on a copy of its live traffic: "
        "the demo page and GET /v1/models/NAME/shadow compare the two",
    )
    add_batching_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    overrides = {**http_overrides(args), "device": args.device, **batching_overrides(args)}
    settings = start_command("serve", overrides, runs_model=True)
    if settings is None:
        return INVALID_SETTING_STATUS
    models = model_options(args, settings)
    if models is None:
        return INVALID_SETTING_STATUS
    return asyncio.run(serve_all(settings, models, shadow=args.shadow))


async def serve_all(
    settings: Settings,
    models: list[tuple[str | None, str]] | None = None,
    *,
    shadow: str | None = None,
) -> int:
    """Start one worker per model (each loads its model), then the gateway on the same broker, whose
    default model is the first (unless FMNIST_DEFAULT_MODEL says); stop in reverse. `shadow`: a
    model run as a shadow of the first one."""
    import messaging
    from app.broker import connect_broker
    from app.worker.consumer import Worker
    from app.worker.shadow import ShadowWorker
    from ml.checkpoint import CheckpointError
    from ml.serving import ModelLoadError

    pubsub = connect_broker(settings)
    try:
        async with pubsub, contextlib.AsyncExitStack() as stack:
            workers = [
                await stack.enter_async_context(Worker(settings, pubsub, name=name, source=source))
                for name, source in models or [(None, str(settings.model_path))]
            ]
            if shadow is not None:
                await stack.enter_async_context(
                    ShadowWorker(settings, pubsub, name=workers[0].model_name, source=shadow)
                )
            if settings.default_model is None:
                settings = settings.model_copy(update={"default_model": workers[0].model_name})
            return await serve_http(settings)
    except messaging.MessagingError as exc:
        logger.error(kv("serve_failed", error=exc))
        return 1
    except ModelLoadError as exc:
        logger.error(kv("serve_failed", error=exc, fix="see docs/model.md for what --model takes"))
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
