"""A real `fmnist serve` (gateway + worker + embedded broker) on a free port, for SDK, CLI and README tests."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e import processes

SERVE_START_TIMEOUT_S = 90.0  # torch import and model load on a busy 2-core machine


def served_checkpoint(request: pytest.FixtureRequest) -> Path:
    """The shipped checkpoint, or `FMNIST_E2E_CHECKPOINT` while developing (as tests/e2e does)."""
    override = os.environ.get("FMNIST_E2E_CHECKPOINT")
    return Path(override) if override else Path(request.getfixturevalue("shipped_checkpoint"))


@contextlib.contextmanager
def fmnist_serve(log_dir: Path, checkpoint: Path, **env: str) -> Iterator[str]:
    """Run `fmnist serve` until the block ends; yields its base URL once `/readyz` answers 200."""
    port = processes.free_port()
    settings = {
        "FMNIST_HOST": "127.0.0.1",
        "FMNIST_PORT": str(port),
        "FMNIST_MODEL_PATH": str(checkpoint),
        "FMNIST_BROKER_URL": "memory://",
        "FMNIST_API_KEYS": "",
        **env,
    }
    serve = processes.fmnist("fmnist-serve", "serve", log_dir, settings)
    url = f"http://127.0.0.1:{port}"
    with processes.stopping(serve.start()):
        serve.wait_for_http(f"{url}/readyz", timeout=SERVE_START_TIMEOUT_S)
        yield url
