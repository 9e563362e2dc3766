"""The image policy: sniffing, decoding and normalising uploads to the model's uint8 C×H×W input."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.gateway import images as images_module
from app.gateway.errors import ApiError
from app.gateway.images import (
    ImagePolicy,
    decode_array,
    decode_array_batch,
    decode_image,
    read_header,
    sniff_format,
)
from tests.gateway.helpers import encode, fashion_like, npy_bytes

POLICY = ImagePolicy()


def as_array(payload: bytes, shape: tuple[int, ...] = (28, 28)) -> np.ndarray:
    return np.frombuffer(payload, np.uint8).reshape(shape)


@pytest.mark.parametrize("image_format", ["PNG", "JPEG", "GIF", "BMP", "WEBP"])
def test_every_supported_format_is_sniffed(image_format: str) -> None:
    """The five accepted formats are recognised from their bytes."""
    assert sniff_format(encode(Image.new("L", (8, 8)), image_format)) == image_format


def test_model_sized_grayscale_png_passes_through_unchanged() -> None:
    """A 28×28 Fashion-MNIST-like PNG arrives at the model bit for bit."""
    pixels = fashion_like(3)
    assert (
        as_array(decode_image(encode(Image.fromarray(pixels), "PNG"), "image/png", POLICY)).tolist()
        == pixels.tolist()
    )


@pytest.mark.data
def test_real_fashion_mnist_images_pass_through_unchanged(fashion_mnist_dir: Path) -> None:
    """Real test-set images survive PNG encoding and our policy exactly (no inversion, no resize)."""
    with gzip.open(fashion_mnist_dir / "t10k-images-idx3-ubyte.gz") as stream:
        raw = stream.read()
    images = np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 28, 28)[:200]
    for pixels in images:
        assert (
            decode_image(encode(Image.fromarray(pixels), "PNG"), None, POLICY) == pixels.tobytes()
        )


@pytest.mark.data
def test_libspng_and_pillow_give_the_same_model_input(
    fashion_mnist_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The libspng fast path for model-sized grayscale PNGs returns Pillow's bytes, inverted or not."""
    assert images_module._spng is not None, (
        "pyspng is a dependency on Linux: the fast path must run"
    )
    with gzip.open(fashion_mnist_dir / "t10k-images-idx3-ubyte.gz") as stream:
        raw = stream.read()
    images = np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 28, 28)[:100]
    pngs = [encode(Image.fromarray(pixels), "PNG") for pixels in images]
    pngs += [encode(Image.fromarray(255 - pixels), "PNG") for pixels in images[:20]]  # inverted
    fast = [images_module._gray_png_at_model_size(png, POLICY) for png in pngs]
    assert all(item is not None for item in fast)
    monkeypatch.setattr(images_module, "_spng", None)
    assert fast == [decode_image(png, "image/png", POLICY) for png in pngs]


@pytest.mark.parametrize(
    "image",
    [
        Image.new("L", (30, 28), 0),  # not the model's size: resized by Pillow
        Image.new("I;16", (28, 28), 0),  # 16-bit
        Image.new("RGB", (28, 28), (0, 0, 0)),  # colour
        Image.new("LA", (28, 28), (0, 0)),  # alpha
    ],
    ids=["size", "16-bit", "rgb", "alpha"],
)
def test_other_pngs_skip_the_fast_path_and_still_decode(image: Image.Image) -> None:
    """Only 8-bit grayscale PNGs at H×W take the libspng path; the rest decode through Pillow."""
    png = encode(image, "PNG")
    assert images_module._gray_png_at_model_size(png, POLICY) is None
    assert len(decode_image(png, "image/png", POLICY)) == 28 * 28


def test_a_corrupt_model_sized_png_gets_pillows_error() -> None:
    """A truncated grayscale PNG: libspng refuses it, and the answer is Pillow's 422, not a crash."""
    png = encode(Image.fromarray(fashion_like(1)), "PNG")
    truncated = png[: len(png) // 2]
    assert images_module._gray_png_at_model_size(truncated, POLICY) is None
    with pytest.raises(ApiError) as caught:
        decode_image(truncated, "image/png", POLICY)
    assert caught.value.status == 422


def test_dark_object_on_light_background_is_inverted() -> None:
    """A drawing or photo of a dark object on white becomes light-on-black, like Fashion-MNIST."""
    pixels = np.full((28, 28), 250, np.uint8)
    pixels[6:22, 8:20] = 10
    result = as_array(decode_image(encode(Image.fromarray(pixels), "PNG"), "image/png", POLICY))
    assert result[0, 0] == 5 and result[14, 14] == 245


def test_large_photo_is_trimmed_fitted_and_centred() -> None:
    """A big RGB photo becomes 28×28 grayscale: object trimmed, longest side fitted, padded with black."""
    photo = np.full((600, 400, 3), 240, np.uint8)
    photo[100:500, 150:250] = (20, 30, 40)  # a dark 400×100 object on a light background
    result = as_array(
        decode_image(encode(Image.fromarray(photo), "JPEG", quality=95), "image/jpeg", POLICY)
    )
    assert result[:, 14].min() > 200  # the object spans the full height after trimming
    assert (
        result[:, :7].max() < 30 and result[:, -7:].max() < 30
    )  # padded left and right with black


def test_transparent_dark_object_is_composited_to_contrast() -> None:
    """A dark object on transparency is composited on white, then inverted: light object on black."""
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[10:30, 15:25] = (30, 30, 30, 255)  # 20 tall, 10 wide
    result = as_array(
        decode_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"), "image/png", POLICY)
    )
    assert result[14, 14] > 200 and result[14, 0] < 30


def test_first_frame_of_an_animated_gif_is_used() -> None:
    """Animated images contribute their first frame only."""
    first = Image.fromarray(fashion_like(1))
    second = Image.fromarray(np.full((28, 28), 128, np.uint8))
    gif = encode(first, "GIF", save_all=True, append_images=[second])
    assert as_array(decode_image(gif, "image/gif", POLICY))[0, 1] == 0


def test_exif_orientation_is_applied() -> None:
    """A JPEG tagged "rotate 90°" is decoded upright."""
    pixels = np.zeros((20, 40), np.uint8)
    pixels[:, :20] = 255  # light left half, wide image
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    upright = as_array(
        decode_image(encode(image, "JPEG", exif=exif.tobytes(), quality=100), "image/jpeg", POLICY)
    )
    assert upright[2:10, 10:18].mean() > 200  # the light half is now at the top


def test_rgb_model_gets_three_channels_without_inversion() -> None:
    """For a 3-channel model the output is C×H×W RGB and light backgrounds are kept."""
    policy = ImagePolicy(channels=3, height=16, width=16)
    image = Image.new("RGB", (16, 16), (250, 10, 10))
    result = as_array(decode_image(encode(image, "PNG"), "image/png", policy), (3, 16, 16))
    assert result[0].min() == 250 and result[1].max() == 10


def test_npy_batch_is_split_into_model_inputs() -> None:
    """An N×28×28 uint8 array becomes N payloads of 784 bytes."""
    array = np.stack([fashion_like(i) for i in range(3)])
    payloads = decode_array_batch(npy_bytes(array), POLICY, max_images=8)
    assert payloads == [image.tobytes() for image in array]


@pytest.mark.parametrize(
    ("array", "code"),
    [
        (np.zeros((2, 28, 28), np.float32), "invalid_array"),
        (np.zeros((2, 27, 28), np.uint8), "invalid_array"),
        (np.zeros((9, 28, 28), np.uint8), "too_many_images"),
    ],
    ids=["float", "wrong-shape", "too-many"],
)
def test_bad_npy_arrays_are_refused(array: np.ndarray, code: str) -> None:
    """Wrong dtype, shape or count is a client error naming what was expected."""
    with pytest.raises(ApiError) as refused:
        decode_array_batch(npy_bytes(array), POLICY, max_images=8)
    assert refused.value.code == code


def test_npy_header_promising_more_data_than_sent_is_refused_without_allocating() -> None:
    """A header claiming 10⁹ images with a few bytes of data is refused before any allocation."""
    header = npy_bytes(np.zeros((1, 28, 28), np.uint8)).replace(
        b"(1, 28, 28)", b"(1000000000, 28, 28)"
    )
    with pytest.raises(ApiError) as refused:
        decode_array_batch(header, POLICY, max_images=10**10)
    assert refused.value.code == "invalid_array"


def test_npy_of_one_hxw_image_is_accepted_as_a_single_upload() -> None:
    """The single-image route's documented H×W array gives that one model input."""
    pixels = fashion_like(5)
    assert decode_array(npy_bytes(pixels), POLICY) == pixels.tobytes()


def test_npy_of_several_images_is_refused_as_a_single_upload() -> None:
    """An N×H×W array with N > 1 is not one image: 422 naming the batch route."""
    with pytest.raises(ApiError) as refused:
        decode_array(npy_bytes(np.zeros((2, 28, 28), np.uint8)), POLICY)
    assert refused.value.status == 422 and ":batch" in refused.value.message


def test_npy_of_an_unknown_format_version_is_refused() -> None:
    """A `.npy` header claiming format version 9.9 is 422, naming the versions read."""
    data = bytearray(npy_bytes(np.zeros((1, 28, 28), np.uint8)))
    data[6:8] = bytes([9, 9])  # the major and minor version bytes after the magic string
    with pytest.raises(ApiError) as refused:
        decode_array_batch(bytes(data), POLICY, max_images=8)
    assert refused.value.code == "invalid_array" and "9.9" in refused.value.message


def test_fortran_ordered_npy_says_so() -> None:
    """A Fortran-ordered uint8 array is refused for its order, not its dtype."""
    array = np.asfortranarray(np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(ApiError) as refused:
        decode_array_batch(npy_bytes(array), POLICY, max_images=8)
    assert "Fortran" in refused.value.message and "got uint8" not in refused.value.message


@pytest.mark.parametrize("size", [(1, 65), (65, 1), (2, 200)], ids=["tall", "wide", "2x200"])
def test_extreme_aspect_ratio_is_422_naming_the_setting(size: tuple[int, int]) -> None:
    """An image whose long side is over FMNIST_MAX_IMAGE_ASPECT_RATIO times its short side is refused."""
    with pytest.raises(ApiError) as refused:
        decode_image(encode(Image.new("L", size), "PNG"), "image/png", POLICY)
    assert refused.value.status == 422 and refused.value.code == "unsupported_aspect_ratio"
    assert "FMNIST_MAX_IMAGE_ASPECT_RATIO" in refused.value.message


def test_aspect_ratio_at_the_limit_is_accepted() -> None:
    """An image exactly FMNIST_MAX_IMAGE_ASPECT_RATIO times longer than wide is decoded."""
    policy = ImagePolicy(max_aspect_ratio=64)
    assert len(decode_image(encode(Image.new("L", (1, 64)), "PNG"), "image/png", policy)) == 784


@pytest.mark.parametrize("image_format", ["PNG", "JPEG", "GIF", "BMP", "WEBP"])
def test_extreme_aspect_ratio_is_refused_in_every_format(image_format: str) -> None:
    """The aspect-ratio limit applies to each accepted format."""
    image = encode(Image.new("RGB", (4000, 4)), image_format)
    with pytest.raises(ApiError) as refused:
        decode_image(image, None, POLICY)
    assert refused.value.code == "unsupported_aspect_ratio"


@pytest.mark.parametrize("image_format", ["PNG", "BMP"])
def test_extreme_aspect_ratio_is_refused_from_the_header(image_format: str) -> None:
    """The refusal needs only the header: the file cut off after it is refused the same way."""
    whole = encode(Image.new("RGB", (4, 4000)), image_format)
    with pytest.raises(ApiError) as refused:
        decode_image(whole[:64], None, POLICY)
    assert refused.value.code == "unsupported_aspect_ratio"


def test_header_reports_the_size_without_decoding() -> None:
    """`read_header` gives width and height of a PNG whose pixel data is missing."""
    header = read_header(encode(Image.new("RGB", (300, 200)), "PNG")[:40], None, POLICY)
    assert (header.width, header.height, header.pixels) == (300, 200, 60_000)
