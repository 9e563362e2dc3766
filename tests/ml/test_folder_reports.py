"""Model card and evaluation report for a model trained and evaluated on an image folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from ml.classifier import ImageClassifier
from ml.folders import describe, folder_for_model, folder_splits
from ml.report import evaluation_report, write_model_card
from tests.ml.shapes import SHAPE_NAMES, write_shape_folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(image folder, checkpoint) of a one-epoch model trained on a generated shapes folder."""
    root = write_shape_folder(tmp_path_factory.mktemp("shapes"), per_class=10, seed=0, size=16)
    splits = folder_splits(root, seed=0)
    channels, height, width = splits.input_shape
    classifier = ImageClassifier(channels, 4, (height, width), splits.class_names, device="cpu")
    classifier.fit(splits.train, splits.val, epochs=1, progress=False)
    classifier.training["data"] = describe(root, splits.train, "training split")
    checkpoint = tmp_path_factory.mktemp("model") / "shapes.safetensors"
    classifier.save(checkpoint)
    return root, checkpoint


def test_model_card_names_the_folder_and_its_classes(trained: tuple[Path, Path]) -> None:
    """The card of a folder-trained model names the folder, its shape, classes and the held-out set."""
    root, checkpoint = trained
    classifier = ImageClassifier.load(checkpoint, device="cpu")
    held_out = folder_splits(root, seed=0).val
    result = classifier.evaluate(held_out)
    paths = write_model_card(
        classifier,
        checkpoint,
        result,
        [],
        "(test)",
        data=describe(root, held_out, "validation split"),
    )
    card = paths["card"].read_text()
    assert f"training split of image folder `{root}`: 36 images, 3×16×16" in card
    assert "| test figures measured on | validation split of image folder" in card
    assert all(name in card for name in SHAPE_NAMES)
    assert paths["confusion"].stat().st_size > 0


def test_evaluation_report_of_a_folder_names_it(trained: tuple[Path, Path], tmp_path: Path) -> None:
    """`evaluation_report` on a folder data set writes the folder's line and a confusion matrix PNG."""
    root, checkpoint = trained
    classifier = ImageClassifier.load(checkpoint, device="cpu")
    dataset = folder_for_model(root, classifier.input_shape, classifier.class_names)
    result = classifier.evaluate(dataset)
    paths = evaluation_report(
        classifier, checkpoint, result, tmp_path, data=describe(root, dataset)
    )
    report = paths["card"].read_text()
    assert f"- data: image folder `{root}`: 40 images, 3×16×16, classes circle" in report
    assert result.num_samples == 40 and paths["confusion"].stat().st_size > 0
