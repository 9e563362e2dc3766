"""The API docs pages (app/gateway/docs.py): served from the gateway's own files, each operation listed once."""

from __future__ import annotations

from html.parser import HTMLParser

import pytest

from tests.gateway.helpers import gateway_settings, running_gateway

pytestmark = pytest.mark.timeout(30)


class AssetLinks(HTMLParser):
    """The `src` of every script and the `href` of every stylesheet and icon link in a page."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        url = (
            values.get("src") if tag == "script" else values.get("href") if tag == "link" else None
        )
        if url:
            self.urls.append(url)


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
async def test_docs_pages_load_their_assets_from_this_gateway(page: str) -> None:
    """Every script, stylesheet and icon of the docs page is a path on this gateway that answers 200."""
    async with running_gateway(gateway_settings()) as (_, client):
        html = await client.get(page)
        assert html.status_code == 200
        links = AssetLinks()
        links.feed(html.text)
        assert links.urls, f"{page} links no scripts or stylesheets"
        for url in links.urls:
            assert url.startswith("/"), f"{page} loads {url} from elsewhere"
            asset = await client.get(url)
            assert asset.status_code == 200 and asset.content, url


async def test_each_operation_is_listed_under_one_tag() -> None:
    """No operation carries two tags, so Swagger UI shows each route once (it lists one per tag)."""
    async with running_gateway(gateway_settings()) as (_, client):
        schema = (await client.get("/openapi.json")).json()
    tags = {
        f"{method.upper()} {path}": operation.get("tags", [])
        for path, methods in schema["paths"].items()
        for method, operation in methods.items()
    }
    assert {operation: names for operation, names in tags.items() if len(names) != 1} == {}
