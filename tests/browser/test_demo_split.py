"""The demo page's canary split panel against a real `fmnist serve` with two versions of one model."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect

from tests.browser.harness import Server, first_test_images, png_bytes, start_server, stop_server

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.data]

SENT = 16


@pytest.fixture(scope="module")
def split_server(
    tmp_path_factory: pytest.TempPathFactory, shipped_checkpoint: Path, fashion_mnist_dir: Path
) -> Iterator[Server]:
    """`fmnist serve --model fmnist=SHIPPED --model fmnist=CANDIDATE`: two versions of one model."""
    from ml import ImageClassifier

    log_dir = tmp_path_factory.mktemp("serve-split")
    # The candidate the CLI's canary test serves too, so that no test compiles another model.
    candidate = log_dir / "model.safetensors"
    ImageClassifier(seed=3).save(candidate)
    server = start_server(
        log_dir, shipped_checkpoint, fashion_mnist_dir, None, f"fmnist={candidate}"
    )
    try:
        yield server
    finally:
        stop_server(server)


@pytest.fixture
def page(browser: Browser, split_server: Server) -> Iterator[Page]:
    """The demo page of `split_server`, with its JavaScript errors checked at the end."""
    context = browser.new_context()
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    try:
        page.goto(split_server.url + "/")
        expect(page.locator("#model-select")).to_have_value("fmnist")
        yield page
    finally:
        context.close()
    assert errors == [], "JavaScript errors on the page"


def test_the_demo_page_shows_the_canary_split_live(
    page: Page, split_server: Server, fashion_mnist_dir: Path, tmp_path: Path
) -> None:
    """Once a 50/50 split is set, the open page lists both versions, their weights and requests."""
    expect(page.locator("#split")).to_be_hidden()
    images, _ = first_test_images(fashion_mnist_dir, SENT)
    with httpx.Client(base_url=split_server.url, timeout=30) as client:
        versions = sorted(v["version"] for v in client.get("/v1/models/fmnist").json()["versions"])
        put = client.put("/v1/models/fmnist/weights", json={"weights": dict.fromkeys(versions, 50)})
        assert put.status_code == 200, put.text
        answered = Counter(
            client.post(
                "/v1/predictions?wait=20",
                content=png_bytes(image, tmp_path / "image.png").read_bytes(),
                headers={"Content-Type": "image/png", "Idempotency-Key": f"split-{i}"},
            ).json()["model_version"]
            for i, image in enumerate(images)
        )
    assert set(answered) == set(versions), f"one version answered everything: {answered}"
    expect(page.locator("#split")).to_be_visible(timeout=10_000)
    expect(page.locator("#split-rows tr")).to_have_count(2)
    for version in versions:
        row = page.locator(f'#split-rows tr[data-version="{version}"]')
        expect(row.locator(".weight")).to_have_text("50%")
        expect(row.locator(".requests")).to_have_text(str(answered[version]))
        expect(row.locator(".latency")).to_have_text(re.compile(r"^[\d.]+ / [\d.]+$"))


def test_the_shadow_panel_stays_hidden_while_no_shadow_runs(page: Page) -> None:
    """Without a shadow candidate the page shows no empty shadow panel."""
    expect(page.locator("#stat-completed")).not_to_have_text("–")  # the first stats poll ran
    expect(page.locator("#shadow")).to_be_hidden()
