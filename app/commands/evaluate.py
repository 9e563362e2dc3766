"""`fmnist evaluate CHECKPOINT`: score a checkpoint on the Fashion-MNIST test set and write a report."""

from __future__ import annotations

import argparse
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
    parser.set_defaults(func=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> int:
    configure_logging()
    from ml import CheckpointError, DataError, ImageClassifier, load_fashion_mnist
    from ml.report import evaluation_report

    try:
        classifier = ImageClassifier.load(args.checkpoint, device=args.device)
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
    if not args.no_report:
        paths = evaluation_report(classifier, args.checkpoint, result, args.report_dir)
        print(
            "report: " + ", ".join(str(p) for p in paths.values()),
            file=sys.stderr if args.json else sys.stdout,
        )
    return 0
