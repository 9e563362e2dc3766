"""The demo page's shadow panel against a real `fmnist serve --shadow` on the embedded broker."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, expect

from tests.browser.harness import SERVER_START_TIMEOUT_S, Server, first_test_images, stop_server
from tests.browser.harness import png_bytes as png_file
from tests.e2e.processes import fmnist, free_port

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.data]

SENT = 30


@pytest.fixture(scope="module")
def shadow_server(
    tmp_path_factory: pytest.TempPathFactory, shipped_checkpoint: Path, fashion_mnist_dir: Path
) -> Iterator[Server]:
    """`fmnist serve --shadow` with the shipped model live and an untrained candidate as its shadow."""
    from ml import ImageClassifier

    log_dir = tmp_path_factory.mktemp("serve-shadow")
    candidate = log_dir / "candidate.safetensors"
    ImageClassifier(widths=(4, 8), convs_per_stage=(1, 1), seed=3).save(candidate)
    port = free_port()
    env = {
        "FMNIST_BROKER_URL": "memory://",
        "FMNIST_MODEL_PATH": str(shipped_checkpoint),
        "FMNIST_DATA_DIR": str(fashion_mnist_dir),
        "FMNIST_LOG_LEVEL": "WARNING",
    }
    args = ("--host", "127.0.0.1", "--port", str(port), "--shadow", str(candidate))
    process = fmnist(f"serve-shadow-{port}", "serve", log_dir, env, *args).start()
    server = Server(f"http://127.0.0.1:{port}", None, process)
    try:
        process.wait_for_http(f"{server.url}/readyz", timeout=SERVER_START_TIMEOUT_S)
        yield server
    finally:
        stop_server(server)


def test_the_demo_page_shows_the_shadow_candidate_live(
    browser: Browser, shadow_server: Server, fashion_mnist_dir: Path, tmp_path: Path
) -> None:
    """After labelled test images, the panel shows the candidate, its samples, agreement and accuracy."""
    images, labels = first_test_images(fashion_mnist_dir, SENT)
    with httpx.Client(base_url=shadow_server.url, timeout=30) as client:
        for image, label in zip(images, labels, strict=True):
            response = client.post(
                "/v1/predictions?wait=20",
                content=png_file(image, tmp_path / "image.png").read_bytes(),
                headers={
                    "Content-Type": "image/png",
                    "X-Fmnist-Metadata": json.dumps({"label": str(int(label))}),
                },
            )
            assert response.status_code == 200, response.text
        candidate = client.get("/v1/models/fmnist").json()["versions"]
    (shadow,) = [v["version"] for v in candidate if v["role"] == "shadow"]
    context = browser.new_context()
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    try:
        page.goto(shadow_server.url + "/")
        panel = page.locator("#shadow")
        expect(panel).to_be_visible(timeout=20_000)
        expect(page.locator("#shadow-version")).to_have_text(shadow)
        expect(page.locator("#shadow-samples")).to_have_text(str(SENT))
        expect(page.locator("#shadow-labelled")).to_have_text(str(SENT))
        expect(page.locator("#shadow-agreement")).to_have_text(re.compile(r"^\d+(\.\d)?%$"))
        expect(page.locator("#shadow-accuracy")).to_have_text(re.compile(r"^\d.*% / \d.*%$"))
        page.screenshot(path=str(tmp_path / "shadow.png"), full_page=True)
    finally:
        context.close()
    assert errors == [], "JavaScript errors on the page"


def test_the_shadow_panel_replays_retained_requests_through_the_candidate(
    browser: Browser, shadow_server: Server, fashion_mnist_dir: Path, tmp_path: Path
) -> None:
    """The panel's replay button runs the retained requests through the candidate inside `fmnist
    serve` and shows how many it replayed, with agreement and accuracy."""
    images, labels = first_test_images(fashion_mnist_dir, 5)
    with httpx.Client(base_url=shadow_server.url, timeout=30) as client:
        for image, label in zip(images, labels, strict=True):
            response = client.post(
                "/v1/predictions?wait=20",
                content=png_file(image, tmp_path / "image.png").read_bytes(),
                headers={
                    "Content-Type": "image/png",
                    "X-Fmnist-Metadata": json.dumps({"label": str(int(label))}),
                },
            )
            assert response.status_code == 200, response.text
    context = browser.new_context()
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    try:
        page.goto(shadow_server.url + "/")
        expect(page.locator("#shadow")).to_be_visible(timeout=20_000)
        page.locator("#replay-shadow").click()
        expect(page.locator("#replay-result")).to_have_text(
            re.compile(
                r"^Replayed \d+ retained requests: agreement \d.*%, accuracy live / "
                r"candidate \d.*% / \d.*% \(\d+ labelled\)$"
            ),
            timeout=20_000,
        )
    finally:
        context.close()
    assert errors == [], "JavaScript errors on the page"
