"""Turning what users hold (paths, bytes, files, PIL images, numpy arrays) into an upload body.

Pillow and numpy are optional: PIL images and arrays are recognised by duck typing, arrays
are PNG-encoded with Pillow when it is installed, else by the small encoder below (uint8 only).
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeAlias

ImageInput: TypeAlias = str | os.PathLike[str] | bytes | bytearray | memoryview | IO[bytes] | Any
"""Anything `predict()` accepts: a path, encoded bytes, a binary file object, a PIL image or a
numpy array (uint8 H×W or H×W×C with C in 1, 3, 4; floats in [0, 1] are scaled to 0..255)."""

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# (magic prefix, content type); WebP is checked separately because its magic is split.
_MAGIC = (
    (_PNG_SIGNATURE, "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
    (b"II*\x00", "image/tiff"),
    (b"MM\x00*", "image/tiff"),
)
_PNG_COLOR_TYPE = {1: 0, 3: 2, 4: 6}  # channels -> PNG colour type (grey, RGB, RGBA)


@dataclass(frozen=True)
class ImagePayload:
    """An encoded image ready to upload."""

    content: bytes
    content_type: str
    filename: str


def sniff_content_type(data: bytes) -> str:
    """The image type from the first bytes, or `application/octet-stream` (the gateway sniffs too)."""
    for magic, content_type in _MAGIC:
        if data.startswith(magic):
            return content_type
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return "application/octet-stream"


def encode_image(image: ImageInput) -> ImagePayload:
    """Encode any supported image input; raises TypeError/ValueError saying what to pass instead."""
    if isinstance(image, str | os.PathLike):
        path = Path(image)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(f"image file not found: {path}") from None
        return ImagePayload(data, sniff_content_type(data), path.name)
    if isinstance(image, bytes | bytearray | memoryview):
        data = bytes(image)
        return ImagePayload(data, sniff_content_type(data), "image")
    if hasattr(image, "read"):
        data = image.read()
        if not isinstance(data, bytes):
            raise TypeError("open image files in binary mode: open(path, 'rb')")
        name = Path(str(getattr(image, "name", "image"))).name
        return ImagePayload(data, sniff_content_type(data), name)
    if _is_pil_image(image):
        buffer = io.BytesIO()
        pil_image: Any = image
        pil_image.save(buffer, format="PNG")
        return ImagePayload(buffer.getvalue(), "image/png", "image.png")
    if _is_array(image):
        return ImagePayload(_encode_array(image), "image/png", "image.png")
    raise TypeError(
        f"cannot send {type(image).__name__} as an image: pass a file path, encoded image bytes, "
        "a binary file object, a PIL image or a uint8 numpy array"
    )


def _is_pil_image(value: Any) -> bool:
    return type(value).__module__.startswith("PIL.") and hasattr(value, "save")


def _is_array(value: Any) -> bool:
    return hasattr(value, "__array_interface__") and hasattr(value, "dtype")


def _encode_array(array: Any) -> bytes:
    """PNG-encode a numpy-like array without importing numpy."""
    shape = tuple(array.shape)
    if len(shape) == 3 and shape[2] == 1:
        array, shape = array[:, :, 0], shape[:2]
    if len(shape) not in (2, 3) or (len(shape) == 3 and shape[2] not in _PNG_COLOR_TYPE):
        raise ValueError(
            f"image arrays must be H×W or H×W×C with C in 1, 3, 4 (got shape {shape}); "
            "for a C×H×W array pass array.transpose(1, 2, 0)"
        )
    if array.dtype.kind == "f":
        if array.size and (array.min() < 0 or array.max() > 1):
            raise ValueError(
                "float image arrays must hold values in [0, 1]; pass uint8 0..255 otherwise"
            )
        array = (array * 255).round().astype("uint8")
    elif str(array.dtype) != "uint8":
        raise ValueError(
            f"image arrays must be uint8 (0..255) or float in [0, 1], got {array.dtype}"
        )
    try:
        from PIL import Image
    except ImportError:
        return encode_png(array.tobytes(), width=shape[1], height=shape[0], channels=(*shape, 1)[2])
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def encode_png(pixels: bytes, *, width: int, height: int, channels: int = 1) -> bytes:
    """A minimal 8-bit PNG encoder: row-major pixels, `channels` of 1 (grey), 3 (RGB) or 4 (RGBA)."""
    stride = width * channels
    if len(pixels) != stride * height:
        raise ValueError(
            f"expected {stride * height} bytes for {width}×{height}×{channels}, got {len(pixels)}"
        )
    # Each scanline starts with filter type 0 (None); zlib does the compressing.
    raw = b"".join(b"\x00" + pixels[row * stride : (row + 1) * stride] for row in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, _PNG_COLOR_TYPE[channels], 0, 0, 0)
    return (
        _PNG_SIGNATURE
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(raw))
        + _chunk(b"IEND", b"")
    )


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
