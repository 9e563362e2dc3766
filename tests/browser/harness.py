"""Test harness for the demo page: `fmnist serve`/`fmnist gateway` subprocesses and Debian's Chromium."""

from __future__ import annotations

import gzip
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from playwright.sync_api import Page

from tests.conftest import REPO_ROOT

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SERVER_START_TIMEOUT_S = 90.0


@dataclass
class Server:
    """A running `fmnist serve` subprocess."""

    url: str
    api_key: str | None
    process: subprocess.Popen[bytes]
    log_path: Path

    def headers(self) -> dict[str, str]:
        return {"X-API-Key": self.api_key} if self.api_key else {}

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_server(
    log_dir: Path, checkpoint: Path, data_dir: Path, api_key: str | None, command: str = "serve"
) -> Server:
    """Start `fmnist serve` (or another sub-command) on a free port; wait until /readyz says ready."""
    port = free_port()
    env = {
        **os.environ,
        "FMNIST_BROKER_URL": "memory://",
        "FMNIST_MODEL_PATH": str(checkpoint),
        "FMNIST_DATA_DIR": str(data_dir),
        "FMNIST_API_KEYS": api_key or "",
        "FMNIST_LOG_LEVEL": "WARNING",
    }
    log_path = log_dir / f"serve-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "app", command, "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = Server(f"http://127.0.0.1:{port}", api_key, process, log_path)
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(
                f"fmnist {command} exited with {process.returncode}:\n{server.log_tail()}"
            )
        try:
            if httpx.get(f"{server.url}/readyz", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    stop_server(server)
    raise AssertionError(
        f"fmnist {command} not ready in {SERVER_START_TIMEOUT_S} s:\n{server.log_tail()}"
    )


def stop_server(server: Server) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait(timeout=5)


def first_test_images(data_dir: Path, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `count` real test images and labels."""
    raw_images = gzip.decompress((data_dir / "t10k-images-idx3-ubyte.gz").read_bytes())
    raw_labels = gzip.decompress((data_dir / "t10k-labels-idx1-ubyte.gz").read_bytes())
    images = np.frombuffer(raw_images, np.uint8, offset=16)[: count * 784].reshape(count, 28, 28)
    return images, np.frombuffer(raw_labels, np.uint8, offset=8)[:count]


def png_bytes(pixels: np.ndarray, path: Path) -> Path:
    """Write a 2-D uint8 array as a PNG file; returns the path."""
    Image.fromarray(pixels).save(path, format="PNG")
    return path


# A pair of trousers in canvas fractions: a waistband and two legs, each a list of stroke points.
TROUSERS: list[list[tuple[float, float]]] = [
    [(0.3, 0.15), (0.7, 0.15)],
    [(0.32, 0.15), (0.3, 0.9)],
    [(0.68, 0.15), (0.7, 0.9)],
    [(0.5, 0.2), (0.42, 0.9)],
    [(0.5, 0.2), (0.58, 0.9)],
]


def draw_strokes(page: Page, strokes: list[list[tuple[float, float]]]) -> None:
    """Draw on the page's sketch canvas with the mouse; points are fractions of its size."""
    box = page.locator("#sketch").bounding_box()
    assert box is not None, "the sketch canvas is not visible"
    for points in strokes:
        (x0, y0), rest = points[0], points[1:]
        page.mouse.move(box["x"] + x0 * box["width"], box["y"] + y0 * box["height"])
        page.mouse.down()
        for x, y in rest:
            page.mouse.move(box["x"] + x * box["width"], box["y"] + y * box["height"], steps=8)
        page.mouse.up()
