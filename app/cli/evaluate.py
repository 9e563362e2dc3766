"""`fmnist evaluate CHECKPOINT`: score a checkpoint on the Fashion-MNIST test set and write a report."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.cli.flags import Flag, HelpFormatter, add_flags
from app.logs import configure_logging, kv

if TYPE_CHECKING:
    from ml import EvaluationResult, ImageClassifier
    from ml.calibration import CalibrationReport

logger = logging.getLogger("fmnist.evaluate")


_DESCRIPTION = (
    "Load CHECKPOINT, evaluate it on the 10k Fashion-MNIST test images and print accuracy, "
    "per-class accuracy, the confusion matrix (as a text table) and the expected calibration "
    "error of its probabilities; write a confusion-matrix PNG and a short markdown report "
    "beside the checkpoint (or in --report-dir)."
)
_FLAGS = (
    Flag("--data-dir", Path, None, "directory with the IDX .gz files (default: FMNIST_DATA_DIR, then "
         "/usr/share/datasets/fashion-mnist)"),
    Flag("--data", Path, None, "evaluate on this image folder (DIR/<class>/<image>; the classes must "
         "be the model's) instead of the Fashion-MNIST test set", "DIR"),
    Flag("--convert", bool, False, "with --data: fit images of another size or mode to the model's "
         "input by the image policy (as the gateway fits uploads) instead of refusing them"),
    Flag("--device", str, None, "cpu, cuda (default: cuda when available)"),
    Flag("--report-dir", Path, None, "where the report goes (default: beside the checkpoint)"),
    Flag("--no-report", bool, False, "print only, write no files"),
    Flag("--json", bool, False, "print the result as JSON"),
    Flag("--precision", ("fp32", "bf16"), "fp32", "inference arithmetic"),
    Flag("--card", bool, False, "also (re)write the model card beside the checkpoint from its stored "
         "training record, this evaluation (fp32 and bf16) and a fresh CPU throughput measurement"),
    Flag("--calibrate", bool, False, "first refit the temperature on the validation split the "
         "checkpoint was trained beside (rebuilt from its recorded seed and checked against its "
         "training-data hash) and rewrite the checkpoint with it; the weights and their version do "
         "not change"),
    Flag("--notes", Path, None, "with --card: markdown appended to the card"),
    Flag("--throughput-seconds", float, 2.0, "with --card: seconds of CPU throughput measurement per "
         "batch size and precision"),
)  # fmt: skip


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="score a checkpoint on the Fashion-MNIST test set",
        description=_DESCRIPTION,
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "checkpoint",
        type=Path,
        help="a .safetensors checkpoint written by `fmnist train`",
    )
    add_flags(parser, _FLAGS)
    parser.set_defaults(func=run_evaluate)


def confusion_table(matrix: list[list[int]], class_names: list[str]) -> str:
    """The confusion matrix as fixed-width text: one row per true class, one column per predicted class."""
    width = max(len(name) for name in class_names)
    cell = max(5, len(str(max(max(row) for row in matrix))) + 1)
    header = " " * (width + 4) + "".join(f"{col:>{cell}}" for col in range(len(class_names)))
    rows = [
        f"{index:>2} {name:<{width}} " + "".join(f"{count:>{cell}}" for count in row)
        for index, (name, row) in enumerate(zip(class_names, matrix, strict=True))
    ]
    return "\n".join(
        ["confusion matrix (rows: true class, columns: predicted class)", header, *rows]
    )


def recalibrate(classifier: ImageClassifier, checkpoint: Path, data_dir: Path | None) -> str | None:
    """Refit the temperature on the checkpoint's own validation split; returns an error, or None."""
    from ml import fashion_mnist_splits
    from ml.training import fingerprint

    training = classifier.training
    history = training.get("history") or {}
    # Checkpoints from before the split was recorded: `fmnist train` defaults, sizes from the history.
    split = training.get("split") or {
        "val_size": history.get("val_size", 0),
        "subset": None,
        "seed": training.get("seed", classifier.seed),
    }
    if not split["val_size"]:
        return f"{checkpoint} was trained without a validation split; retrain with --val-size N"
    splits = fashion_mnist_splits(
        data_dir, val_size=split["val_size"], seed=split["seed"], subset=split["subset"]
    )
    if fingerprint(splits.train.images, splits.train.labels) != training.get("data_hash"):
        return (
            f"the training split rebuilt from {split} does not hash to the checkpoint's recorded "
            "training data, so its validation split cannot be told apart from the training images; "
            "retrain instead"
        )
    report = classifier.calibrate(splits.val)
    print(
        f"temperature {report.temperature:.4f} fitted on {report.num_samples} validation images "
        f"of {checkpoint} (ECE there {report.before.ece:.4f} -> {report.after.ece:.4f})",
        file=sys.stderr,
    )
    return None


class _Refused(Exception):
    """What stops the evaluation before it starts, said on stderr with exit status 2."""


def run_evaluate(args: argparse.Namespace) -> int:
    configure_logging()
    try:
        classifier, test, data = _prepare(args)
    except _Refused as exc:
        print(f"fmnist evaluate: {exc}", file=sys.stderr)
        return 2
    result = classifier.evaluate(test)
    calibration = classifier.calibration_report(test)
    if args.calibrate:
        classifier.metrics["test_loss"] = result.loss  # the loss of what is now served
        classifier.save(args.checkpoint)
        print(
            f"rewrote {args.checkpoint} with temperature {classifier.temperature:.4f}",
            file=sys.stderr,
        )
    recorded = classifier.metrics.get("test_accuracy")
    logger.info(
        kv(
            "evaluate_done",
            checkpoint=args.checkpoint,
            version=classifier.version,
            accuracy=f"{result.accuracy:.4f}",
            recorded=recorded,
        )
    )
    _print_result(args, classifier, result, calibration)
    if args.card:
        _write_card(args, classifier, test, result, calibration)
    if not args.no_report:
        from ml.report import evaluation_report

        paths = evaluation_report(classifier, args.checkpoint, result, args.report_dir, data=data)
        print(
            "report: " + ", ".join(str(p) for p in paths.values()),
            file=sys.stderr if args.json else sys.stdout,
        )
    return 0


def _prepare(args: argparse.Namespace) -> tuple[ImageClassifier, Any, str | None]:
    """The checkpoint (recalibrated with --calibrate), the images it is evaluated on, and what
    they are (for a folder); raises `_Refused` saying why not."""
    from ml import CheckpointError, DataError, ImageClassifier, load_fashion_mnist
    from ml.folders import describe, folder_for_model

    # --card is checked first: --calibrate would already have written the checkpoint.
    if args.card and args.precision != "fp32":
        raise _Refused("--card needs --precision fp32 (it reports both)")
    if args.data is not None and (args.calibrate or args.card):
        raise _Refused("--calibrate and --card work on Fashion-MNIST only")
    data: str | None = None
    try:
        classifier = ImageClassifier.load(
            args.checkpoint, device=args.device, precision=args.precision
        )
        if args.data is not None:
            test = folder_for_model(
                args.data,
                classifier.input_shape,
                classifier.class_names,
                convert=args.convert,
            )
            data = describe(args.data, test)
        else:
            test = load_fashion_mnist("test", args.data_dir)
    except (CheckpointError, DataError) as exc:
        raise _Refused(str(exc)) from None
    if (
        args.data is None and classifier.input_shape != (1, 28, 28)
    ) or classifier.num_classes != len(test.class_names):
        raise _Refused(
            f"{args.checkpoint} takes {classifier.input_shape} images in "
            f"{classifier.num_classes} classes, not Fashion-MNIST (1×28×28, 10 classes)"
        )
    if args.calibrate:
        try:
            problem = recalibrate(classifier, args.checkpoint, args.data_dir)
        except DataError as exc:
            problem = str(exc)
        if problem is not None:
            raise _Refused(f"--calibrate: {problem}")
    return classifier, test, data


def _print_result(
    args: argparse.Namespace,
    classifier: ImageClassifier,
    result: EvaluationResult,
    calibration: CalibrationReport,
) -> None:
    """The evaluation on stdout: JSON with --json, else accuracy, per class, confusion, calibration."""
    recorded = classifier.metrics.get("test_accuracy")
    if args.json:
        print(
            json.dumps(
                {
                    "checkpoint": str(args.checkpoint),
                    "version": classifier.version,
                    "recorded_test_accuracy": recorded,
                    **result.to_json(),
                    "calibration": calibration.to_json(),
                }
            )
        )
        return
    print(
        f"{args.checkpoint} (version {classifier.version}): test accuracy {100 * result.accuracy:.2f}% on {result.num_samples} images, loss {result.loss:.4f}"
    )
    if recorded is not None:
        print(f"recorded at training time: {100 * recorded:.2f}%")
    width = max(len(n) for n in classifier.class_names)
    for name, accuracy in zip(classifier.class_names, result.per_class_accuracy, strict=True):
        print(f"  {name:<{width}}  {100 * accuracy:6.2f}%")
    print(confusion_table(result.confusion_matrix, classifier.class_names))
    print(
        f"calibration: temperature {calibration.temperature:.4f}, expected calibration error "
        f"{calibration.after.ece:.4f} (raw softmax {calibration.before.ece:.4f})"
    )


def _write_card(
    args: argparse.Namespace,
    classifier: ImageClassifier,
    test: Any,
    result: EvaluationResult,
    calibration: CalibrationReport,
) -> None:
    """--card: the model card rebuilt from the checkpoint's training record and this evaluation."""
    from ml.report import evaluate_bf16, measure_precisions, write_model_card

    evaluate_bf16(classifier, test)
    command = str(classifier.training.get("command", "(not recorded)"))
    notes = args.notes.read_text() if args.notes else ""
    throughput = measure_precisions(args.checkpoint, seconds=args.throughput_seconds)
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    source = (
        "Rebuilt by `fmnist evaluate --card` from the training record stored in the checkpoint; "
        f"test accuracy and throughput re-measured {when}."
    )
    card = write_model_card(
        classifier,
        args.checkpoint,
        result,
        throughput,
        command,
        notes,
        generated_by=source,
        calibration=calibration,
    )
    print("model card: " + ", ".join(str(p) for p in card.values()), file=sys.stderr)
