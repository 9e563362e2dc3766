"""`fmnist train` and `fmnist evaluate` end to end on a tiny real subset: checkpoint, plots, card."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.cli import main

pytestmark = pytest.mark.data


def test_train_then_evaluate_writes_checkpoint_and_reports(
    fashion_mnist_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A one-epoch run writes the checkpoint, two PNGs and a card; evaluate reads it back."""
    out = tmp_path / "tiny.safetensors"
    code = main(
        [
            "train",
            "--data-dir",
            str(fashion_mnist_dir),
            "--subset",
            "600",
            "--val-size",
            "200",
            "--epochs",
            "1",
            "--batch-size",
            "64",
            "--widths",
            "8,16",
            "--convs",
            "1,1",
            "--throughput-seconds",
            "0.1",
            "--no-progress",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    for name in ("tiny.safetensors", "tiny.md", "tiny-curves.png", "tiny-confusion.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    card = (tmp_path / "tiny.md").read_text()
    assert "fmnist train --data-dir" in card and "images/s" in card
    capsys.readouterr()

    code = main(["evaluate", str(out), "--data-dir", str(fashion_mnist_dir), "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["num_samples"] == 10_000 and 0.0 <= result["accuracy"] <= 1.0
    assert (tmp_path / "tiny-evaluation.md").is_file()


def test_evaluate_card_rewrites_the_model_card_from_the_checkpoint(
    fashion_mnist_dir: Path, tmp_path: Path
) -> None:
    """`evaluate --card` rebuilds the card (command, bf16 accuracy, both throughputs) from the file."""
    out = tmp_path / "tiny.safetensors"
    common = ["--data-dir", str(fashion_mnist_dir)]
    train = ["train", *common, "--subset", "300", "--val-size", "100", "--epochs", "1"]
    assert (
        main(
            [
                *train,
                "--widths",
                "8,16",
                "--convs",
                "1,1",
                "--no-report",
                "--no-progress",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert not (tmp_path / "tiny.md").exists()
    code = main(
        ["evaluate", str(out), *common, "--card", "--no-report", "--throughput-seconds", "0.1"]
    )
    assert code == 0
    card = (tmp_path / "tiny.md").read_text()
    assert "fmnist train --data-dir" in card
    assert "| bf16 | 64 |" in card and "| fp32 | 64 |" in card and "n/a |\n" not in card
    assert "test accuracy, bf16 inference | n/a" not in card


def test_evaluate_reports_a_bad_checkpoint_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A corrupt checkpoint gives exit code 2 and a one-line reason on stderr."""
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x00" * 4)
    assert main(["evaluate", str(path), "--no-report"]) == 2
    assert "too short" in capsys.readouterr().err
