"""`fmnist train`: train the classifier on Fashion-MNIST or an image folder, save the checkpoint and write its report."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path
from typing import Any

from app.logs import configure_logging, kv

logger = logging.getLogger("fmnist.train")

SHIPPED = Path("models/fmnist.safetensors")


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers like 16,32,64, got {text!r}"
        ) from exc
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to an option's help only where that says something: not when the help
    already states its default, not for None (the help says what happens then) nor for on/off flags;
    tuples print as typed (16,32,64)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            "(default" in text
            or default is None
            or default is argparse.SUPPRESS
            or isinstance(action, argparse._StoreTrueAction)
            or not action.option_strings
        ):
            return text
        if isinstance(default, tuple):
            return f"{text} (default: {','.join(str(v) for v in default)})"
        return f"{text} (default: %(default)s)"


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train the classifier on Fashion-MNIST or your image folder; write checkpoint + model card",
        description=(
            "Train on the Fashion-MNIST training set (minus a seeded validation split) and evaluate once "
            "on the 10k test set, or, with --data DIR, on an image folder (one sub-folder per class, any "
            "channels and size) evaluated on its seeded validation split; save a .safetensors "
            "checkpoint (default models/<name>.safetensors, never over an existing file without "
            "--force or an explicit --out) and write a report beside it: "
            "loss/accuracy curves, confusion matrix, reliability diagram and a model card with CPU "
            "throughput. After training, a temperature is fitted on the validation split so that "
            "served probabilities are calibrated (see the card's Calibration section)."
        ),
        formatter_class=HelpFormatter,
    )
    data = parser.add_argument_group("data")
    data.add_argument(
        "--data",
        type=Path,
        default=None,
        metavar="DIR",
        help="train on this image folder (DIR/<class>/<image>) instead of Fashion-MNIST",
    )
    data.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="with --data: the share of each class held out (seeded) for validation, the "
        "temperature and the report",
    )
    data.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="directory with the IDX .gz files (default: FMNIST_DATA_DIR, then /usr/share/datasets/fashion-mnist, then a torchvision download)",
    )
    data.add_argument(
        "--val-size",
        type=int,
        default=5000,
        help="training images held out for validation and for fitting the temperature "
        "(0: train on all 60k and serve uncalibrated probabilities)",
    )
    data.add_argument(
        "--subset",
        type=int,
        default=None,
        help="train on a seeded random N of the 60k training images; the validation split is carved "
        "from them (at most a tenth); the test set stays whole",
    )
    model = parser.add_argument_group("model")
    model.add_argument(
        "--widths", type=_int_list, default=(16, 32, 64, 128), help="channels per stage"
    )
    model.add_argument("--convs", type=_int_list, default=(2, 2, 2, 1), help="3×3 convs per stage")
    model.add_argument(
        "--head", choices=("avg", "flatten"), default="flatten", help="classifier head"
    )
    model.add_argument("--dropout", type=float, default=0.0, help="dropout before the classifier")
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, default=35, help="passes over the training set")
    optim.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="images per training step (default: scaled to the training set's size)",
    )
    optim.add_argument(
        "--lr",
        type=float,
        default=None,
        help="peak learning rate (default: scaled to the batch size)",
    )
    optim.add_argument(
        "--schedule",
        choices=("cosine", "one-cycle"),
        default="cosine",
        help="learning-rate schedule after the warm-up",
    )
    optim.add_argument(
        "--grad-clip",
        type=float,
        default=2.0,
        help="clip the gradient's global norm to this (0: off)",
    )
    optim.add_argument(
        "--optimizer",
        choices=("sgd", "adamw"),
        default="sgd",
        help="sgd (Nesterov momentum) or adamw",
    )
    optim.add_argument(
        "--weight-decay",
        type=float,
        default=5e-4,
        help="decoupled weight decay on conv and linear weights",
    )
    optim.add_argument(
        "--label-smoothing",
        type=float,
        default=0.0,
        help="label smoothing of the training loss (the fitted temperature undoes the "
        "under-confidence it leaves)",
    )
    optim.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="fraction of steps warming up to the peak lr (default: scaled to the run's length)",
    )
    optim.add_argument(
        "--crop-padding", type=int, default=2, help="random-crop padding in pixels (0: off)"
    )
    optim.add_argument("--no-flip", action="store_true", help="turn off random horizontal flips")
    optim.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        default="fp32",
        help="bf16: autocast convs to bfloat16 while training (faster where the CPU/GPU supports it)",
    )
    optim.add_argument(
        "--seed",
        type=int,
        default=0,
        help="fixes the initial weights, the validation split, batch order and augmentation",
    )
    run = parser.add_argument_group("run")
    run.add_argument(
        "--out",
        type=Path,
        default=None,
        help="checkpoint path (.safetensors); named explicitly it may replace an existing file "
        "(default: models/<name>.safetensors, refused when it exists unless --force)",
    )
    run.add_argument(
        "--name",
        default=None,
        help="the model's name, for the default --out (default: the --data folder's name, else "
        "fmnist-trained)",
    )
    run.add_argument(
        "--force", action="store_true", help="let the default --out replace an existing file"
    )
    run.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)"
    )
    run.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: torch's choice)",
    )
    run.add_argument(
        "--notes",
        type=Path,
        default=None,
        help="markdown appended to the model card (e.g. what was tried)",
    )
    run.add_argument(
        "--throughput-seconds",
        type=float,
        default=2.0,
        help="time spent measuring CPU throughput per batch size for the card",
    )
    run.add_argument(
        "--no-report", action="store_true", help="skip plots, card and throughput measurement"
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
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

    from ml import DataError, ImageClassifier, TrainConfig, fashion_mnist_splits
    from ml.report import duration, evaluate_bf16, measure_precisions, write_model_card

    out = output_path(args)
    if out is None:
        return 2
    args.out = out
    if args.threads:
        torch.set_num_threads(args.threads)
    command = args.command_line(args)
    if args.data is not None:
        return _train_on_folder(args, command)
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
    classifier = ImageClassifier(
        num_channels=1,
        num_classes=len(splits.train.class_names),
        image_size=(28, 28),
        class_names=splits.train.class_names,
        widths=args.widths,
        convs_per_stage=args.convs,
        head=args.head,
        dropout=args.dropout,
        seed=args.seed,
        device=args.device,
    )
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
    if not args.no_report:
        throughput = measure_precisions(args.out, seconds=args.throughput_seconds)
        notes = args.notes.read_text() if args.notes else ""
        paths = write_model_card(
            classifier, args.out, test, throughput, command, notes, calibration=calibration
        )
        for t in throughput:
            print(
                f"cpu predict {t.precision} batch={t.batch_size} threads={t.threads} clock={t.clock}: "
                f"{t.images_per_second:,.0f} images/s"
            )
        print("report: " + ", ".join(str(p) for p in paths.values()))
    return 0


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


def _train_on_folder(args: argparse.Namespace, command: str) -> int:
    """`fmnist train --data DIR`: the folder split (seeded), fitted, evaluated and reported on its
    validation split."""
    from ml import DataError, ImageClassifier, TrainConfig
    from ml.folders import describe, folder_splits
    from ml.report import duration, measure_precisions, write_model_card

    try:
        splits = folder_splits(args.data, val_fraction=args.val_fraction, seed=args.seed)
    except DataError as exc:
        print(f"fmnist train: {exc}", file=sys.stderr)
        return 2
    channels, height, width = splits.input_shape
    logger.info(
        kv(
            "train_start",
            data=args.data,
            train=len(splits.train),
            val=len(splits.val),
            input_shape=f"{channels},{height},{width}",
            classes=len(splits.class_names),
        )
    )
    classifier = ImageClassifier(
        num_channels=channels,
        num_classes=len(splits.class_names),
        image_size=(height, width),
        class_names=splits.class_names,
        widths=args.widths,
        convs_per_stage=args.convs,
        head=args.head,
        dropout=args.dropout,
        seed=args.seed,
        device=args.device,
    )
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
        args.data, report_set, "validation split" if val is not None else "training split"
    )
    print(
        f"validation accuracy {100 * result.accuracy:.2f}% ({result.num_samples} images), trained in "
        f"{duration(history.seconds)} -> {args.out}"
    )
    if not args.no_report:
        throughput = measure_precisions(args.out, seconds=args.throughput_seconds)
        notes = args.notes.read_text() if args.notes else ""
        paths = write_model_card(
            classifier, args.out, result, throughput, command, notes,
            calibration=calibration, data=data,
        )  # fmt: skip
        print("report: " + ", ".join(str(p) for p in paths.values()))
    return 0
