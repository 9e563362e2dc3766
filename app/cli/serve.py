"""`fmnist serve`: gateway + worker + embedded broker in one process, the zero-setup way to run the service."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any, cast

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

if TYPE_CHECKING:
    from app.cli.serve_replay import EmbeddedReplay
    from messaging import PubSub
    from ml.serving import ServedModel

logger = logging.getLogger("app.serve")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="run gateway + worker + embedded broker in one process (the quick start)",
        description=(
            "Run everything in one process: the HTTP gateway, one inference worker and, by default, the "
            "embedded memory:// broker, one worker per --model. Open http://127.0.0.1:8000/ for the demo page and /docs for the "
            "API. On the embedded broker, POST /v1/models/NAME/replay replays the requests it retains "
            "through any --model or --shadow loaded here (docs/rollout.md). Settings come from "
            "FMNIST_* environment variables; the flags override them. SIGTERM or Ctrl-C stops the "
            "server, then the worker drains."
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
    """Start one worker per model, then the gateway on the same broker, whose default model is the
    first (unless FMNIST_DEFAULT_MODEL says); stop in reverse. `shadow`: a model run as a shadow of
    the first one. Each source is loaded once, also when it both serves and shadows. On the embedded
    broker the gateway can replay retained requests through any loaded version
    (`app.cli.serve_replay`)."""
    import messaging
    from app.broker import connect_broker
    from app.worker.consumer import Worker
    from app.worker.shadow import ShadowWorker
    from ml.checkpoint import CheckpointError
    from ml.serving import ModelLoadError

    pubsub = connect_broker(settings)
    try:
        async with pubsub, contextlib.AsyncExitStack() as stack:
            loaded = _Loaded(settings)
            workers = []
            for name, source in models or [(None, str(settings.model_path))]:
                classifier = await loaded.load(source, name)
                worker = Worker(settings, pubsub, classifier, name=name, source=source)
                workers.append(await stack.enter_async_context(worker))
            if shadow is not None:
                name = workers[0].model_name
                classifier = await loaded.load(shadow, name)
                await stack.enter_async_context(
                    ShadowWorker(settings, pubsub, classifier, name=name, source=shadow)
                )
            if settings.default_model is None:
                settings = settings.model_copy(update={"default_model": workers[0].model_name})
            return await serve_http(settings, replay=loaded.replay_hook(pubsub))
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


class _Loaded:
    """The models this process loaded, once per (source, name), by model name."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._by_source: dict[tuple[str, str | None], ServedModel] = {}
        self.by_model: dict[str, list[ServedModel]] = {}

    async def load(self, source: str, name: str | None) -> ServedModel:
        """The model `source` loaded as `name` (its own name when None), loading it on first use;
        the first load sets torch's threads for the process, as a worker loading its own would."""
        import torch

        from app.worker.inference import load_served_model, worker_layout

        served = self._by_source.get((source, name))
        if served is None:
            predictor = await asyncio.to_thread(load_served_model, self.settings, source, name)
            served = cast("ServedModel", predictor)
            if not self._by_source:
                torch.set_num_threads(worker_layout(self.settings, served).threads)
            self._by_source[(source, name)] = served
            versions = self.by_model.setdefault(served.name, [])
            if all(v.version != served.version for v in versions):
                versions.append(served)
        return served

    def replay_hook(self, pubsub: PubSub) -> EmbeddedReplay | None:
        """The gateway's replay hook on the embedded broker; None on a broker other processes
        read (`fmnist replay` serves those)."""
        from app.cli.serve_replay import EmbeddedReplay
        from messaging.memory import MemoryPubSub

        if not isinstance(pubsub, MemoryPubSub):
            return None
        return EmbeddedReplay(self.settings, pubsub, self.by_model)
