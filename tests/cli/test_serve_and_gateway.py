"""`fmnist serve` and `fmnist gateway` as real processes: URL logged when listening, serving, clean SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO_ROOT
from tests.gateway.helpers import fashion_like, png_bytes

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

URL_LINE = re.compile(r"event=serving url=(http://127\.0\.0\.1:\d+)")


@contextmanager
def fmnist(
    *args: str, log: Path, env: dict[str, str] | None = None
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """Run `fmnist ARGS` until its "serving" log line; yield (process, base URL); SIGTERM it afterwards."""
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "app", *args],
            cwd=REPO_ROOT,
            stdout=output,
            stderr=subprocess.STDOUT,
            env={**os.environ, "FMNIST_API_KEYS": "", **(env or {})},
        )
    try:
        deadline = time.monotonic() + 90
        while (found := URL_LINE.search(log.read_text())) is None:
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        yield process, found.group(1)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def test_serve_classifies_and_drains_on_sigterm(tmp_path: Path) -> None:
    """`fmnist serve --port 0 --model M` answers a prediction from its own worker, then exits 0 on SIGTERM."""
    from ml import ImageClassifier

    checkpoint = tmp_path / "model.safetensors"
    ImageClassifier(seed=3).save(checkpoint)
    log = tmp_path / "serve.log"
    with fmnist("serve", "--port", "0", "--model", str(checkpoint), log=log) as (process, url):
        ready = httpx.get(f"{url}/readyz")
        answer = httpx.post(
            f"{url}/v1/predictions?wait=20",
            content=png_bytes(fashion_like()),
            headers={"Content-Type": "image/png"},
            timeout=30,
        )
        page = httpx.get(f"{url}/docs")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, log.read_text()
    assert ready.status_code == 200
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == "completed" and answer.json()["worker_id"]
    assert page.status_code == 200
    assert "event=worker_drained" in log.read_text()


def test_gateway_alone_serves_and_stops_cleanly(tmp_path: Path) -> None:
    """`fmnist gateway` starts without torch and reports ready; with no worker it knows no model (404
    for a named one, 503 + Retry-After for the default) and exits 0 on SIGTERM."""
    log = tmp_path / "gateway.log"
    with fmnist("gateway", "--port", "0", "--broker", "memory://alone", log=log) as (process, url):
        ready = httpx.get(f"{url}/readyz")
        unknown = httpx.get(f"{url}/v1/models/fmnist")
        refused = httpx.post(
            f"{url}/v1/predictions", content=b"hello", headers={"Content-Type": "text/plain"}
        )
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, log.read_text()
    assert ready.status_code == 200
    assert unknown.status_code == 404
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "model_unavailable"
    assert "retry-after" in refused.headers


def test_version_flag_prints_the_package_version() -> None:
    """`fmnist --version` prints the installed fmnist-service version and exits 0."""
    import tomllib

    expected = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]
    result = subprocess.run(
        [sys.executable, "-m", "app", "--version"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"fmnist-service {expected}"


def test_serve_batching_flags_override_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """`fmnist serve --max-batch-size … --batch-fill-wait-ms …` win over FMNIST_* variables; unset flags
    leave the environment's value."""
    from app.cli import build_parser
    from app.cli.gateway import http_overrides
    from app.cli.prologue import batching_overrides, settings_from

    monkeypatch.setenv("FMNIST_MAX_BATCH_SIZE", "64")
    monkeypatch.setenv("FMNIST_PREFERRED_BATCH_SIZE", "16")
    args = build_parser().parse_args(
        [
            "serve",
            "--max-batch-size",
            "8",
            "--batch-fill-wait-ms",
            "1.5",
            "--inference-concurrency",
            "2",
        ]
    )
    settings = settings_from({**http_overrides(args), **batching_overrides(args)})
    assert settings.max_batch_size == 8 and settings.batch_fill_wait_ms == 1.5
    assert settings.inference_concurrency == 2
    assert settings.preferred_batch_size == 16


def test_serve_refuses_a_batching_flag_out_of_range(tmp_path: Path) -> None:
    """`fmnist serve --max-batch-size 0` exits 2 naming the setting, before loading anything."""
    result = subprocess.run(
        [sys.executable, "-m", "app", "serve", "--max-batch-size", "0"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "invalid setting" in result.stderr and "max_batch_size" in result.stderr


def test_serve_batches_no_larger_than_its_flag(tmp_path: Path) -> None:
    """`fmnist serve --max-batch-size 1 --preferred-batch-size 1`: a batch upload of 4 images is
    classified one image per forward pass."""
    from ml import ImageClassifier

    checkpoint = tmp_path / "model.safetensors"
    ImageClassifier(seed=3).save(checkpoint)
    log = tmp_path / "serve.log"
    flags = ["--max-batch-size", "1", "--preferred-batch-size", "1", "--batch-fill-wait-ms", "50"]
    with fmnist("serve", "--port", "0", "--model", str(checkpoint), *flags, log=log) as (_, url):
        image = png_bytes(fashion_like())
        answer = httpx.post(
            f"{url}/v1/predictions:batch?wait=20",
            files=[("files", (f"{i}.png", image, "image/png")) for i in range(4)],
            timeout=30,
        )
    assert answer.status_code == 200, answer.text
    items = answer.json()["items"]
    assert [item["status"] for item in items] == ["completed"] * 4
    assert {item["batch_size"] for item in items} == {1}
