"""Image-folder data sets (`ml.folders`): classes from folders, shape from the data, seeded splits, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ml import folders
from ml.data import DataError, TensorImageDataset
from ml.folders import (
    find_images,
    folder_for_model,
    folder_splits,
    infer_input_shape,
    load_image_folder,
    stratified_split,
)
from tests.ml.shapes import SHAPE_NAMES, write_shape_folder


def _save(path: Path, mode: str, size: tuple[int, int], value: int = 128) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value, value, value)).save(path)


def test_classes_are_the_sorted_folder_names_and_only_images_count(tmp_path: Path) -> None:
    """Sub-folders sorted as ImageFolder sorts them; nested images count, other files do not."""
    _save(tmp_path / "b" / "1.PNG", "RGB", (8, 8))
    _save(tmp_path / "b" / "deeper" / "2.jpg", "RGB", (8, 8))
    _save(tmp_path / "a" / "3.bmp", "RGB", (8, 8))
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    classes, items = find_images(tmp_path)
    assert classes == ["a", "b"]
    assert [(path.name, label) for path, label in items] == [
        ("3.bmp", 0),
        ("1.PNG", 1),
        ("2.jpg", 1),
    ]


def test_input_shape_is_the_most_common_size_and_mode(tmp_path: Path) -> None:
    """Two RGB 40×20 images and one grayscale 10×10: 3×20×40."""
    _save(tmp_path / "a" / "1.png", "RGB", (40, 20))
    _save(tmp_path / "a" / "2.png", "RGB", (40, 20))
    _save(tmp_path / "b" / "3.png", "L", (10, 10))
    _, items = find_images(tmp_path)
    assert infer_input_shape([path for path, _ in items]) == (3, 20, 40)


def test_images_are_converted_to_one_shape_by_the_image_policy(tmp_path: Path) -> None:
    """An odd-sized image is fitted into the common size, padded black, as the gateway fits uploads."""
    _save(tmp_path / "a" / "1.png", "RGB", (16, 16), 200)
    _save(tmp_path / "a" / "2.png", "RGB", (16, 16), 200)
    _save(tmp_path / "b" / "3.png", "RGB", (16, 8), 200)
    dataset = load_image_folder(tmp_path)
    assert dataset.images.shape == (3, 3, 16, 16) and dataset.images.dtype == torch.uint8
    assert dataset.labels.tolist() == [0, 0, 1]
    wide = dataset.images[2]
    assert (wide[:, 4:12] == 200).all() and (wide[:, :4] == 0).all()


def test_explicit_channels_and_size_override_the_data(tmp_path: Path) -> None:
    """channels=1, size=(8, 8) turns RGB 16×16 images into grayscale 8×8."""
    write_shape_folder(tmp_path, per_class=2, seed=0, size=16)
    dataset = load_image_folder(tmp_path, channels=1, size=(8, 8))
    assert dataset.images.shape == (8, 1, 8, 8)
    assert dataset.class_names == SHAPE_NAMES


def test_a_folder_without_images_is_named_in_the_error(tmp_path: Path) -> None:
    """An empty class folder is a DataError naming it, not a silently missing class."""
    _save(tmp_path / "a" / "1.png", "RGB", (8, 8))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        load_image_folder(tmp_path)


def test_an_undecodable_file_is_named_in_the_error(tmp_path: Path) -> None:
    """A corrupt .png is a DataError naming the file."""
    _save(tmp_path / "a" / "1.png", "RGB", (8, 8))
    _save(tmp_path / "b" / "2.png", "RGB", (8, 8))
    (tmp_path / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(DataError, match=r"broken\.png"):
        load_image_folder(tmp_path)


def test_a_set_too_large_for_memory_is_refused_before_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loading is eager: a set needing more than half the available memory is a DataError."""
    write_shape_folder(tmp_path, per_class=1, seed=0, size=16)
    monkeypatch.setattr(folders, "_available_memory", lambda: 1000)
    with pytest.raises(DataError, match="in memory"):
        load_image_folder(tmp_path)


def test_stratified_split_is_seeded_disjoint_and_keeps_class_shares() -> None:
    """A tenth of each class is held out; the seed reproduces the split; nothing is lost or doubled."""
    labels = torch.tensor([0] * 80 + [1] * 20)
    images = torch.arange(100, dtype=torch.uint8).view(100, 1, 1, 1)
    dataset = TensorImageDataset(images, labels, ["a", "b"])
    train, val = stratified_split(dataset, 0.1, seed=3)
    assert torch.bincount(val.labels).tolist() == [8, 2]
    assert sorted(train.images.flatten().tolist() + val.images.flatten().tolist()) == list(
        range(100)
    )
    again = stratified_split(dataset, 0.1, seed=3)[1]
    assert torch.equal(again.images, val.images)
    other = stratified_split(dataset, 0.1, seed=4)[1]
    assert not torch.equal(other.images, val.images)


def test_folder_splits_feed_fit_and_evaluate(tmp_path: Path) -> None:
    """A generated folder trains an ImageClassifier of the folder's shape and classes for one epoch."""
    from ml.classifier import ImageClassifier

    splits = folder_splits(write_shape_folder(tmp_path, per_class=10, seed=0, size=16), seed=0)
    assert splits.input_shape == (3, 16, 16) and splits.class_names == SHAPE_NAMES
    assert (len(splits.train), len(splits.val)) == (36, 4)
    channels, height, width = splits.input_shape
    classifier = ImageClassifier(channels, 4, (height, width), splits.class_names, device="cpu")
    classifier.fit(splits.train, splits.val, epochs=1, progress=False)
    assert classifier.evaluate(splits.val).num_samples == 4


def test_evaluation_folder_labels_follow_the_models_class_order(tmp_path: Path) -> None:
    """A folder holding two of the model's classes gets the model's indices for them."""
    write_shape_folder(tmp_path, per_class=2, seed=0, size=16)
    for name in ("circle", "cross"):
        for file in (tmp_path / name).iterdir():
            file.unlink()
        (tmp_path / name).rmdir()
    dataset = folder_for_model(tmp_path, (3, 16, 16), ["x", *SHAPE_NAMES])
    assert sorted(set(dataset.labels.tolist())) == [3, 4]
    assert dataset.class_names == ["x", *SHAPE_NAMES]


def test_evaluation_folder_with_an_unknown_class_names_it(tmp_path: Path) -> None:
    """A class folder the model does not know is a DataError naming the folder and the model's classes."""
    write_shape_folder(tmp_path, per_class=1, seed=0, size=16)
    with pytest.raises(DataError, match=r"\['triangle'\].*\['circle', 'cross', 'square'\]"):
        folder_for_model(tmp_path, (3, 16, 16), ["circle", "cross", "square"])


def test_evaluation_folder_of_another_shape_names_both_shapes(tmp_path: Path) -> None:
    """RGB 16×16 images for a 1×28×28 model: a DataError naming both, unless convert=True."""
    write_shape_folder(tmp_path, per_class=1, seed=0, size=16)
    with pytest.raises(DataError, match=r"3×16×16.*1×28×28"):
        folder_for_model(tmp_path, (1, 28, 28), SHAPE_NAMES)
    converted = folder_for_model(tmp_path, (1, 28, 28), SHAPE_NAMES, convert=True)
    assert converted.images.shape == (4, 1, 28, 28)


def test_grayscale_pngs_load_as_one_channel(tmp_path: Path) -> None:
    """Mode "L" images give a 1×H×W set with their own pixels (no inversion of light-on-dark)."""
    array = np.zeros((12, 12), dtype=np.uint8)
    array[4:8, 4:8] = 255
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        Image.fromarray(array, "L").save(tmp_path / name / "1.png")
    dataset = load_image_folder(tmp_path)
    assert dataset.images.shape == (2, 1, 12, 12)
    assert dataset.images[0, 0].numpy().tobytes() == array.tobytes()
