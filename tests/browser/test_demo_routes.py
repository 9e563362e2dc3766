"""The demo page's HTTP side through the real app (no browser): page, static files, test images, model info."""

from __future__ import annotations

import base64
import gzip
import io
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from app.gateway.main import create_app
from app.settings import Settings
from ml import CLASS_NAMES
from ml.readers import FILES
from tests.gateway.helpers import announcement

TEST_IMAGES_FILE, TEST_LABELS_FILE = FILES["test"]

API_KEY = "demo-routes-key"


def idx_arrays(directory: Path) -> tuple[np.ndarray, np.ndarray]:
    """The raw test images and labels, parsed here independently of app.gateway.demo."""
    images = np.frombuffer(
        gzip.decompress((directory / TEST_IMAGES_FILE).read_bytes()), np.uint8, offset=16
    )
    labels = np.frombuffer(
        gzip.decompress((directory / TEST_LABELS_FILE).read_bytes()), np.uint8, offset=8
    )
    return images.reshape(-1, 28, 28), labels


FASHION_MODEL = announcement("demo-worker", classes=list(CLASS_NAMES), heartbeat_s=3600)


async def client_for(settings: Settings, *, announced: bool = True) -> httpx.AsyncClient:
    """These routes need no broker, so the app is driven without its lifespan; `announced`: its
    registry knows a Fashion-MNIST model with a live worker, as if a worker had announced it."""
    app = create_app(settings)
    if announced:
        app.state.gateway.registry.learn(FASHION_MODEL)
    transport = httpx.ASGITransport(app=app)
    return httpx.AsyncClient(transport=transport, base_url="http://demo.test")


@pytest.fixture
async def client(fashion_mnist_dir: Path) -> AsyncIterator[httpx.AsyncClient]:
    """A client of an app with the real data and auth off."""
    async with await client_for(Settings(data_dir=fashion_mnist_dir)) as c:
        yield c


@pytest.fixture
async def keyed_client(fashion_mnist_dir: Path) -> AsyncIterator[httpx.AsyncClient]:
    """A client of an app with FMNIST_API_KEYS set."""
    async with await client_for(Settings(data_dir=fashion_mnist_dir, api_keys=[API_KEY])) as c:
        yield c


@pytest.fixture
async def no_data_client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    """A client of an app whose data directory is empty."""
    async with await client_for(Settings(data_dir=tmp_path)) as c:
        yield c


async def test_page_is_served_with_a_strict_content_security_policy(
    client: httpx.AsyncClient,
) -> None:
    """GET / returns the page, which may load only its own scripts and talk only to its own origin."""
    response = await client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert 'src="/static/demo.js"' in response.text
    policy = response.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "connect-src 'self'" in policy


async def test_page_loads_nothing_from_other_origins(client: httpx.AsyncClient) -> None:
    """Every script, stylesheet and icon the page references is its own (it works offline)."""
    page = (await client.get("/")).text
    references = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert references, "the page references no assets at all"
    for reference in references:
        assert reference.startswith(("/", "#", "data:")), f"external reference {reference!r}"
    script = (await client.get("/static/demo.js")).text
    assert not re.search(r"https?://", script), "the script talks to another origin"


@pytest.mark.parametrize(
    ("name", "media_type"), [("demo.js", "text/javascript"), ("demo.css", "text/css")]
)
async def test_static_files_are_served_with_their_type(
    client: httpx.AsyncClient, name: str, media_type: str
) -> None:
    """The page's script and stylesheet come from the package with the right content type."""
    response = await client.get(f"/static/{name}")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith(media_type)
    assert len(response.content) > 1000


@pytest.mark.parametrize(
    "name", ["index.html.bak", "..%2Fdemo.py", "%2E%2E%2F%2E%2E%2Fsettings.py"]
)
async def test_static_serves_nothing_outside_its_list(client: httpx.AsyncClient, name: str) -> None:
    """Any other name under /static is a 404 in the API's error shape, never a file from disk."""
    response = await client.get(f"/static/{name}")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


@pytest.mark.data
async def test_test_images_are_the_real_test_set_with_labels(
    client: httpx.AsyncClient, fashion_mnist_dir: Path
) -> None:
    """Each returned PNG decodes to exactly the IDX pixels at its index, with the IDX label."""
    response = await client.get("/v1/demo/test-images", params={"count": 5, "offset": 123})
    assert response.status_code == 200
    body = response.json()
    images, labels = idx_arrays(fashion_mnist_dir)
    assert body["total"] == len(labels) == 10_000
    assert [item["index"] for item in body["images"]] == [123, 124, 125, 126, 127]
    for item in body["images"]:
        decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(item["png"]))))
        assert decoded.shape == (28, 28)
        assert np.array_equal(decoded, images[item["index"]])
        assert item["label"] == labels[item["index"]]


@pytest.mark.data
async def test_test_images_wrap_around_the_end(client: httpx.AsyncClient) -> None:
    """A slice that runs past the last image continues from the first."""
    response = await client.get("/v1/demo/test-images", params={"count": 3, "offset": 9_999})
    assert [item["index"] for item in response.json()["images"]] == [9_999, 0, 1]


@pytest.mark.parametrize(
    "params", [{"count": 0}, {"count": 2001}, {"offset": -1}, {"count": "many"}]
)
async def test_test_images_reject_bad_queries(
    client: httpx.AsyncClient, params: dict[str, object]
) -> None:
    """Out-of-range or non-numeric count/offset is a 422 in the API's error shape."""
    response = await client.get("/v1/demo/test-images", params=params)
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "validation_error"


async def test_missing_data_is_a_404_that_says_how_to_install_it(
    no_data_client: httpx.AsyncClient,
) -> None:
    """Without the IDX files the endpoint answers 404 naming the package and FMNIST_DATA_DIR."""
    response = await no_data_client.get("/v1/demo/test-images")
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["code"] == "test_data_missing"
    assert "apt-get install dataset-fashion-mnist" in error["message"]
    assert "FMNIST_DATA_DIR" in error["message"]


async def test_config_tells_the_page_the_data_is_missing(no_data_client: httpx.AsyncClient) -> None:
    """/demo/config reports the test set unavailable, with the install hint for the button."""
    response = await no_data_client.get("/demo/config")
    assert response.status_code == 200
    test_images = response.json()["test_images"]
    assert test_images["available"] is False
    assert "apt-get install dataset-fashion-mnist" in test_images["message"]


@pytest.mark.data
async def test_truncated_data_is_a_503_that_says_to_reinstall(
    tmp_path: Path, fashion_mnist_dir: Path
) -> None:
    """A damaged images file is reported as unreadable with the reinstall hint, not a 500."""
    shutil.copy(fashion_mnist_dir / TEST_LABELS_FILE, tmp_path / TEST_LABELS_FILE)
    raw = gzip.decompress((fashion_mnist_dir / TEST_IMAGES_FILE).read_bytes())
    (tmp_path / TEST_IMAGES_FILE).write_bytes(gzip.compress(raw[: len(raw) // 2]))
    async with await client_for(Settings(data_dir=tmp_path)) as c:
        response = await c.get("/v1/demo/test-images", params={"count": 1})
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == "test_data_unreadable"
    assert "truncated" in error["message"] and "apt-get install" in error["message"]


@pytest.mark.data
async def test_config_is_open_and_says_a_key_is_needed(keyed_client: httpx.AsyncClient) -> None:
    """With keys set, /demo/config answers without a key and tells the page to ask for one."""
    response = await keyed_client.get("/demo/config")
    assert response.status_code == 200
    assert response.json() == {
        "auth_required": True,
        "test_images": {"available": True, "total": 10_000, "message": None},
    }


@pytest.mark.data
@pytest.mark.parametrize(
    ("headers", "status"),
    [({}, 401), ({"X-API-Key": "wrong"}, 403), ({"X-API-Key": API_KEY}, 200)],
)
async def test_test_images_need_a_key_when_keys_are_set(
    keyed_client: httpx.AsyncClient, headers: dict[str, str], status: int
) -> None:
    """/v1/demo/test-images follows the API's auth: 401 without a key, 403 wrong, 200 right."""
    response = await keyed_client.get("/v1/demo/test-images", params={"count": 1}, headers=headers)
    assert response.status_code == status


async def test_model_info_describes_the_default_model() -> None:
    """/v1/demo/model returns the default model's class names, version and input shape as announced."""
    async with await client_for(Settings()) as c:
        body = (await c.get("/v1/demo/model")).json()
    assert body == {
        "class_names": list(FASHION_MODEL.class_names),
        "version": FASHION_MODEL.version,
        "input_shape": [1, 28, 28],
    }


async def test_model_info_is_empty_while_no_model_is_announced() -> None:
    """Before any worker announced a model, /v1/demo/model gives nulls (the page learns from results)."""
    async with await client_for(Settings(), announced=False) as c:
        response = await c.get("/v1/demo/model")
    assert response.status_code == 200
    assert response.json() == {"class_names": None, "version": None, "input_shape": None}


def light_background_png(pixels: np.ndarray, scale: int) -> bytes:
    """A test image drawn dark on white and enlarged, like a photo of a garment on paper."""
    image = Image.fromarray(255 - pixels).resize(
        (pixels.shape[1] * scale, pixels.shape[0] * scale), Image.Resampling.NEAREST
    )
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


async def test_model_input_is_the_normalised_upload_as_png(
    client: httpx.AsyncClient, fashion_mnist_dir: Path
) -> None:
    """/v1/demo/model-input returns, as a PNG, the exact 28×28 input the prediction route would publish."""
    from app.gateway.images import ImagePolicy, decode_image

    images, _ = idx_arrays(fashion_mnist_dir)
    upload = light_background_png(images[0], scale=8)
    answer = await client.post(
        "/v1/demo/model-input", content=upload, headers={"Content-Type": "image/png"}
    )
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"
    shown = np.asarray(Image.open(io.BytesIO(answer.content)))
    expected = np.frombuffer(decode_image(upload, "image/png", ImagePolicy()), np.uint8)
    assert shown.shape == (28, 28)
    assert np.array_equal(shown.reshape(-1), expected)


async def test_model_input_refuses_bytes_that_are_not_an_image(client: httpx.AsyncClient) -> None:
    """Bytes that are not an image get the prediction route's 415 (they are not the declared PNG)."""
    answer = await client.post(
        "/v1/demo/model-input",
        content=b"these are notes, not a picture",
        headers={"Content-Type": "image/png"},
    )
    assert answer.status_code == 415
    assert answer.json()["error"]["code"] == "unsupported_media_type"


async def test_model_input_needs_the_key_when_keys_are_set(keyed_client: httpx.AsyncClient) -> None:
    """Like every /v1 route, the preview needs an API key when FMNIST_API_KEYS is set."""
    answer = await keyed_client.post(
        "/v1/demo/model-input", content=b"x", headers={"Content-Type": "image/png"}
    )
    assert answer.status_code == 401
