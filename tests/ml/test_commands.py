"""`fmnist train` and `fmnist evaluate` end to end on a tiny real subset: checkpoint, plots, card."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest

from app.cli import build_parser, main
from ml import CLASS_NAMES, ImageClassifier

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


@pytest.fixture(scope="module")
def tiny_run(fashion_mnist_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-epoch `fmnist train` on 600 real images with its full report; returns the checkpoint."""
    out = tmp_path_factory.mktemp("tiny") / "tiny.safetensors"
    train = ["train", "--data-dir", str(fashion_mnist_dir), "--subset", "600", "--epochs", "1"]
    size = ["--batch-size", "64", "--widths", "8,16", "--convs", "1,1"]
    quick = ["--throughput-seconds", "0.1", "--no-progress", "--out", str(out)]
    assert main([*train, *size, *quick]) == 0
    return out


def test_card_gives_a_short_run_in_seconds(tiny_run: Path) -> None:
    """A run under a minute reads "N.N s" in the card, never "0.0 min"."""
    card = tiny_run.with_suffix(".md").read_text()
    assert "0.0 min" not in card
    assert re.search(r"\| training time \(wall\) \| [0-9.]+ s \(", card), card
    assert re.search(r"\| training time \(process CPU\) \| [0-9.]+ s,", card), card


def test_card_reports_calibration_with_a_reliability_diagram(tiny_run: Path) -> None:
    """The card states the fitted temperature and test ECE before and after, beside a reliability PNG."""
    card = tiny_run.with_suffix(".md").read_text()
    temperature = ImageClassifier.load(tiny_run, device="cpu").temperature
    assert temperature != 1.0
    assert f"| temperature T | 1 | {temperature:.4f} |" in card
    assert re.search(r"\| ECE \(15 bins\) \| [0-9.]+ \| \*\*[0-9.]+\*\* \|", card), card
    assert "![reliability diagrams](tiny-reliability.png)" in card
    assert (tiny_run.parent / "tiny-reliability.png").stat().st_size > 0


def test_evaluate_prints_the_confusion_matrix(
    tiny_run: Path, fashion_mnist_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The text output holds the confusion matrix, row by row, as the JSON output gives it."""
    common = [str(tiny_run), "--data-dir", str(fashion_mnist_dir), "--no-report"]
    assert main(["evaluate", *common, "--json"]) == 0
    matrix = json.loads(capsys.readouterr().out)["confusion_matrix"]
    assert main(["evaluate", *common]) == 0
    text = capsys.readouterr().out
    assert "confusion matrix (rows: true class, columns: predicted class)" in text
    for index, (name, row) in enumerate(zip(CLASS_NAMES, matrix, strict=True)):
        pattern = rf"^ *{index} {re.escape(name)} +" + r" +".join(str(c) for c in row) + "$"
        assert re.search(pattern, text, re.MULTILINE), (pattern, text)


def test_evaluate_calibrate_refits_the_temperature_on_the_training_validation_split(
    tiny_run: Path, fashion_mnist_dir: Path, tmp_path: Path
) -> None:
    """`--calibrate` on a copy reset to T = 1 finds the temperature training fitted; weights unchanged."""
    trained = ImageClassifier.load(tiny_run, device="cpu")
    reset = ImageClassifier.load(tiny_run, device="cpu")
    reset.temperature, reset.calibration = 1.0, {}
    path = tmp_path / "reset.safetensors"
    reset.save(path)
    code = main(
        ["evaluate", str(path), "--data-dir", str(fashion_mnist_dir), "--calibrate", "--no-report"]
    )
    assert code == 0
    recalibrated = ImageClassifier.load(path, device="cpu")
    assert recalibrated.temperature == pytest.approx(trained.temperature, rel=1e-6)
    assert recalibrated.version == trained.version


def test_evaluate_calibrate_refuses_a_split_that_is_not_the_training_one(
    tiny_run: Path, fashion_mnist_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """When the rebuilt training images do not hash to the recorded ones, exit 2 and keep the file."""
    classifier = ImageClassifier.load(tiny_run, device="cpu")
    classifier.training["data_hash"] = "0" * 64
    path = tmp_path / "other.safetensors"
    classifier.save(path)
    before = path.read_bytes()
    args = ["evaluate", str(path), "--data-dir", str(fashion_mnist_dir), "--calibrate"]
    assert main([*args, "--no-report"]) == 2
    assert "does not hash to the checkpoint's recorded training data" in capsys.readouterr().err
    assert path.read_bytes() == before


def _subcommand_parser(name: str) -> argparse.ArgumentParser:
    subparsers = next(
        action
        for action in build_parser()._actions
        if isinstance(action, argparse._SubParsersAction)
    )
    parser: argparse.ArgumentParser = subparsers.choices[name]
    return parser


@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_every_option_has_help_and_at_most_one_default(command: str) -> None:
    """`fmnist train/evaluate --help`: every option explains itself; none says "(default" twice or "None"."""
    parser = _subcommand_parser(command)
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert action.help, f"{action.option_strings or action.dest} has no help"
        text = formatter._expand_help(action)
        assert text.count("(default") <= 1, text
        assert "(default: None)" not in text and "(default: False)" not in text, text
    assert "(default: cuda when available)" in " ".join(parser.format_help().split())
