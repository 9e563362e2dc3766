"""`fmnist gateway`: run the HTTP gateway alone against a broker (workers run elsewhere)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from app.cli.prologue import INVALID_SETTING_STATUS, start_command
from app.logs import kv
from app.settings import Settings
from messaging import parse_broker_url

if TYPE_CHECKING:
    from app.gateway.replay_api import ReplayHook

logger = logging.getLogger("app.gateway")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "gateway",
        help="run the HTTP gateway against a broker (workers run separately)",
        description=(
            "Run the HTTP gateway alone: it validates uploads, publishes them to the broker and serves "
            "results that `fmnist worker` processes publish. Settings come from FMNIST_* environment "
            "variables; the flags override them. SIGTERM or Ctrl-C stops it gracefully."
        ),
    )
    add_http_arguments(parser)
    parser.set_defaults(func=run)


def add_http_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="interface to bind (FMNIST_HOST, default 127.0.0.1)")
    parser.add_argument(
        "--port", type=int, help="port to listen on (FMNIST_PORT, default 8000; 0 = any free port)"
    )
    parser.add_argument(
        "--broker",
        metavar="URL",
        help="broker URL: memory://, kafka://host:9092 or gcp://PROJECT (FMNIST_BROKER_URL)",
    )
    parser.add_argument(
        "--grpc-port",
        type=int,
        help="port of the Open Inference Protocol gRPC service (FMNIST_GRPC_PORT, default 8001; 0 = off)",
    )


def http_overrides(args: argparse.Namespace) -> dict[str, object]:
    """The HTTP flags' settings (unset flags leave the environment's value)."""
    return {
        "host": args.host,
        "port": args.port,
        "broker_url": args.broker,
        "grpc_port": args.grpc_port,
    }


def run(args: argparse.Namespace) -> int:
    settings = start_command("gateway", http_overrides(args))
    if settings is None:
        return INVALID_SETTING_STATUS
    if settings.broker_url.startswith("memory://"):
        logger.warning(
            kv(
                "gateway_memory_broker",
                reason="memory:// lives inside this process; no separate worker can reach it",
                fix="use `fmnist serve` for one process, or --broker kafka://HOST:9092 with `fmnist worker`",
            )
        )
    return asyncio.run(serve_http(settings))


async def serve_http(settings: Settings, *, replay: ReplayHook | None = None) -> int:
    """Serve the gateway app with uvicorn until SIGTERM/SIGINT; log its URL once it listens.
    `replay`: the in-process replay hook (`fmnist serve`)."""
    import uvicorn

    from app.gateway.main import create_app
    from app.gateway.server import uvicorn_config

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            # uvicorn re-raises the signal after shutdown, which would kill `fmnist serve` before its
            # worker drains; handle the signal on the loop and just return instead.
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(signum, self.handle_exit, signum, None)
            try:
                yield
            finally:
                for signum in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(signum)

    app = create_app(settings, replay=replay)
    config = uvicorn_config(app, settings, host=settings.host, port=settings.port)
    server = Server(config)
    grpc = await start_grpc(app, settings)  # the v2 gRPC service, on this loop beside uvicorn
    announce = asyncio.create_task(_announce(server, settings))
    try:
        await server.serve()
    finally:
        announce.cancel()
        if grpc is not None:
            await grpc.stop()
    return 0 if server.started else 1


async def start_grpc(app: Any, settings: Settings) -> Any:
    """The started Open Inference Protocol gRPC server, or None when turned off."""
    if not settings.grpc_enabled or settings.grpc_port == 0:
        return None
    from app.gateway.v2.grpc_server import GrpcServer

    server = GrpcServer(app, settings.host, settings.grpc_port, settings.max_batch_upload_bytes)
    await server.start()
    return server


async def _announce(server: Any, settings: Settings) -> None:
    # uvicorn exposes no "listening" event, only this flag (set after the sockets are bound).
    while not server.started:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    port = settings.port
    for listener in server.servers:
        for sock in listener.sockets:
            port = sock.getsockname()[1]
    url = f"http://{settings.host}:{port}"
    logger.info(
        kv(
            "serving",
            url=url,
            docs=f"{url}/docs",
            broker=parse_broker_url(settings.broker_url).redacted,
        )
    )
