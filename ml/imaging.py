"""The image policy's pixel conversion: a decoded Pillow image to a model's uint8 C×H×W input.

Pillow and numpy only (no torch), so the gateway (for uploads) and `ml.folders` (for training and
evaluation images) convert with one implementation and a model sees the same pixels in both.
The policy, as docs/api.md documents it:

1. EXIF orientation is applied; huge images are first reduced by an integer factor.
2. Transparent pixels are composited on the background that contrasts with the visible pixels.
3. Single-channel models (Fashion-MNIST: a light object on a black background): convert to 8-bit
   grayscale ("L"); if the border is mostly light the image is inverted, so dark-on-light photos and
   drawings work; the object is trimmed to its bounding box. Multi-channel models: RGB, no inversion
   or trim.
4. Fit inside the model's H×W keeping the aspect ratio, centred, padded with black.
A grayscale image already at the model's size skips steps 1-4 except the inversion check.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

__all__ = ["INVERT", "PRESHRINK_FACTOR", "frame_is_light", "to_model_input"]

# Background levels: above this mean border brightness a grayscale image is treated as dark-on-light.
LIGHT_BORDER = 127.5
# A pixel belongs to the object when it is this much brighter than the (dark) background.
TRIM_THRESHOLD = 24
# Large images are first reduced (cheaply) to at most this multiple of the model's size.
PRESHRINK_FACTOR = 4
# `bytes.translate` table that inverts 8-bit grayscale.
INVERT = bytes(range(255, -1, -1))


def to_model_input(
    image: Image.Image, channels: int, height: int, width: int, *, auto_invert: bool = True
) -> bytes:
    """Turn a decoded Pillow image into a model's uint8 C×H×W bytes (see the module docstring).

    `channels` 1 gives grayscale, any other count RGB (3); `auto_invert` turns the dark-on-light
    inversion of grayscale images on or off."""
    if channels not in (1, 3):
        raise ValueError(
            f"the image policy converts to 1 (grayscale) or 3 (RGB) channels, not {channels}"
        )
    grayscale = channels == 1
    if grayscale and image.mode == "L" and image.size == (width, height):
        # The hot path (already the model's size): plain bytes operations, no numpy round trip.
        raw = image.tobytes()
        if auto_invert and frame_is_light(raw, width):
            raw = raw.translate(INVERT)
        return raw

    if "exif" in image.info:
        image = ImageOps.exif_transpose(image)
    _preshrink(image, height, width)
    image = _flatten_alpha(image, "L" if grayscale else "RGB")
    pixels = np.asarray(image)
    if grayscale:
        if auto_invert and _border_is_light(pixels):
            pixels = 255 - pixels
        pixels = _trim(pixels)
    array = np.asarray(_fit(Image.fromarray(np.ascontiguousarray(pixels)), height, width))
    if not grayscale:
        array = array.transpose(2, 0, 1)  # H×W×C → C×H×W
    return np.ascontiguousarray(array).tobytes()


def _preshrink(image: Image.Image, height: int, width: int) -> None:
    """Reduce huge images by an integer factor first: trimming and fitting then touch few pixels."""
    limit = (width * PRESHRINK_FACTOR, height * PRESHRINK_FACTOR)
    if image.width > 2 * limit[0] and image.height > 2 * limit[1]:
        image.thumbnail(limit, Image.Resampling.BOX, reducing_gap=None)


def _flatten_alpha(image: Image.Image, mode: str) -> Image.Image:
    """Convert to `mode`, compositing transparency on a background that contrasts with the object."""
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if not has_alpha:
        return image.convert(mode) if image.mode != mode else image
    rgba = image.convert("RGBA")
    alpha = np.asarray(rgba.getchannel("A"))
    luminance = np.asarray(rgba.convert("L"))
    visible = alpha > 0
    object_is_dark = bool(visible.any()) and float(luminance[visible].mean()) < LIGHT_BORDER
    background = Image.new(
        "RGBA", rgba.size, (255, 255, 255, 255) if object_is_dark else (0, 0, 0, 255)
    )
    return Image.alpha_composite(background, rgba).convert(mode)


def frame_is_light(raw: bytes, width: int) -> bool:
    """`_border_is_light` for row-major grayscale bytes."""
    inner = raw[width:-width]
    frame = raw[:width] + raw[-width:] + inner[::width] + inner[width - 1 :: width]
    return sum(frame) / len(frame) > LIGHT_BORDER


def _border_is_light(pixels: np.ndarray) -> bool:
    """True when the one-pixel frame of a grayscale image is mostly light (dark object on light)."""
    frame_sum = (
        int(pixels[0].sum())
        + int(pixels[-1].sum())
        + int(pixels[1:-1, 0].sum())
        + int(pixels[1:-1, -1].sum())
    )
    frame_len = 2 * pixels.shape[1] + 2 * max(pixels.shape[0] - 2, 0)
    return frame_sum / max(frame_len, 1) > LIGHT_BORDER


def _trim(pixels: np.ndarray) -> np.ndarray:
    """Crop a light-on-dark grayscale image to the bounding box of its object (Fashion-MNIST's framing)."""
    background = int(
        np.median(np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]]))
    )
    mask = pixels > background + TRIM_THRESHOLD
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return pixels
    cols = np.flatnonzero(mask.any(axis=0))
    return pixels[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def _fit(image: Image.Image, height: int, width: int) -> Image.Image:
    """Resize to fit inside H×W keeping the aspect ratio, centred on a black canvas."""
    scale = min(width / image.width, height / image.height)
    size = (
        max(1, min(width, round(image.width * scale))),
        max(1, min(height, round(image.height * scale))),
    )
    if size != image.size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    if size == (width, height):
        return image
    canvas = Image.new(image.mode, (width, height), 0)
    canvas.paste(image, ((width - size[0]) // 2, (height - size[1]) // 2))
    return canvas
