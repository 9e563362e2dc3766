"""`fmnist train`: train the classifier on Fashion-MNIST or an image folder, save the checkpoint and write its report."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.cli.flags import Flag, HelpFormatter, add_flags, int_list
from app.logs import configure_logging, kv

if TYPE_CHECKING:
    from ml import EvaluationResult, ImageClassifier
    from ml.calibration import CalibrationReport

logger = logging.getLogger("fmnist.train")

_DESCRIPTION = (
    "Train on the Fashion-MNIST training set (minus a seeded validation split) and evaluate once "
    "on the 10k test set, or, with --data DIR, on an image folder (one sub-folder per class, any "
    "channels and size) evaluated on its seeded validation split; save a .safetensors "
    "checkpoint (default models/<name>.safetensors, never over an existing file without "
    "--force or an explicit --out) and write a report beside it: "
    "loss/accuracy curves, confusion matrix, reliability diagram and a model card with CPU "
    "throughput. After training, a temperature is fitted on the validation split so that "
    "served probabilities are calibrated (see the card's Calibration section)."
)

_DATA = (
    Flag("--data", Path, None, "train on this image folder (DIR/<class>/<image>) instead of Fashion-MNIST", "DIR"),
    Flag("--val-fraction", float, 0.1, "with --data: the share of each class held out (seeded) for "
         "validation, the temperature and the report"),
    Flag("--data-dir", Path, None, "directory with the IDX .gz files (default: FMNIST_DATA_DIR, then "
         "/usr/share/datasets/fashion-mnist, then a torchvision download)"),
    Flag("--val-size", int, 5000, "training images held out for validation and for fitting the "
         "temperature (0: train on all 60k and serve uncalibrated probabilities)"),
    Flag("--subset", int, None, "train on a seeded random N of the 60k training images; the validation "
         "split is carved from them (at most a tenth); the test set stays whole"),
)  # fmt: skip
_MODEL = (
    Flag("--widths", int_list, (16, 32, 64, 128), "channels per stage"),
    Flag("--convs", int_list, (2, 2, 2, 1), "3×3 convs per stage"),
    Flag("--head", ("avg", "flatten"), "flatten", "classifier head"),
    Flag("--dropout", float, 0.0, "dropout before the classifier"),
)
_OPTIMISATION = (
    Flag("--epochs", int, 35, "passes over the training set"),
    Flag("--batch-size", int, None, "images per training step (default: scaled to the training set's size)"),
    Flag("--lr", float, None, "peak learning rate (default: scaled to the batch size)"),
    Flag("--schedule", ("cosine", "one-cycle"), "cosine", "learning-rate schedule after the warm-up"),
    Flag("--grad-clip", float, 2.0, "clip the gradient's global norm to this (0: off)"),
    Flag("--optimizer", ("sgd", "adamw"), "sgd", "sgd (Nesterov momentum) or adamw"),
    Flag("--weight-decay", float, 5e-4, "decoupled weight decay on conv and linear weights"),
    Flag("--label-smoothing", float, 0.0, "label smoothing of the training loss (the fitted "
         "temperature undoes the under-confidence it leaves)"),
    Flag("--warmup", float, None, "fraction of steps warming up to the peak lr (default: scaled to "
         "the run's length)"),
    Flag("--crop-padding", int, 2, "random-crop padding in pixels (0: off)"),
    Flag("--no-flip", bool, False, "turn off random horizontal flips"),
    Flag("--precision", ("fp32", "bf16"), "fp32", "bf16: autocast convs to bfloat16 while training "
         "(faster where the CPU/GPU supports it)"),
    Flag("--seed", int, 0, "fixes the initial weights, the validation split, batch order and augmentation"),
)  # fmt: skip
_RUN = (
    Flag("--out", Path, None, "checkpoint path (.safetensors); named explicitly it may replace an "
         "existing file (default: models/<name>.safetensors, refused when it exists unless --force)"),
    Flag("--name", str, None, "the model's name, for the default --out (default: the --data folder's "
         "name, else fmnist-trained)"),
    Flag("--force", bool, False, "let the default --out replace an existing file"),
    Flag("--device", str, None, "cpu, cuda, cuda:1 (default: cuda when available)"),
    Flag("--threads", int, None, "torch intra-op threads (default: torch's choice)"),
    Flag("--notes", Path, None, "markdown appended to the model card (e.g. what was tried)"),
    Flag("--throughput-seconds", float, 2.0, "time spent measuring CPU throughput per batch size for the card"),
    Flag("--no-report", bool, False, "skip plots, card and throughput measurement"),
    Flag("--no-progress", bool, False, "no progress bars"),
)  # fmt: skip


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train the classifier on Fashion-MNIST or your image folder; write checkpoint + model card",
        description=_DESCRIPTION,
        formatter_class=HelpFormatter,
    )
    for title, flags in (
        ("data", _DATA),
        ("model", _MODEL),
        ("optimisation", _OPTIMISATION),
        ("run", _RUN),
    ):
        add_flags(parser.add_argument_group(title), flags)
    parser.set_defaults(func=run_train, command_line=lambda args: canonical_command(parser, args))


def canonical_command(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """`fmnist train` plus every option whose value differs from its default: the run, reproducibly."""
    words = ["fmnist", "train"]
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        value = getattr(args, action.dest, action.default)
        if value == action.default:
            continue
        option = action.option_strings[-1]
        if isinstance(action, argparse._StoreTrueAction):
            words.append(option)
        elif isinstance(value, tuple):
            words += [option, ",".join(str(v) for v in value)]
        else:
            words += [option, str(value)]
    return shlex.join(words)


def run_train(args: argparse.Namespace) -> int:
    configure_logging()
    import torch

    out = output_path(args)
    if out is None:
        return 2
    args.out = out
    if args.threads:
        torch.set_num_threads(args.threads)
    command = args.command_line(args)
    if args.data is not None:
        return _train_on_folder(args, command)
    return _train_on_fashion_mnist(args, command)


def output_path(args: argparse.Namespace) -> Path | None:
    """Where the checkpoint goes: `--out` as given, else `models/<name>.safetensors` unless that
    exists and `--force` is not given (None after saying why)."""
    if args.out is not None:
        return Path(args.out)
    name = args.name or (
        Path(args.data).resolve().name if args.data is not None else "fmnist-trained"
    )
    out = Path("models") / f"{name}.safetensors"
    if out.exists() and not args.force:
        print(
            f"fmnist train: {out} exists; pass --force to replace it, or --out PATH / --name NAME "
            "to write elsewhere",
            file=sys.stderr,
        )
        return None
    return out


def train_config(args: argparse.Namespace, config_class: type[Any]) -> Any:
    """The `TrainConfig` of the flags (None leaves a data-scaled default to `fit`)."""
    return config_class(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        optimizer=args.optimizer,
        weight_decay=args.weight_decay,
        warmup_fraction=args.warmup,
        schedule=args.schedule,
        grad_clip=args.grad_clip,
        label_smoothing=args.label_smoothing,
        crop_padding=args.crop_padding,
        horizontal_flip=not args.no_flip,
        precision=args.precision,
        seed=args.seed,
        progress=not args.no_progress,
    )


def _new_classifier(
    args: argparse.Namespace, input_shape: tuple[int, int, int], class_names: list[str]
) -> ImageClassifier:
    """A fresh classifier of the flags' architecture for images of `input_shape` in `class_names`."""
    from ml import ImageClassifier

    channels, height, width = input_shape
    return ImageClassifier(
        num_channels=channels,
        num_classes=len(class_names),
        image_size=(height, width),
        class_names=class_names,
        widths=args.widths,
        convs_per_stage=args.convs,
        head=args.head,
        dropout=args.dropout,
        seed=args.seed,
        device=args.device,
    )


def _train_on_fashion_mnist(args: argparse.Namespace, command: str) -> int:
    """`fmnist train`: fitted on the Fashion-MNIST training split, evaluated once on the test set."""
    import torch

    from ml import DataError, TrainConfig, fashion_mnist_splits
    from ml.report import duration, evaluate_bf16

    try:
        splits = fashion_mnist_splits(
            args.data_dir, val_size=args.val_size, seed=args.seed, subset=args.subset
        )
    except DataError as exc:
        print(f"fmnist train: {exc}", file=sys.stderr)
        return 2
    logger.info(
        kv(
            "train_start",
            data_dir=splits.data_dir,
            train=len(splits.train),
            val=len(splits.val),
            test=len(splits.test),
            threads=torch.get_num_threads(),
        )
    )
    classifier = _new_classifier(args, (1, 28, 28), splits.train.class_names)
    config = train_config(args, TrainConfig)
    history = classifier.fit(splits.train, splits.val if len(splits.val) else None, config=config)
    test = classifier.evaluate(splits.test)
    calibration = classifier.calibration_report(splits.test)
    classifier.metrics["test_accuracy"] = test.accuracy
    classifier.metrics["test_loss"] = test.loss
    evaluate_bf16(classifier, splits.test)
    classifier.training["command"] = command
    # What `fmnist evaluate --calibrate` needs to rebuild the same validation split later.
    classifier.training["split"] = {
        "val_size": args.val_size,
        "subset": args.subset,
        "seed": args.seed,
    }
    classifier.save(args.out)
    logger.info(
        kv(
            "train_done",
            out=args.out,
            version=classifier.version,
            test_accuracy=f"{test.accuracy:.4f}",
            seconds=f"{history.seconds:.1f}",
        )
    )
    print(
        f"test accuracy {100 * test.accuracy:.2f}% ({test.num_samples} images), trained in {duration(history.seconds)} -> {args.out}"
    )
    print(
        f"temperature {classifier.temperature:.4f}: test expected calibration error "
        f"{calibration.before.ece:.4f} (raw softmax) -> {calibration.after.ece:.4f} (served)"
    )
    _write_report(args, classifier, test, command, calibration, print_throughput=True)
    return 0


def _train_on_folder(args: argparse.Namespace, command: str) -> int:
    """`fmnist train --data DIR`: the folder split (seeded), fitted, evaluated and reported on its
    validation split."""
    from ml import DataError, TrainConfig
    from ml.folders import describe, folder_splits
    from ml.report import duration

    try:
        splits = folder_splits(args.data, val_fraction=args.val_fraction, seed=args.seed)
    except DataError as exc:
        print(f"fmnist train: {exc}", file=sys.stderr)
        return 2
    logger.info(
        kv(
            "train_start",
            data=args.data,
            train=len(splits.train),
            val=len(splits.val),
            input_shape=",".join(str(n) for n in splits.input_shape),
            classes=len(splits.class_names),
        )
    )
    classifier = _new_classifier(args, splits.input_shape, splits.class_names)
    val = splits.val if len(splits.val) else None
    history = classifier.fit(splits.train, val, config=train_config(args, TrainConfig))
    classifier.training["data"] = describe(args.data, splits.train, "training split")
    classifier.training["command"] = command
    classifier.training["split"] = {
        "data": str(args.data),
        "val_fraction": args.val_fraction,
        "seed": args.seed,
    }
    report_set = splits.val if len(splits.val) else splits.train
    result = classifier.evaluate(report_set)
    calibration = classifier.calibration_report(report_set)
    classifier.metrics["val_accuracy"] = result.accuracy
    classifier.save(args.out)
    data = describe(
        args.data,
        report_set,
        "validation split" if val is not None else "training split",
    )
    print(
        f"validation accuracy {100 * result.accuracy:.2f}% ({result.num_samples} images), trained in "
        f"{duration(history.seconds)} -> {args.out}"
    )
    _write_report(args, classifier, result, command, calibration, data=data)
    return 0


def _write_report(
    args: argparse.Namespace,
    classifier: ImageClassifier,
    result: EvaluationResult,
    command: str,
    calibration: CalibrationReport,
    *,
    data: str | None = None,
    print_throughput: bool = False,
) -> None:
    """The model card, plots and CPU throughput beside the checkpoint, unless --no-report."""
    if args.no_report:
        return
    from ml.report import measure_precisions, write_model_card

    throughput = measure_precisions(args.out, seconds=args.throughput_seconds)
    notes = args.notes.read_text() if args.notes else ""
    paths = write_model_card(
        classifier,
        args.out,
        result,
        throughput,
        command,
        notes,
        calibration=calibration,
        data=data,
    )
    for t in throughput if print_throughput else ():
        print(
            f"cpu predict {t.precision} batch={t.batch_size} threads={t.threads} clock={t.clock}: "
            f"{t.images_per_second:,.0f} images/s"
        )
    print("report: " + ", ".join(str(p) for p in paths.values()))
