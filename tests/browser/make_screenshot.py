"""Regenerate the README's screenshot of the demo page: `python -m tests.browser.make_screenshot`.

Starts `fmnist serve` with the shipped checkpoint, uploads a real test image, draws a sketch, sends
500 test images, and saves the page as `docs/screenshot.png`. Not a test; run it after changing the page.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from playwright.sync_api import expect, sync_playwright

from tests.browser.harness import (
    CHROMIUM,
    CHROMIUM_ARGS,
    TROUSERS,
    draw_strokes,
    first_test_images,
    png_bytes,
    start_server,
    stop_server,
)
from tests.conftest import DEBIAN_DATA_DIR, REPO_ROOT, SHIPPED_CHECKPOINT


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "screenshot.png")
    parser.add_argument("--width", type=int, default=1360)
    parser.add_argument("--height", type=int, default=1000)
    args = parser.parse_args(argv)
    data_dir = Path(os.environ.get("FMNIST_DATA_DIR") or DEBIAN_DATA_DIR)

    with tempfile.TemporaryDirectory() as scratch:
        server = start_server(Path(scratch), SHIPPED_CHECKPOINT, data_dir, api_key=None)
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(
                    executable_path=str(CHROMIUM), args=CHROMIUM_ARGS
                )
                page = browser.new_page(viewport={"width": args.width, "height": args.height})
                page.goto(server.url + "/")
                expect(page.locator("#connection")).to_have_attribute("data-state", "live")
                images, _ = first_test_images(data_dir, 1)
                page.set_input_files(
                    "#file-input", str(png_bytes(images[0], Path(scratch) / "boot.png"))
                )
                expect(page.locator(".result").first).to_have_attribute("data-status", "completed")
                draw_strokes(page, TROUSERS)
                page.click("#classify-drawing")
                expect(page.locator(".result").first).to_have_attribute("data-status", "completed")
                # Two load runs a few seconds apart give the throughput chart something to draw.
                for _ in range(2):
                    expect(page.locator("#send-test-images")).to_be_enabled(timeout=60_000)
                    page.click("#send-test-images")
                    page.wait_for_timeout(4000)
                expect(page.locator("#load-status")).to_contain_text("Done", timeout=60_000)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(args.out), full_page=True)
                browser.close()
        finally:
            stop_server(server)
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
