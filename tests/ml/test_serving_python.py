"""ml.serving: a Python class named as package.module:Class, served end to end through ModelRunner."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch

from ml import ImageClassifier
from ml.serving import ModelLoadError, load_model
from tests.ml.serving_contract import (
    Gated,
    check_batches,
    check_deadline_drops_before_compute,
    check_poison_fails_alone,
)

pytestmark = pytest.mark.timeout(60)

EXAMPLE = "examples.python_model.mirrored:MirroredFashion"


class Brightness:
    """Three classes by mean brightness; refuses all-white images (a real per-item failure)."""

    class_names = ("dark", "mid", "light")
    input_shape = (1, 8, 8)
    preprocessing: ClassVar[dict[str, object]] = {"mean": [0.5], "std": [0.25], "resize": "stretch"}
    setups: ClassVar[list[torch.device]] = []

    def setup(self, device: torch.device) -> None:
        self.setups.append(device)

    def predict(self, batch: torch.Tensor) -> torch.Tensor:
        means = batch.float().flatten(1).mean(dim=1) / 255.0
        if bool((means == 1.0).any()):
            raise ValueError("an all-white image has no object to classify")
        centres = torch.tensor([0.15, 0.5, 0.85])
        return torch.softmax(-((means[:, None] - centres) ** 2) * 50.0, dim=1)


class NoShape:
    """Forgets input_shape."""

    class_names = ("a",)

    def setup(self, device: torch.device) -> None: ...

    def predict(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.ones(len(batch), 1)


class NoPredict:
    """Lacks predict."""

    class_names = ("a",)
    input_shape = (1, 2, 2)

    def setup(self, device: torch.device) -> None: ...


def test_the_example_class_describes_itself_after_setup() -> None:
    """Name, tag, version, shape, classes and preprocessing come from the instance after setup."""
    served = load_model(EXAMPLE, device="cpu", precision="fp32")
    shipped = ImageClassifier.load("ml/shipped/fmnist.safetensors", device="cpu")
    announced = served.description.to_json()
    assert (announced["name"], announced["tag"], announced["form"]) == (
        "fmnist-mirrored",
        "tta",
        "python",
    )
    assert announced["version"] == f"mirrored-{shipped.version}"
    assert announced["class_names"] == list(shipped.class_names)
    assert announced["input_shape"] == [1, 28, 28]
    assert announced["preprocessing"]["auto_invert"] is True


def test_the_example_averages_each_image_with_its_mirror() -> None:
    """preprocess, predict and postprocess run in order: the mean of the two views' probabilities."""
    served = load_model(EXAMPLE, device="cpu", precision="fp32")
    shipped = ImageClassifier.load("ml/shipped/fmnist.safetensors", device="cpu")
    images = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)
    expected = (shipped.predict(images) + shipped.predict(images.flip(-1))) / 2
    torch.testing.assert_close(served.predict(images), expected)


def test_a_class_without_a_version_gets_a_hash_of_its_source() -> None:
    """No version attribute: a 12-hex content hash, the same on every load."""
    source = "tests.ml.test_serving_python:Brightness"
    first = load_model(source, device="cpu", precision="fp32")
    assert len(first.version) == 12 and int(first.version, 16) >= 0
    assert load_model(source, device="cpu", precision="fp32").version == first.version
    assert first.name == "Brightness"
    assert first.description.preprocessing.resize == "stretch"


def test_setup_is_given_the_resolved_device() -> None:
    """device "auto" reaches setup() as a concrete torch.device."""
    Brightness.setups.clear()
    load_model("tests.ml.test_serving_python:Brightness", device="auto", precision="fp32")
    assert Brightness.setups[0].type in ("cpu", "cuda")


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("no_such_package.models:Model", "cannot import 'no_such_package.models'"),
        ("tests.ml.test_serving_python:Missing", "has no attribute 'Missing'"),
        ("tests.ml.test_serving_python:NoPredict", r"lacks predict\(\)"),
        ("tests.ml.test_serving_python:NoShape", "input_shape must be three positive ints"),
    ],
)
def test_a_class_that_cannot_be_served_is_refused_at_load(source: str, message: str) -> None:
    """Import errors, a missing class, method or shape fail at load with what to fix."""
    with pytest.raises(ModelLoadError, match=message):
        load_model(source, device="cpu")


async def test_a_python_class_is_batched_by_the_runner() -> None:
    """Concurrent submits reach the class's predict as one batch."""
    await check_batches(load_model(EXAMPLE, device="cpu", precision="fp32"))


async def test_an_image_the_class_refuses_fails_alone() -> None:
    """The class raising for one image fails that image with ModelError; the rest are answered."""
    served = load_model("tests.ml.test_serving_python:Brightness", device="cpu", precision="fp32")
    await check_poison_fails_alone(served)
    with pytest.raises(ValueError, match="all-white"):
        served.predict(torch.full((1, 1, 8, 8), 255, dtype=torch.uint8))


async def test_deadlines_apply_to_a_python_class() -> None:
    """An image that expires while the class is busy is never computed."""
    served = load_model("tests.ml.test_serving_python:Brightness", device="cpu", precision="fp32")
    await check_deadline_drops_before_compute(Gated(served))
