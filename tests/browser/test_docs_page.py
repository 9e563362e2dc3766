"""The API docs (app/gateway/docs.py) in headless Chromium with every request off this machine refused."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.sync_api import Browser, Page, Route, expect

from tests.browser.harness import Server, start_server, stop_server

pytestmark = [pytest.mark.browser]

UI_TIMEOUT_MS = 20_000


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, shipped_checkpoint: Path) -> Iterator[Server]:
    """`fmnist serve` with auth off (the docs need neither data nor a key)."""
    log_dir = tmp_path_factory.mktemp("serve")
    (log_dir / "no-data").mkdir()
    server = start_server(log_dir, shipped_checkpoint, log_dir / "no-data", api_key=None)
    yield server
    stop_server(server)


@pytest.fixture
def offline_page(browser: Browser) -> Iterator[tuple[Page, list[str]]]:
    """A page whose requests to any host but 127.0.0.1 are aborted, and the list of those URLs."""
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(UI_TIMEOUT_MS)
    refused: list[str] = []

    def only_this_machine(route: Route) -> None:
        if urlsplit(route.request.url).hostname == "127.0.0.1":
            route.continue_()
        else:
            refused.append(route.request.url)
            route.abort("internetdisconnected")

    page.route("**/*", only_this_machine)
    yield page, refused
    context.close()


def operations(server: Server) -> set[str]:
    """`METHOD /path` of every operation in the server's OpenAPI document."""
    schema = httpx.get(f"{server.url}/openapi.json", timeout=10).json()
    return {
        f"{method.upper()} {path}"
        for path, methods in schema["paths"].items()
        for method in methods
    }


def test_swagger_ui_renders_every_operation_with_no_network(
    offline_page: tuple[Page, list[str]], server: Server
) -> None:
    """/docs, offline, shows each operation of /openapi.json exactly once and asks nothing of the network."""
    page, refused = offline_page
    expected = operations(server)
    page.goto(f"{server.url}/docs")
    blocks = page.locator(".opblock")
    expect(blocks).to_have_count(len(expected))
    shown = [
        f"{block.locator('.opblock-summary-method').inner_text().strip()} "
        f"{block.locator('.opblock-summary-path').get_attribute('data-path')}"
        for block in blocks.all()
    ]
    assert sorted(shown) == sorted(expected)
    assert refused == []


def test_redoc_renders_the_operations_with_no_network(
    offline_page: tuple[Page, list[str]], server: Server
) -> None:
    """/redoc, offline, renders the submit route's summary from the local ReDoc script."""
    page, _ = offline_page
    schema = httpx.get(f"{server.url}/openapi.json", timeout=10).json()
    summary = schema["paths"]["/v1/predictions"]["post"]["summary"]
    page.goto(f"{server.url}/redoc")
    expect(page.get_by_role("heading", name=summary).first).to_be_visible()
