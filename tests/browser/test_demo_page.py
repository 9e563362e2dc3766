"""The demo page in headless Chromium against a real `fmnist serve`: upload, drawing, live batching, API keys."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, expect

from tests.browser.harness import (
    TROUSERS,
    Server,
    draw_strokes,
    first_test_images,
    png_bytes,
    start_server,
    stop_server,
)
from tests.conftest import REPO_ROOT

pytestmark = [pytest.mark.browser, pytest.mark.data]

API_KEY = "browser-test-key"
ARTIFACTS = REPO_ROOT / "artifacts" / "browser"
UI_TIMEOUT_MS = 20_000
LOAD_TEST_TIMEOUT_MS = 40_000


@pytest.fixture(scope="module")
def keyed_server(
    tmp_path_factory: pytest.TempPathFactory, shipped_checkpoint: Path, fashion_mnist_dir: Path
) -> Iterator[Server]:
    """`fmnist serve` with the shipped checkpoint, the real data and FMNIST_API_KEYS set."""
    server = start_server(
        tmp_path_factory.mktemp("serve"), shipped_checkpoint, fashion_mnist_dir, API_KEY
    )
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def open_server(
    tmp_path_factory: pytest.TempPathFactory, shipped_checkpoint: Path
) -> Iterator[Server]:
    """`fmnist serve` with auth off and an empty FMNIST_DATA_DIR (module-scoped: pages close first)."""
    log_dir = tmp_path_factory.mktemp("serve")
    empty = log_dir / "no-data"
    empty.mkdir()
    server = start_server(log_dir, shipped_checkpoint, empty, api_key=None)
    yield server
    stop_server(server)


@dataclass
class WatchedPage:
    """A page whose console errors and uncaught exceptions are collected for the test to fail on."""

    page: Page
    errors: list[str] = field(default_factory=list)
    allowed: list[re.Pattern[str]] = field(default_factory=list)

    def allow(self, pattern: str) -> None:
        """Tolerate console errors matching `pattern` (for a test that provokes them on purpose)."""
        self.allowed.append(re.compile(pattern))

    def unexpected_errors(self) -> list[str]:
        return [e for e in self.errors if not any(p.search(e) for p in self.allowed)]


# A desktop window, and a common phone's CSS width (iPhone 12 to 15).
DESKTOP = {"width": 1360, "height": 1000}
PHONE_WIDTH = 390


@pytest.fixture
def viewport() -> dict[str, int]:
    """The window size of `watched`'s page; a test overrides it by parametrizing `viewport`."""
    return DESKTOP


@pytest.fixture
def watched(
    browser: Browser, request: pytest.FixtureRequest, viewport: dict[str, int]
) -> Iterator[WatchedPage]:
    """A fresh browser context (empty localStorage) and page; saves a screenshot under artifacts/."""
    context = browser.new_context(viewport=viewport)
    page = context.new_page()
    watched = WatchedPage(page)

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error":
            watched.errors.append(f"console: {message.text}")

    page.on("console", on_console)
    page.on("pageerror", lambda error: watched.errors.append(f"pageerror: {error}"))
    page.set_default_timeout(UI_TIMEOUT_MS)
    yield watched
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{request.node.name}.png"), full_page=True)
    context.close()
    assert watched.unexpected_errors() == [], "JavaScript errors on the page"


def open_page(watched: WatchedPage, server: Server) -> Page:
    """Open `/`, enter the server's key in the key field if it has one, and wait for the live link."""
    page = watched.page
    page.goto(server.url + "/")
    if server.api_key:
        page.fill("#api-key", server.api_key)
        page.click("#key-form button[type=submit]")
    expect(page.locator("#connection")).to_have_attribute("data-state", "live")
    return page


def wait_until(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.1)


def test_page_asks_for_a_key_before_calling_the_api(
    watched: WatchedPage, keyed_server: Server
) -> None:
    """With keys on and none stored, the page shows it needs a key and makes no failing call."""
    page = watched.page
    page.goto(keyed_server.url + "/")
    expect(page.locator("#connection")).to_have_text("API key needed")
    expect(page.locator("#key-form")).to_have_class(re.compile("needs-key"))
    page.wait_for_timeout(1500)  # long enough for a stats poll, had the page made one


def test_key_is_remembered_across_reloads(watched: WatchedPage, keyed_server: Server) -> None:
    """A key entered once is kept in localStorage: after a reload the page goes live by itself."""
    page = open_page(watched, keyed_server)
    page.reload()
    expect(page.locator("#connection")).to_have_attribute("data-state", "live")
    expect(page.locator("#api-key")).to_have_value(API_KEY)


def test_a_wrong_key_is_reported_on_the_page(watched: WatchedPage, keyed_server: Server) -> None:
    """A refused key turns the status to 'Key refused' and shows what to check."""
    # The browser itself logs each refused request and websocket handshake; those are expected here.
    watched.allow(r"status of 403|WebSocket connection to .* failed")
    page = watched.page
    page.goto(keyed_server.url + "/")
    page.fill("#api-key", "not-the-key")
    page.click("#key-form button[type=submit]")
    expect(page.locator("#connection")).to_have_text("Key refused")
    expect(page.locator("#errors")).to_contain_text("FMNIST_API_KEYS")


def test_uploaded_test_image_shows_its_true_class(
    watched: WatchedPage, keyed_server: Server, fashion_mnist_dir: Path, tmp_path: Path
) -> None:
    """A real test image put into the file input comes back with its true class name and 10 bars."""
    from ml import CLASS_NAMES

    images, labels = first_test_images(fashion_mnist_dir, 20)
    # Use the first image the shipped model classifies correctly (asked through the same server).
    chosen = None
    for pixels, label in zip(images, labels, strict=True):
        path = png_bytes(pixels, tmp_path / "image.png")
        answer = httpx.post(
            f"{keyed_server.url}/v1/predictions",
            params={"wait": 10},
            content=path.read_bytes(),
            headers={"Content-Type": "image/png", **keyed_server.headers()},
            timeout=15,
        ).json()
        if answer.get("label") == int(label):
            chosen = (path, int(label))
            break
    assert chosen is not None, "the shipped model got none of the first 20 test images right"
    path, label = chosen

    page = open_page(watched, keyed_server)
    page.set_input_files("#file-input", str(path))
    card = page.locator(".result").first
    expect(card).to_have_attribute("data-status", "completed")
    expect(card.locator(".class-name")).to_have_text(CLASS_NAMES[label])
    expect(card.locator(".bar")).to_have_count(len(CLASS_NAMES))
    expect(card.locator(".bar.top .bar-label")).to_have_text(CLASS_NAMES[label])
    expect(card.locator(".result-meta")).to_contain_text("batch of")


def test_dropped_image_is_classified(
    watched: WatchedPage, keyed_server: Server, fashion_mnist_dir: Path, tmp_path: Path
) -> None:
    """An image file dropped on the drop zone is uploaded and classified."""
    images, _ = first_test_images(fashion_mnist_dir, 2)
    data = png_bytes(images[1], tmp_path / "dropped.png").read_bytes()
    page = open_page(watched, keyed_server)
    transfer = page.evaluate_handle(
        """(bytes) => {
            const transfer = new DataTransfer();
            const file = new File([new Uint8Array(bytes)], "dropped.png", { type: "image/png" });
            transfer.items.add(file);
            return transfer;
        }""",
        list(data),
    )
    page.dispatch_event("#drop-zone", "drop", {"dataTransfer": transfer})
    card = page.locator(".result").first
    expect(card).to_have_attribute("data-status", "completed")
    expect(card.locator(".thumb")).to_have_attribute(
        "alt", "Uploaded image dropped.png, as the model saw it"
    )
    expect(card.locator(".bar")).to_have_count(10)


def test_drawing_on_the_canvas_gets_a_prediction(
    watched: WatchedPage, keyed_server: Server
) -> None:
    """Strokes drawn with the mouse are sent as a 28×28 image and come back classified."""
    from ml import CLASS_NAMES

    page = open_page(watched, keyed_server)
    draw_strokes(page, TROUSERS)
    page.click("#classify-drawing")
    card = page.locator(".result").first
    expect(card).to_have_attribute("data-status", "completed")
    expect(card.locator(".thumb")).to_have_attribute("alt", re.compile("Your drawing"))
    assert card.locator(".class-name").inner_text() in CLASS_NAMES
    expect(card.locator(".bar")).to_have_count(len(CLASS_NAMES))


def test_live_panel_shows_batching_for_500_test_images(
    watched: WatchedPage, keyed_server: Server
) -> None:
    """'Send 500 test images' answers all 500, mostly right, and the panel shows batches above 1."""
    page = open_page(watched, keyed_server)
    page.click("#send-test-images")
    expect(page.locator("#load-done")).to_have_text("500 / 500", timeout=LOAD_TEST_TIMEOUT_MS)
    expect(page.locator("#load-status")).to_contain_text("Done: 500 classified")
    accuracy = float(page.locator("#load-accuracy").inner_text().rstrip("%"))
    assert accuracy >= 85.0, f"accuracy on 500 test images shown as {accuracy}%"
    expect(page.locator("#load-gallery li")).not_to_have_count(0)

    def completed_on_panel() -> int:
        return int(re.sub(r"\D", "", page.locator("#stat-completed").inner_text()) or 0)

    wait_until(lambda: completed_on_panel() >= 500, 5, "the stats panel to count 500 results")
    sizes = page.locator("#batch-histogram .hist-bar").evaluate_all(
        "bars => bars.map(bar => bar.dataset.size)"
    )
    assert any(size != "1" for size in sizes), f"no batch above 1 shown: {sizes}"
    assert float(page.locator("#stat-throughput").inner_text()) > 0
    assert int(page.locator("#stream-count").inner_text().replace(",", "")) >= 500


def test_page_works_with_auth_off(
    open_server: Server, watched: WatchedPage, fashion_mnist_dir: Path, tmp_path: Path
) -> None:
    """Without FMNIST_API_KEYS the page goes live with no key and classifies an upload."""
    # The test reads its image itself: this server has no data directory.
    page = open_page(watched, open_server)
    images, _ = first_test_images(fashion_mnist_dir, 1)
    page.set_input_files("#file-input", str(png_bytes(images[0], tmp_path / "0.png")))
    card = page.locator(".result").first
    expect(card).to_have_attribute("data-status", "completed")
    expect(card.locator(".bar")).to_have_count(10)


def test_load_button_says_how_to_get_missing_test_data(
    open_server: Server, watched: WatchedPage
) -> None:
    """Without the Fashion-MNIST files the button is disabled and says how to install them."""
    page = open_page(watched, open_server)
    expect(page.locator("#send-test-images")).to_be_disabled()
    expect(page.locator("#send-test-images")).to_have_text("Test images not installed")
    expect(page.locator("#load-status")).to_contain_text("apt-get install dataset-fashion-mnist")
    expect(page.locator("#load-status")).to_contain_text("FMNIST_DATA_DIR")


# Elements of a card whose box extends past the card's, each as "selector-ish: by N px".
OVERFLOWING_CARD_CHILDREN = """() => {
    const out = [];
    for (const card of document.querySelectorAll(".card")) {
        const box = card.getBoundingClientRect();
        for (const element of card.querySelectorAll("*")) {
            if (element.closest(".visually-hidden")) continue;
            const r = element.getBoundingClientRect();
            if (r.width === 0 && r.height === 0) continue;
            const past = Math.max(r.right - box.right, box.left - r.left);
            if (past > 0.5) out.push(`${element.tagName.toLowerCase()}#${element.id}.${element.className}: ${past.toFixed(0)} px`);
        }
    }
    return out;
}"""


@pytest.mark.parametrize("viewport", [{"width": PHONE_WIDTH, "height": 844}])
def test_page_fits_a_phone_screen(watched: WatchedPage, keyed_server: Server) -> None:
    """At 390 px wide nothing sticks out of its card and the page does not scroll sideways."""
    page = open_page(watched, keyed_server)
    assert page.evaluate(OVERFLOWING_CARD_CHILDREN) == []
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE_WIDTH


def test_a_failed_upload_shows_no_broken_image(
    watched: WatchedPage, keyed_server: Server, tmp_path: Path
) -> None:
    """A file that is not an image fails with a 'No preview' box: no broken image, no spilling alt text."""
    # The browser logs the refused uploads (prediction and preview) itself; they are the point here.
    watched.allow(r"status of 415")
    notes = tmp_path / "notes.png"
    notes.write_bytes(b"these are notes, not a picture")
    page = open_page(watched, keyed_server)
    page.set_input_files("#file-input", str(notes))
    card = page.locator(".result").first
    expect(card).to_have_attribute("data-status", "failed")
    expect(card.locator(".thumb-placeholder")).to_have_text("No preview")
    expect(card.locator(".thumb")).to_be_hidden()
    broken = page.evaluate(
        "[...document.querySelectorAll('.result img')]"
        ".filter(img => img.checkVisibility() && !(img.complete && img.naturalWidth > 0)).length"
    )
    assert broken == 0
    assert page.evaluate(OVERFLOWING_CARD_CHILDREN) == []


def test_upload_thumbnail_is_what_the_model_saw(
    watched: WatchedPage, keyed_server: Server, fashion_mnist_dir: Path, tmp_path: Path
) -> None:
    """An upload's thumbnail holds the model's 28×28 input (inverted, trimmed, resized), not the file."""
    from PIL import Image

    from app.gateway.images import ImagePolicy, decode_image

    images, _ = first_test_images(fashion_mnist_dir, 1)
    photo = tmp_path / "photo.png"
    Image.fromarray(255 - images[0]).resize((224, 224), Image.Resampling.NEAREST).save(photo)
    page = open_page(watched, keyed_server)
    page.set_input_files("#file-input", str(photo))
    thumb = page.locator(".result").first.locator(".thumb")
    expect(thumb).to_be_visible()
    pixels = thumb.evaluate(
        """img => {
            const canvas = document.createElement("canvas");
            canvas.width = img.naturalWidth;
            canvas.height = img.naturalHeight;
            const ctx = canvas.getContext("2d");
            ctx.drawImage(img, 0, 0);
            const rgba = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
            return { width: canvas.width, gray: [...rgba].filter((_, i) => i % 4 === 0) };
        }"""
    )
    expected = decode_image(photo.read_bytes(), "image/png", ImagePolicy())
    assert pixels["width"] == 28
    assert bytes(pixels["gray"]) == expected


def test_empty_canvas_invites_drawing(watched: WatchedPage, keyed_server: Server) -> None:
    """The blank canvas carries a 'Draw a garment here' cue, gone once drawn on and back after Clear."""
    page = open_page(watched, keyed_server)
    page.uncheck("#auto-classify")
    cue = page.locator("#sketch-cue")
    expect(cue).to_be_visible()
    expect(cue).to_contain_text("Draw a garment here")
    cue_box, canvas_box = cue.bounding_box(), page.locator("#sketch").bounding_box()
    assert cue_box is not None and canvas_box is not None
    assert (
        canvas_box["x"]
        <= cue_box["x"] + cue_box["width"] / 2
        <= canvas_box["x"] + canvas_box["width"]
    )
    draw_strokes(page, TROUSERS)
    expect(cue).to_be_hidden()
    page.click("#clear-drawing")
    expect(cue).to_be_visible()


@pytest.fixture(scope="module")
def two_model_server(
    tmp_path_factory: pytest.TempPathFactory, shipped_checkpoint: Path, fashion_mnist_dir: Path
) -> Iterator[Server]:
    """`fmnist serve` with the shipped model and an (untrained) RGB 32×32 model of 4 colours."""
    from ml import ImageClassifier

    log_dir = tmp_path_factory.mktemp("serve-two")
    colours = log_dir / "colours.safetensors"
    ImageClassifier(
        num_channels=3, num_classes=4, image_size=(32, 32), widths=(8, 16), convs_per_stage=(1, 1),
        class_names=["red", "green", "blue", "yellow"], device="cpu",
    ).save(colours)  # fmt: skip
    server = start_server(
        log_dir, shipped_checkpoint, fashion_mnist_dir, None, f"colours={colours}"
    )
    yield server
    stop_server(server)


def test_the_model_picker_shows_the_chosen_model_and_sends_to_it(
    two_model_server: Server, watched: WatchedPage, fashion_mnist_dir: Path, tmp_path: Path
) -> None:
    """Choosing the RGB model shows its input and classes, disables the Fashion-MNIST test set, and
    an upload is answered by it; back on fmnist the test set can be sent again."""
    page = open_page(watched, two_model_server)
    picker = page.locator("#model-select")
    expect(picker.locator("option")).to_have_count(2)
    expect(page.locator("#model-info")).to_contain_text("1×28×28 (grayscale)")
    expect(page.locator("#send-test-images")).to_be_enabled()
    picker.select_option("colours")
    expect(page.locator("#model-info")).to_contain_text("3×32×32 (RGB); classes: red, green, blue")
    expect(page.locator("#send-test-images")).to_be_disabled()
    expect(page.locator("#send-test-images")).to_have_text("No test set for this model")
    images, _ = first_test_images(fashion_mnist_dir, 1)
    page.set_input_files("#file-input", str(png_bytes(images[0], tmp_path / "0.png")))
    card = page.locator(".result").first
    expect(card).to_have_attribute("data-status", "completed")
    expect(card.locator(".bar")).to_have_count(4)
    picker.select_option("fmnist")
    expect(page.locator("#send-test-images")).to_be_enabled()
