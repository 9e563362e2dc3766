"""`fmnist train --data DIR` and `fmnist evaluate --data DIR` on a generated RGB image folder; where
`fmnist train` writes by default."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.cli import main
from ml import ImageClassifier
from tests.ml.shapes import SHAPE_NAMES, write_shape_folder

TINY = ["--widths", "8,16", "--convs", "1,1", "--no-progress", "--no-report"]


def test_train_on_a_folder_then_evaluate_on_another(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A 3×32×32, 4-class folder trains a model of that shape and classes; evaluate --data scores it."""
    train_dir = write_shape_folder(tmp_path / "shapes", per_class=40, seed=0)
    held_out = write_shape_folder(tmp_path / "held-out", per_class=10, seed=1)
    out = tmp_path / "shapes.safetensors"
    assert main(["train", "--data", str(train_dir), "--epochs", "4", *TINY, "--out", str(out)]) == 0
    model = ImageClassifier.load(out)
    assert model.input_shape == (3, 32, 32) and list(model.class_names) == SHAPE_NAMES
    assert model.training["split"] == {"data": str(train_dir), "val_fraction": 0.1, "seed": 0}
    capsys.readouterr()
    assert main(["evaluate", str(out), "--data", str(held_out), "--json", "--no-report"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["num_samples"] == 40
    assert result["accuracy"] > 0.5  # four easy classes: far above the 0.25 of guessing


def test_train_writes_to_models_name_and_never_over_a_file_without_force(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --out: models/<folder>.safetensors; run again, it refuses (exit 2) unless --force."""
    data = write_shape_folder(tmp_path / "colours", per_class=8, seed=0)
    monkeypatch.chdir(tmp_path)
    args = ["train", "--data", str(data), "--epochs", "1", *TINY]
    assert main(args) == 0
    written = tmp_path / "models" / "colours.safetensors"
    before = written.read_bytes()
    assert main(args) == 2
    assert "--force" in capsys.readouterr().err
    assert written.read_bytes() == before
    assert main([*args, "--force", "--seed", "1"]) == 0
    assert written.read_bytes() != before
