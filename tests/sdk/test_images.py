"""Image inputs the SDK accepts (paths, bytes, files, PIL images, numpy arrays) and how it encodes them."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
from fmnist_client._images import encode_image, encode_png, sniff_content_type
from PIL import Image


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


GRADIENT = (np.arange(28 * 28) % 256).astype(np.uint8).reshape(28, 28)


def test_path_is_read_and_typed_from_its_bytes(tmp_path: Path) -> None:
    """A path uploads the file's bytes with the type sniffed from them, not from the suffix."""
    path = tmp_path / "shirt.jpg"  # misleading suffix: the bytes are PNG
    path.write_bytes(_png(GRADIENT))
    payload = encode_image(path)
    assert (payload.content, payload.content_type, payload.filename) == (
        path.read_bytes(),
        "image/png",
        "shirt.jpg",
    )


def test_missing_path_names_the_file(tmp_path: Path) -> None:
    """A path that does not exist fails before any request, naming the path."""
    with pytest.raises(FileNotFoundError, match=r"nope\.png"):
        encode_image(tmp_path / "nope.png")


def test_binary_file_object_is_read() -> None:
    """A binary file object uploads its content."""
    data = _png(GRADIENT)
    assert encode_image(io.BytesIO(data)).content == data


def test_text_file_object_is_refused_with_the_fix(tmp_path: Path) -> None:
    """A file opened in text mode is refused with the instruction to open it with 'rb'."""
    path = tmp_path / "x.txt"
    path.write_text("hello")
    with path.open() as handle, pytest.raises(TypeError, match="'rb'"):
        encode_image(handle)


def test_pil_image_is_sent_as_png() -> None:
    """A PIL image is encoded losslessly as PNG."""
    payload = encode_image(Image.fromarray(GRADIENT))
    assert payload.content_type == "image/png"
    assert np.array_equal(_decode(payload.content), GRADIENT)


@pytest.mark.parametrize("shape", [(28, 28), (28, 28, 1), (9, 7, 3), (9, 7, 4)])
def test_uint8_arrays_round_trip(shape: tuple[int, ...]) -> None:
    """uint8 arrays H×W and H×W×C (C = 1, 3, 4) arrive pixel for pixel."""
    array = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    decoded = _decode(encode_image(array).content)
    assert np.array_equal(decoded, array.reshape(decoded.shape))


def test_float_arrays_in_unit_range_are_scaled() -> None:
    """Float arrays in [0, 1] are scaled to 0..255."""
    decoded = _decode(encode_image(np.array([[0.0, 0.5, 1.0]])).content)
    assert decoded.tolist() == [[0, 128, 255]]


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((3, 28, 28), dtype=np.uint8), "transpose"),
        (np.full((2, 2), 2.0), r"\[0, 1\]"),
        (np.zeros((2, 2), dtype=np.int32), "uint8"),
    ],
)
def test_bad_arrays_are_refused_with_the_fix(array: np.ndarray, message: str) -> None:
    """C×H×W, out-of-range floats and other dtypes are refused, saying what to pass."""
    with pytest.raises(ValueError, match=message):
        encode_image(array)


def test_unknown_objects_are_refused() -> None:
    """Anything else is a TypeError listing what is accepted."""
    with pytest.raises(TypeError, match="file path, encoded image bytes"):
        encode_image(42)


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_pure_python_png_encoder_is_valid(channels: int) -> None:
    """The zlib-only PNG encoder (used without Pillow) writes files Pillow decodes exactly."""
    array = np.random.default_rng(1).integers(0, 256, size=(5, 6, channels), dtype=np.uint8)
    decoded = _decode(encode_png(array.tobytes(), width=6, height=5, channels=channels))
    assert np.array_equal(decoded, array.squeeze(-1) if channels == 1 else array)


def test_arrays_encode_without_pillow(monkeypatch: pytest.MonkeyPatch) -> None:
    """With Pillow missing, a uint8 array is still encoded, by the built-in encoder."""
    monkeypatch.setitem(sys.modules, "PIL", None)  # makes `from PIL import Image` raise ImportError
    payload = encode_image(GRADIENT)
    monkeypatch.undo()
    assert np.array_equal(_decode(payload.content), GRADIENT)


@pytest.mark.parametrize(
    ("head", "content_type"),
    [
        (b"\x89PNG\r\n\x1a\n....", "image/png"),
        (b"\xff\xd8\xff\xe0", "image/jpeg"),
        (b"GIF89a", "image/gif"),
        (b"BM....", "image/bmp"),
        (b"RIFF\x00\x00\x00\x00WEBPVP8 ", "image/webp"),
        (b"hello", "application/octet-stream"),
    ],
)
def test_content_type_is_sniffed(head: bytes, content_type: str) -> None:
    """Raw bytes get the content type of their magic number, else octet-stream for the gateway to sniff."""
    assert sniff_content_type(head) == content_type
