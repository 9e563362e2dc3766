"""`fmnist worker`: run one inference worker against a broker until SIGTERM/SIGINT, then drain and exit 0."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
from typing import TYPE_CHECKING, Any

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
from app.worker.health import health_server

if TYPE_CHECKING:
    from app.worker.consumer import Worker
    from app.worker.shadow import ShadowWorker

logger = logging.getLogger("app.worker")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "worker",
        help="consume image requests from the broker, classify them in batches, publish results",
        description=(
            "Run one inference worker. Settings come from FMNIST_* environment variables; the flags "
            "below override them. SIGTERM or Ctrl-C drains (in-flight requests are computed, published "
            "and acked) and exits 0. Start several workers on one broker to share the load."
        ),
    )
    parser.add_argument(
        "--broker",
        metavar="URL",
        help="broker URL, kafka://host:9092 or gcp://PROJECT (FMNIST_BROKER_URL)",
    )
    add_model_arguments(parser)
    parser.add_argument(
        "--worker-id",
        metavar="ID",
        help="id stamped on results (FMNIST_WORKER_ID; default host-pid)",
    )
    parser.add_argument(
        "--shadow",
        action="store_true",
        default=None,
        help="run as a shadow: read a copy of the model's live traffic from now on, publish to the "
        "shadow results topic only, answer no client (FMNIST_WORKER_ROLE=shadow); name the live "
        "model with --model NAME=PATH when the file's name differs",
    )
    add_batching_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    overrides = {
        "broker_url": args.broker,
        "device": args.device,
        "worker_id": args.worker_id,
        "worker_role": "shadow" if args.shadow else None,
        **batching_overrides(args),
    }
    settings = start_command("worker", overrides, runs_model=True)
    if settings is None:
        return INVALID_SETTING_STATUS
    models = model_options(args, settings)
    if models is None:
        return INVALID_SETTING_STATUS
    if settings.broker_url.startswith("memory://"):
        logger.error(
            kv(
                "worker_refused",
                reason="memory:// lives inside one process; a separate worker cannot reach it",
                fix="use `fmnist serve` (gateway and worker in one process) or --broker kafka://HOST:9092",
            )
        )
        return 2
    return asyncio.run(run_worker(settings, models))


async def run_worker(settings: Settings, models: list[tuple[str | None, str]] | None = None) -> int:
    """Load the model, connect, consume until a stop signal, drain. Returns the exit status."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    state = _HealthState(stop)
    # Up before the model loads, so a startup probe sees the process alive while it loads.
    async with health_server(settings.host, settings.worker_health_port, state.readiness):
        try:
            return await _run(settings, models or [(None, str(settings.model_path))], stop, state)
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)


class _HealthState:
    """What a worker's /readyz reports: ready once consuming, not ready while loading or draining."""

    def __init__(self, stop: asyncio.Event) -> None:
        self.stop = stop
        self.workers: list[Worker | ShadowWorker] = []

    def readiness(self) -> tuple[bool, str]:
        if self.stop.is_set():
            return False, "draining"
        if not self.workers:
            return False, "loading the models and joining the groups"
        return True, "consuming"


async def _run(
    settings: Settings,
    models: list[tuple[str | None, str]],
    stop: asyncio.Event,
    state: _HealthState,
) -> int:
    import messaging
    from app.broker import connect_broker
    from app.worker.consumer import Worker
    from app.worker.inference import load_served_model
    from app.worker.shadow import ShadowWorker
    from ml.checkpoint import CheckpointError
    from ml.serving import ModelLoadError

    # The models first: a wrong path fails in a second instead of after the broker's timeout.
    try:
        loaded = [
            (name, await asyncio.to_thread(load_served_model, settings, source, name))
            for name, source in models
        ]
    except ModelLoadError as exc:
        logger.error(kv("worker_failed", error=exc, fix="see docs/model.md for what --model takes"))
        return 1
    except (CheckpointError, FileNotFoundError) as exc:
        logger.error(
            kv(
                "worker_failed",
                error=exc,
                fix="pass --model PATH (FMNIST_MODEL_PATH) or run `make train`",
            )
        )
        return 1
    try:
        pubsub = connect_broker(settings)
    except (ValueError, messaging.MissingDependency) as exc:  # bad URL or missing extra
        logger.error(kv("worker_failed", error=exc, setting="--broker / FMNIST_BROKER_URL"))
        return 2
    try:
        async with pubsub, contextlib.AsyncExitStack() as stack:
            kind = ShadowWorker if settings.worker_role == "shadow" else Worker
            workers: list[Worker | ShadowWorker] = [
                await stack.enter_async_context(kind(settings, pubsub, model, name=name))
                for name, model in loaded
            ]
            state.workers = workers
            return await _serve_until_stopped(workers, stop)
    except messaging.MessagingError as exc:
        logger.error(kv("worker_failed", error=exc))
        return 1


async def _serve_until_stopped(workers: list[Worker | ShadowWorker], stop: asyncio.Event) -> int:
    stop_requested = asyncio.ensure_future(stop.wait())
    consuming = [asyncio.ensure_future(worker.wait()) for worker in workers]
    await asyncio.wait({stop_requested, *consuming}, return_when=asyncio.FIRST_COMPLETED)
    stop_requested.cancel()
    worker_id = workers[0].worker_id
    ended = [task for task in consuming if task.done()]
    if ended:
        for task in consuming:
            task.cancel()
        ended[0].result()  # a subscription ended by itself: surface its error
        logger.error(kv("worker_stopped", worker_id=worker_id, reason="subscription ended"))
        return 1
    logger.info(kv("worker_draining", worker_id=worker_id))
    await asyncio.gather(*(worker.drain() for worker in workers))
    for task in consuming:
        task.cancel()
    return 0
