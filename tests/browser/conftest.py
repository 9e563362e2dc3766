"""Fixtures shared by the browser tests: Debian's Chromium under Playwright."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, sync_playwright

from tests.browser.harness import CHROMIUM, CHROMIUM_ARGS
from tests.conftest import missing_service


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Debian's Chromium driven by Playwright (never a downloaded browser)."""
    if not os.access(CHROMIUM, os.X_OK):
        missing_service(f"{CHROMIUM} not found; run `apt-get install chromium`")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()
