"""The image policy's pixel conversion (`ml.imaging`), shared by the gateway and image-folder data sets."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ml.imaging import to_model_input


def _pixels(data: bytes, channels: int, height: int, width: int) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8).reshape(channels, height, width)


def test_rgb_image_is_fitted_keeping_its_aspect_and_padded_black() -> None:
    """A white 64×32 RGB image becomes a 16×32 white band centred in a black 32×32 input."""
    image = Image.new("RGB", (64, 32), (255, 255, 255))
    pixels = _pixels(to_model_input(image, 3, 32, 32), 3, 32, 32)
    assert (pixels[:, 8:24, :] == 255).all()
    assert (pixels[:, :8, :] == 0).all() and (pixels[:, 24:, :] == 0).all()


def test_rgb_channels_come_out_channel_first() -> None:
    """A pure red image gives 255 in channel 0 and 0 in channels 1 and 2."""
    pixels = _pixels(to_model_input(Image.new("RGB", (8, 8), (255, 0, 0)), 3, 8, 8), 3, 8, 8)
    assert (pixels[0] == 255).all() and (pixels[1:] == 0).all()


def test_dark_object_on_light_grayscale_is_inverted() -> None:
    """A black square on white comes out light on black, as Fashion-MNIST's images are."""
    array = np.full((28, 28), 255, dtype=np.uint8)
    array[10:18, 10:18] = 0
    pixels = _pixels(to_model_input(Image.fromarray(array, "L"), 1, 28, 28), 1, 28, 28)
    assert pixels[0, 0, 0] == 0 and pixels[0, 14, 14] == 255


def test_inversion_can_be_turned_off() -> None:
    """auto_invert=False keeps a light-bordered grayscale image as it is."""
    array = np.full((28, 28), 255, dtype=np.uint8)
    array[10:18, 10:18] = 0
    raw = to_model_input(Image.fromarray(array, "L"), 1, 28, 28, auto_invert=False)
    assert raw == array.tobytes()


def test_grayscale_object_is_trimmed_to_its_bounding_box_then_fitted() -> None:
    """A small light square in a corner of a large dark image fills the grayscale input."""
    array = np.zeros((100, 100), dtype=np.uint8)
    array[5:25, 5:25] = 200
    pixels = _pixels(to_model_input(Image.fromarray(array, "L"), 1, 28, 28), 1, 28, 28)
    assert (pixels[0, 2:26, 2:26] > 150).all()


def test_channel_counts_other_than_1_and_3_are_refused() -> None:
    """The policy knows grayscale and RGB; 4 channels is a ValueError, not a wrong-sized input."""
    with pytest.raises(ValueError, match="1 \\(grayscale\\) or 3 \\(RGB\\)"):
        to_model_input(Image.new("RGBA", (8, 8)), 4, 8, 8)
