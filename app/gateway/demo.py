"""The demo page at `/`: its static files, and the real Fashion-MNIST test images it sends (no torch)."""

from __future__ import annotations

import base64
import io
import logging
from functools import lru_cache
from pathlib import Path
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import FileResponse
from PIL import Image
from pydantic import BaseModel, Field

from app.gateway.deps import GatewayDep, SettingsDep, get_owner
from app.gateway.errors import ApiError, error_responses
from app.gateway.images import SUPPORTED_IMAGE_TYPES
from app.gateway.intake import Upload, decode_uploads, read_body
from app.logs import kv
from ml.readers import (
    HOW_TO_GET,
    IDX_IMAGES_MAGIC,
    IDX_LABELS_MAGIC,
    DataError,
    count_idx_items,
    fashion_mnist_test_files,
    read_idx,
)

logger = logging.getLogger(__name__)

router = APIRouter()

STATIC_DIR = Path(__file__).resolve().parent / "static"
# Only these files are served; any other name is a 404 before a path is built, so nothing else on
# disk is reachable through /static.
STATIC_FILES = {
    "demo.css": "text/css; charset=utf-8",
    "demo.js": "text/javascript; charset=utf-8",
}
# The page loads only its own files and talks only to its own origin ('self' covers ws:// there).
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
        "style-src 'self'; script-src 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

MAX_TEST_IMAGES = 2000
# Checkpoints are safetensors files whose header metadata holds the classifier's JSON under this
# key (see ml/checkpoint.py); only the header is read here, never the weights.


class TestImagesAvailability(BaseModel):
    """Whether the load button can work, and if not, how to make it work."""

    available: bool
    total: int | None = Field(default=None, description="Images in the test set, when available.")
    message: str | None = Field(default=None, description="How to install the data, when missing.")


class DemoConfig(BaseModel):
    """What the page needs before its first `/v1` call, so that it never makes one bound to fail."""

    auth_required: bool = Field(
        description="True when FMNIST_API_KEYS is set: the page asks for a key."
    )
    test_images: TestImagesAvailability


class TestImage(BaseModel):
    """One Fashion-MNIST test image as a 28×28 grayscale PNG, with its true label."""

    index: int = Field(description="Position in the 10,000-image test set.", examples=[0])
    label: int = Field(description="The true label.", examples=[9])
    png: str = Field(description="The image as a base64-encoded PNG (28×28, grayscale).")


class TestImages(BaseModel):
    """A slice of the real Fashion-MNIST test set, for the demo page's load button."""

    dataset: str = Field(default="fashion-mnist", examples=["fashion-mnist"])
    split: str = Field(default="test", examples=["test"])
    total: int = Field(description="Images in the whole test set.", examples=[10_000])
    images: list[TestImage]


class ModelInfo(BaseModel):
    """The default model as its workers announced it (nulls while none is known); `GET /v1/models`
    lists every model."""

    class_names: list[str] | None = Field(
        default=None, examples=[["T-shirt/top", "Trouser", "Pullover"]]
    )
    version: str | None = Field(default=None, examples=["3f2a9c0d1b7e"])
    input_shape: list[int] | None = Field(default=None, examples=[[1, 28, 28]])


def find_test_data(data_dir: Path | None) -> tuple[Path, Path]:
    """The test images and labels files: in `data_dir` if given, else the usual places (404 if none)."""
    try:
        return fashion_mnist_test_files(data_dir)
    except DataError as exc:
        raise ApiError(404, "test_data_missing", str(exc)) from None


@lru_cache(maxsize=2)
def load_test_set(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The test images (N×28×28 uint8) and labels (N), read once per process."""
    try:
        images = read_idx(images_path, IDX_IMAGES_MAGIC)
        labels = read_idx(labels_path, IDX_LABELS_MAGIC)
    except (DataError, OSError, EOFError, ValueError) as exc:
        raise ApiError(
            503,
            "test_data_unreadable",
            f"cannot read the Fashion-MNIST test set ({exc}); reinstall it: {HOW_TO_GET}",
        ) from exc
    if images.shape[0] != labels.shape[0]:
        raise ApiError(
            503,
            "test_data_unreadable",
            f"{images_path} holds {images.shape[0]} images but {labels_path} holds "
            f"{labels.shape[0]} labels; reinstall them: {HOW_TO_GET}",
        )
    return images, labels


def png_of(pixels: np.ndarray) -> bytes:
    """A uint8 H×W (grayscale) or H×W×3 (RGB) array as PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def encode_png(pixels: np.ndarray) -> str:
    """A 2-D uint8 array as a base64 PNG string."""
    return base64.b64encode(png_of(pixels)).decode("ascii")


def model_input_png(model_input: bytes, shape: tuple[int, int, int]) -> bytes:
    """The model's uint8 C×H×W input as a PNG: grayscale for one channel, RGB for three, else channel 0."""
    channels, height, width = shape
    planes = np.frombuffer(model_input, np.uint8).reshape(channels, height, width)
    return png_of(planes.transpose(1, 2, 0) if channels == 3 else planes[0])


@router.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
async def demo_page() -> FileResponse:
    """The demo page: upload or draw an image, watch results and batching live."""
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers=PAGE_HEADERS)


@router.get("/static/{name}", include_in_schema=False)
async def demo_static(name: str) -> FileResponse:
    """One of the demo page's own files."""
    media_type = STATIC_FILES.get(name)
    if media_type is None:
        raise ApiError(404, "not_found", f"no static file named {name!r}")
    return FileResponse(
        STATIC_DIR / name, media_type=media_type, headers={"Cache-Control": "no-cache"}
    )


@router.get("/demo/config", include_in_schema=False)
def demo_config(settings: SettingsDep) -> DemoConfig:
    """Open to everyone: it says only whether a key is needed and whether the test set is here."""
    try:
        images_path, _ = find_test_data(settings.data_dir)
        availability = TestImagesAvailability(available=True, total=count_idx_items(images_path))
    except ApiError as exc:
        availability = TestImagesAvailability(available=False, message=exc.message)
    except (OSError, EOFError, ValueError) as exc:
        availability = TestImagesAvailability(
            available=False, message=f"cannot read the test set ({exc}): {HOW_TO_GET}"
        )
    return DemoConfig(auth_required=bool(settings.api_keys), test_images=availability)


@router.get(
    "/v1/demo/test-images",
    response_model=TestImages,
    tags=["demo"],
    summary="Real Fashion-MNIST test images, for the demo page",
    responses=error_responses(401, 403, 404, 422, 503),
    dependencies=[Depends(get_owner)],
)
def demo_test_images(
    settings: SettingsDep,
    count: Annotated[int, Query(ge=1, le=MAX_TEST_IMAGES, description="How many images.")] = 500,
    offset: Annotated[
        int, Query(ge=0, description="Index of the first image; the slice wraps past the end.")
    ] = 0,
) -> TestImages:
    """`count` consecutive test images from `offset`, as 28×28 PNGs with their true labels.

    Read from the IDX files with numpy and encoded with Pillow: the gateway never imports torch.
    404 when the data is not installed (the message says how to install it).
    """
    try:
        images, labels = load_test_set(*find_test_data(settings.data_dir))
    except ApiError as exc:
        logger.warning(kv("demo_test_images_unavailable", code=exc.code, reason=exc.message))
        raise
    total = int(images.shape[0])
    indices = [(offset + i) % total for i in range(min(count, total))]
    return TestImages(
        total=total,
        images=[
            TestImage(index=i, label=int(labels[i]), png=encode_png(images[i])) for i in indices
        ],
    )


@router.get(
    "/v1/demo/model",
    response_model=ModelInfo,
    tags=["demo"],
    summary="Class names and version of the default model, for the demo page",
    responses=error_responses(401, 403),
    dependencies=[Depends(get_owner)],
)
def demo_model(gateway: GatewayDep) -> ModelInfo:
    """Class names, version and input shape of the default model's newest version; nulls when none is known."""
    registry = gateway.registry
    versions = registry.versions(registry.default_name)
    if not versions:
        return ModelInfo()
    newest = next((v for v in versions if v.ready), versions[0])
    return ModelInfo(
        class_names=list(newest.class_names),
        version=newest.version,
        input_shape=list(newest.input_shape),
    )


@router.post(
    "/v1/demo/model-input",
    tags=["demo"],
    summary="An image as the model sees it, for the demo page's thumbnails",
    response_class=Response,
    responses={
        200: {"content": {"image/png": {}}, "description": "The model's input as a PNG."},
        **error_responses(400, 401, 403, 413, 415, 422),
    },
    dependencies=[Depends(get_owner)],
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                kind: {"schema": {"type": "string", "format": "binary"}}
                for kind in SUPPORTED_IMAGE_TYPES
            },
        }
    },
)
async def demo_model_input(
    request: Request,
    gateway: GatewayDep,
    model: Annotated[
        str | None, Query(description="The model (default: the default model).")
    ] = None,
    version: Annotated[str | None, Query(description="A version's hash or tag.")] = None,
) -> Response:
    """The upload decoded and normalised exactly as `POST /v1/predictions` does, returned as a PNG.

    Nothing is published: the page shows it beside the prediction, so a thumbnail is what the model
    classified (inverted, trimmed and resized), never the original file.
    """
    policy = gateway.policy_for(gateway.registry.resolve(model, version))
    body = await read_body(request, gateway.settings.max_upload_bytes, "FMNIST_MAX_UPLOAD_BYTES")
    (decoded,) = await decode_uploads([Upload(body, request.headers.get("content-type"))], policy)
    if isinstance(decoded, ApiError):
        raise decoded
    return Response(
        model_input_png(decoded, policy.shape),
        media_type="image/png",
        headers={"Cache-Control": "no-store"},
    )
