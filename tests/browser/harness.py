"""Test harness for the demo page: `fmnist serve` subprocesses, Debian's Chromium, real test images."""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from playwright.sync_api import Page

from tests.e2e.processes import ManagedProcess, fmnist, free_port

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
    """A running `fmnist` HTTP server subprocess and the key it was started with."""

    url: str
    api_key: str | None
    process: ManagedProcess

    def headers(self) -> dict[str, str]:
        return {"X-API-Key": self.api_key} if self.api_key else {}


def start_server(
    log_dir: Path, checkpoint: Path, data_dir: Path, api_key: str | None, *models: str
) -> Server:
    """Start `fmnist serve` (gateway + worker + memory broker) on a free port; wait for /readyz.
    `models` (`NAME=PATH`) are served beside `checkpoint`, which is then the default model `fmnist`."""
    port = free_port()
    env = {
        "FMNIST_BROKER_URL": "memory://",
        "FMNIST_MODEL_PATH": str(checkpoint),
        "FMNIST_DATA_DIR": str(data_dir),
        "FMNIST_API_KEYS": api_key or "",
        "FMNIST_LOG_LEVEL": "WARNING",
    }
    args: tuple[str, ...] = ("--host", "127.0.0.1", "--port", str(port))
    if models:
        args += ("--model", f"fmnist={checkpoint}", *(w for m in models for w in ("--model", m)))
    process = fmnist(f"serve-{port}", "serve", log_dir, env, *args).start()
    server = Server(f"http://127.0.0.1:{port}", api_key, process)
    try:
        process.wait_for_http(f"{server.url}/readyz", timeout=SERVER_START_TIMEOUT_S)
    except BaseException:
        process.stop()
        raise
    return server


def stop_server(server: Server) -> None:
    """SIGTERM the server (SIGKILL if it lingers), by its PID."""
    server.process.stop()


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
