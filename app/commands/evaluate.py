"""`fmnist evaluate CHECKPOINT`: score a checkpoint on the Fashion-MNIST test set and write a report."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
from pathlib import Path

from app.logs import configure_logging, kv

logger = logging.getLogger("fmnist.evaluate")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="score a checkpoint on the Fashion-MNIST test set",
        description=(
            "Load CHECKPOINT, evaluate it on the 10k Fashion-MNIST test images and print accuracy, "
            "per-class accuracy and the confusion matrix; write a confusion-matrix PNG and a short "
            "markdown report beside the checkpoint (or in --report-dir)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "checkpoint", type=Path, help="a .safetensors checkpoint written by `fmnist train`"
    )
    parser.add_argument(
        "--data-dir", type=Path, default=None, help="directory with the IDX .gz files"
    )
    parser.add_argument("--device", default=None, help="cpu, cuda (default: cuda when available)")
    parser.add_argument(
        "--report-dir",
        type=Path,
        default=None,
        help="where the report goes (default: beside the checkpoint)",
    )
    parser.add_argument("--no-report", action="store_true", help="print only, write no files")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument(
        "--precision", choices=("fp32", "bf16"), default="fp32", help="inference arithmetic"
    )
    parser.add_argument(
        "--card",
        action="store_true",
        help="also (re)write the model card beside the checkpoint from its stored training record, "
        "this evaluation (fp32 and bf16) and a fresh CPU throughput measurement",
    )
    parser.add_argument(
        "--notes", type=Path, default=None, help="with --card: markdown appended to the card"
    )
    parser.add_argument(
        "--throughput-seconds",
        type=float,
        default=2.0,
        help="with --card: seconds of CPU throughput measurement per batch size and precision",
    )
    parser.set_defaults(func=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> int:
    configure_logging()
    from ml import CheckpointError, DataError, ImageClassifier, load_fashion_mnist
    from ml.report import evaluate_bf16, evaluation_report, measure_precisions, write_model_card

    try:
        classifier = ImageClassifier.load(
            args.checkpoint, device=args.device, precision=args.precision
        )
        test = load_fashion_mnist("test", args.data_dir)
    except (CheckpointError, DataError) as exc:
        print(f"fmnist evaluate: {exc}", file=sys.stderr)
        return 2
    if classifier.input_shape != (1, 28, 28) or classifier.num_classes != len(test.class_names):
        print(
            f"fmnist evaluate: {args.checkpoint} takes {classifier.input_shape} images in "
            f"{classifier.num_classes} classes, not Fashion-MNIST (1×28×28, 10 classes)",
            file=sys.stderr,
        )
        return 2
    result = classifier.evaluate(test)
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
    if args.json:
        print(
            json.dumps(
                {
                    "checkpoint": str(args.checkpoint),
                    "version": classifier.version,
                    "recorded_test_accuracy": recorded,
                    **result.to_json(),
                }
            )
        )
    else:
        print(
            f"{args.checkpoint} (version {classifier.version}): test accuracy {100 * result.accuracy:.2f}% on {result.num_samples} images, loss {result.loss:.4f}"
        )
        if recorded is not None:
            print(f"recorded at training time: {100 * recorded:.2f}%")
        width = max(len(n) for n in classifier.class_names)
        for name, accuracy in zip(classifier.class_names, result.per_class_accuracy, strict=True):
            print(f"  {name:<{width}}  {100 * accuracy:6.2f}%")
    if args.card:
        if args.precision != "fp32":
            print(
                "fmnist evaluate: --card needs --precision fp32 (it reports both)", file=sys.stderr
            )
            return 2
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
            classifier, args.checkpoint, result, throughput, command, notes, generated_by=source
        )
        print("model card: " + ", ".join(str(p) for p in card.values()), file=sys.stderr)
    if not args.no_report:
        paths = evaluation_report(classifier, args.checkpoint, result, args.report_dir)
        print(
            "report: " + ", ".join(str(p) for p in paths.values()),
            file=sys.stderr if args.json else sys.stdout,
        )
    return 0
