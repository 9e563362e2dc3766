"""Training reports: loss/accuracy curves, confusion matrix (PNG), CPU throughput, and the model card."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import Dataset

from ml.calibration import ECE_BINS, CalibrationReport, Reliability
from ml.classifier import PRECISIONS, ImageClassifier
from ml.plots import plot_confusion, plot_curves, plot_reliability
from ml.training import EvaluationResult

if TYPE_CHECKING:
    pass


@dataclass(frozen=True)
class Throughput:
    """Images per second of `ImageClassifier.predict` at one batch size."""

    batch_size: int
    images_per_second: float
    ms_per_batch: float
    threads: int
    precision: str = "fp32"
    clock: str = "wall"
    repeats: int = 3


def measure_throughput(
    classifier: ImageClassifier,
    batch_sizes: Sequence[int] = (1, 32, 64),
    *,
    threads: int = 2,
    seconds: float = 2.0,
    repeats: int = 3,
    clock: str = "wall",
) -> list[Throughput]:
    """Time `predict` on random uint8 images at each batch size with `threads` intra-op threads.

    The best of `repeats` timed windows is kept: on a shared machine the fastest window is the one
    least disturbed by other processes, so it is the most repeatable estimate of the model's cost.
    `clock="thread"` divides by the calling thread's CPU time instead of wall time (needs
    `threads=1`, where all compute runs on the calling thread): images per CPU-second, which other
    processes inflate far less than wall time.
    """
    if clock not in ("wall", "thread") or (clock == "thread" and threads != 1):
        raise ValueError("clock must be 'wall', or 'thread' with threads=1")
    now = time.perf_counter if clock == "wall" else time.thread_time
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        generator = torch.Generator().manual_seed(0)
        results = []
        for batch_size in batch_sizes:
            images = torch.randint(
                0,
                256,
                (batch_size, *classifier.input_shape),
                dtype=torch.uint8,
                generator=generator,
            )
            for _ in range(10):  # warm-up: oneDNN picks kernels and allocates on the first calls
                classifier.predict(images)
            best = 0.0
            for _ in range(repeats):
                calls = 0
                started, clock_started = time.perf_counter(), now()
                while time.perf_counter() - started < seconds / repeats:
                    classifier.predict(images)
                    calls += 1
                best = max(best, calls * batch_size / max(now() - clock_started, 1e-9))
            results.append(
                Throughput(
                    batch_size,
                    best,
                    1000.0 * batch_size / best,
                    threads,
                    classifier.precision,
                    clock,
                    repeats,
                )
            )
        return results
    finally:
        torch.set_num_threads(previous_threads)


def measure_precisions(
    checkpoint: Path,
    batch_sizes: Sequence[int] = (1, 32, 64),
    *,
    seconds: float = 2.0,
    repeats: int = 6,
) -> list[Throughput]:
    """CPU throughput of the checkpoint in fp32 and bf16: wall clock on 2 threads, then images per
    CPU-second on 1 thread (the figure that other processes on the machine distort least).

    Each cell keeps the best of `repeats` windows: more windows, more chances of an undisturbed one.
    """
    results: list[Throughput] = []
    for precision in PRECISIONS:
        classifier = ImageClassifier.load(checkpoint, device="cpu", precision=precision)
        results += measure_throughput(classifier, batch_sizes, seconds=seconds, repeats=repeats)
        results += measure_throughput(
            classifier, batch_sizes, threads=1, seconds=seconds, repeats=repeats, clock="thread"
        )
    return results


def evaluate_bf16(classifier: ImageClassifier, dataset: Dataset[Any]) -> EvaluationResult:
    """The same evaluation with bf16 inference, recorded as `metrics["test_accuracy_bf16"]`."""
    previous = classifier.precision
    classifier.precision = "bf16"
    try:
        result = classifier.evaluate(dataset)
    finally:
        classifier.precision = previous
    classifier.metrics["test_accuracy_bf16"] = result.accuracy
    return result


def cpu_description() -> str:
    """CPU model name and core count, for the card."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores"


def report_paths(checkpoint: Path, suffix: str = "") -> dict[str, Path]:
    """Where the report for `checkpoint` goes: beside it, named after it."""
    stem = checkpoint.with_suffix("").name + suffix
    return {
        "card": checkpoint.with_name(f"{stem}.md"),
        "curves": checkpoint.with_name(f"{stem}-curves.png"),
        "confusion": checkpoint.with_name(f"{stem}-confusion.png"),
        "reliability": checkpoint.with_name(f"{stem}-reliability.png"),
    }


def duration(seconds: float) -> str:
    """Seconds under a minute ("42.0 s"), minutes above ("10.1 min"): a short run is never "0.0 min"."""
    return f"{seconds:.1f} s" if seconds < 60 else f"{seconds / 60:.1f} min"


def _throughput_rows(throughput: Sequence[Throughput]) -> list[str]:
    cells: dict[tuple[str, int], dict[str, str]] = {}
    for t in throughput:
        cells.setdefault((t.precision, t.batch_size), {})[t.clock] = f"{t.images_per_second:,.0f}"
    return [
        f"| {precision} | {batch} | {row.get('wall', 'n/a')} | {row.get('thread', 'n/a')} |"
        for (precision, batch), row in cells.items()
    ]


def _windows(throughput: Sequence[Throughput]) -> str:
    return str(throughput[0].repeats) if throughput else "?"


def _now_load() -> str:
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "n/a"


def _load(history: dict[str, Any]) -> str:
    start, end = history.get("load_average") or (0.0, 0.0)
    return f"{start:.1f} at start, {end:.1f} at end"


def _decimal(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def _calibration_section(
    classifier: ImageClassifier, calibration: CalibrationReport, diagram: Path
) -> list[str]:
    fitted = classifier.calibration
    on_validation = (
        f"fitted on {fitted.get('num_samples')} validation images (ECE there "
        f"{_decimal(fitted.get('ece_before'))} → {_decimal(fitted.get('ece_after'))})"
        if fitted
        else "not fitted: this checkpoint serves plain softmax probabilities"
    )
    return [
        "## Calibration",
        "",
        "Served probabilities are `softmax(logits / T)`: one temperature T, fitted after training by "
        "minimising the negative log-likelihood on the validation split (temperature scaling), "
        "stored in the checkpoint and applied inside the inference graph. Label smoothing leaves the "
        "raw softmax under-confident (a clear image gets ~0.94 rather than ~1.0); T < 1 sharpens it. "
        "The argmax, hence every accuracy above, is unchanged. Expected calibration error (ECE): the "
        f"count-weighted mean |accuracy - confidence| over {ECE_BINS} equal-width confidence bins.",
        "",
        "| on the test set | T = 1 (raw softmax) | calibrated |",
        "|---|---:|---:|",
        f"| temperature T | 1 | {calibration.temperature:.4f} |",
        f"| ECE ({ECE_BINS} bins) | {calibration.before.ece:.4f} | **{calibration.after.ece:.4f}** |",
        f"| negative log-likelihood | {calibration.nll_before:.4f} | {calibration.nll_after:.4f} |",
        f"| mean top probability | {_mean_confidence(calibration.before):.4f} | {_mean_confidence(calibration.after):.4f} |",
        "",
        f"T was {on_validation}; the figures above are on the {calibration.num_samples} test images, "
        "which the fit never saw.",
        "",
        f"![reliability diagrams]({diagram.name})",
        "",
    ]


def _mean_confidence(bins: Reliability) -> float:
    total = max(bins.num_samples, 1)
    return sum(c * n for c, n in zip(bins.confidence, bins.counts, strict=True)) / total


def write_model_card(
    classifier: ImageClassifier,
    checkpoint: Path,
    test_result: EvaluationResult,
    throughput: Sequence[Throughput],
    command: str,
    notes: str = "",
    generated_by: str = "Generated by `fmnist train` at the end of the run it describes.",
    calibration: CalibrationReport | None = None,
    data: str | None = None,
) -> dict[str, Path]:
    """Write the PNG plots and the markdown model card next to `checkpoint`; returns their paths.

    `calibration` (the test set's `ImageClassifier.calibration_report`) adds the ECE before and after
    the temperature and the reliability diagrams. `data` says what the test figures were measured on
    (e.g. `ml.folders.describe`'s line for an image folder); the training data is
    `classifier.training["data"]` when recorded."""
    paths = _write_figures(classifier, checkpoint, test_result, calibration)
    history = classifier.training.get("history", {"epochs": []})
    lines = [
        *_summary_section(classifier, checkpoint, test_result, generated_by, calibration, data),
        *_recipe_section(command, classifier.training.get("config", {})),
        *_throughput_section(throughput),
        *_per_class_section(classifier.class_names, test_result, paths["confusion"]),
    ]
    if calibration is not None:
        lines += _calibration_section(classifier, calibration, paths["reliability"])
    if history["epochs"]:
        lines += _epochs_section(history, paths["curves"])
    if notes.strip():
        lines += [notes.strip(), ""]
    lines += _use_section(checkpoint)
    paths["card"].write_text("\n".join(lines))
    return paths


def _write_figures(
    classifier: ImageClassifier,
    checkpoint: Path,
    test_result: EvaluationResult,
    calibration: CalibrationReport | None,
) -> dict[str, Path]:
    """The card's PNGs beside `checkpoint`; returns the paths the card links (and the card's own)."""
    paths = report_paths(checkpoint)
    if calibration is None:
        del paths["reliability"]
    else:
        plot_reliability(calibration, paths["reliability"], "test set reliability")
    history = classifier.training.get("history", {"epochs": []})
    if history["epochs"]:
        plot_curves(history, paths["curves"])
    plot_confusion(
        test_result, classifier.class_names, paths["confusion"], "test set confusion matrix"
    )
    return paths


def _summary_section(
    classifier: ImageClassifier,
    checkpoint: Path,
    test_result: EvaluationResult,
    generated_by: str,
    calibration: CalibrationReport | None,
    data: str | None = None,
) -> list[str]:
    """The title, what the model is, and the table of its headline figures."""
    training = classifier.training
    history = training.get("history", {"epochs": []})
    arch = classifier.config
    size_bytes = checkpoint.stat().st_size if checkpoint.exists() else 0
    calibration_row = (
        [
            f"| test expected calibration error | {calibration.after.ece:.4f} (raw softmax: "
            f"{calibration.before.ece:.4f}; temperature {calibration.temperature:.4f}) |"
        ]
        if calibration is not None
        else []
    )
    data_rows = [f"| training data | {training['data']} |"] if training.get("data") else []
    if data:
        data_rows.append(f"| test figures measured on | {data} |")
    return [
        f"# Model card: `{checkpoint.name}`",
        "",
        f"A {len(arch.widths)}-stage CNN (widths {list(arch.widths)}, convs per stage "
        f"{list(arch.convs_per_stage)}, BatchNorm, residual 3×3 convs, {arch.head} head) classifying "
        f"{arch.num_channels}×{arch.image_size[0]}×{arch.image_size[1]} images into {arch.num_classes} classes. "
        + generated_by,
        "",
        "| | |",
        "|---|---|",
        f"| **test accuracy** | **{_percent(test_result.accuracy)}** ({test_result.num_samples} images) |",
        f"| test accuracy, bf16 inference | {_percent(classifier.metrics.get('test_accuracy_bf16'))} |",
        f"| validation accuracy (last epoch) | {_percent(classifier.metrics.get('val_accuracy'))} |",
        f"| test loss (NLL of the served probabilities) | {test_result.loss:.4f} |",
        *calibration_row,
        *data_rows,
        f"| version (weights sha256[:12]) | `{classifier.version}` |",
        f"| parameters | {classifier.num_parameters:,} |",
        f"| multiply-accumulates per image | {arch.multiply_accumulates():,} |",
        f"| checkpoint size | {size_bytes / 1024:.1f} KiB |",
        f"| seed | {training.get('seed')} |",
        f"| training time (wall) | {duration(history.get('seconds', 0.0))} ({history.get('images_per_second', 0.0):.0f} images/s), "
        f"1-min load average {_load(history)} on {os.cpu_count()} cores |",
        f"| training time (process CPU) | {duration(history.get('cpu_seconds', 0.0))}, {training.get('threads', '?')} intra-op thread(s) |",
        f"| training hardware | {training.get('device')} ({cpu_description()}) |",
        f"| torch | {training.get('torch_version')} |",
        f"| training data sha256 | `{training.get('data_hash')}` ({history.get('train_size')} train / {history.get('val_size')} validation images) |",
        "",
    ]


def _recipe_section(command: str, config: dict[str, Any]) -> list[str]:
    """The command that trained the model and its hyperparameters."""
    return [
        "## Training command",
        "",
        "```",
        command,
        "```",
        "",
        "## Hyperparameters",
        "",
        "| name | value |",
        "|---|---|",
        *(f"| {key} | {value} |" for key, value in config.items()),
        "",
    ]


def _throughput_section(throughput: Sequence[Throughput]) -> list[str]:
    """Images/s of `predict` by precision and batch size, with how they were measured."""
    return [
        "## Inference throughput (CPU)",
        "",
        "`ImageClassifier.predict` on random uint8 images, BatchNorm fused into the convs, channels_last, "
        f"best of {_windows(throughput)} timed windows, on {cpu_description()}; 1-minute load average {_now_load()} when "
        "measured. Wall-clock images/s use 2 intra-op threads and drop sharply when other processes "
        "compete for the cores; images per CPU-second use 1 thread and divide by that thread's CPU time, "
        'which competition distorts far less. `bf16` is `ImageClassifier.load(path, precision="bf16")`: '
        "convs in bfloat16, probabilities still float32.",
        "",
        "| precision | batch size | images/s (2 threads, wall) | images per CPU-second (1 thread) |",
        "|---|---:|---:|---:|",
        *_throughput_rows(throughput),
        "",
    ]


def _per_class_section(
    class_names: Sequence[str], result: EvaluationResult, confusion: Path
) -> list[str]:
    """Test accuracy of each class, and the confusion matrix figure."""
    return [
        "## Per-class test accuracy",
        "",
        *_per_class_table(class_names, result),
        "",
        f"![test confusion matrix]({confusion.name})",
        "",
    ]


def _per_class_table(class_names: Sequence[str], result: EvaluationResult) -> list[str]:
    return [
        "| class | accuracy |",
        "|---|---:|",
        *(
            f"| {name} | {_percent(acc)} |"
            for name, acc in zip(class_names, result.per_class_accuracy, strict=True)
        ),
    ]


def _epochs_section(history: dict[str, Any], curves: Path) -> list[str]:
    """One row per epoch, and the loss and accuracy curves."""
    return [
        "## Epochs",
        "",
        f"![loss and accuracy curves]({curves.name})",
        "",
        "| epoch | lr at start | train loss | train acc | val loss | val acc | seconds |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        *(
            f"| {e['epoch']} | {e['lr']:.4f} | {e['train_loss']:.4f} | {_percent(e['train_accuracy'])} | "
            f"{_decimal(e['val_loss'])} | {_percent(e['val_accuracy'])} | {e['seconds']:.1f} |"
            for e in history["epochs"]
        ),
        "",
    ]


def _use_section(checkpoint: Path) -> list[str]:
    """How to load the checkpoint and classify images with it."""
    return [
        "## Use",
        "",
        "```python",
        "from ml import ImageClassifier",
        f'clf = ImageClassifier.load("{checkpoint.as_posix()}")',
        "probabilities = clf.predict(images)  # uint8 N×C×H×W (0..255) or float [0, 1]",
        "```",
        "",
    ]


def evaluation_report(
    classifier: ImageClassifier,
    checkpoint: Path,
    result: EvaluationResult,
    report_dir: Path | None = None,
    data: str | None = None,
) -> dict[str, Path]:
    """Confusion matrix PNG and a short markdown report for `fmnist evaluate`; returns their paths.

    `data` names the evaluation set (e.g. `ml.folders.describe`'s line for an image folder)."""
    target = (report_dir / checkpoint.name) if report_dir is not None else checkpoint
    target.parent.mkdir(parents=True, exist_ok=True)
    paths = report_paths(target, suffix="-evaluation")
    del paths["curves"], paths["reliability"]
    plot_confusion(
        result,
        classifier.class_names,
        paths["confusion"],
        f"{checkpoint.name}: {'confusion matrix' if data else 'test confusion matrix'}",
    )
    recorded = classifier.metrics.get("test_accuracy")
    lines = [
        f"# Evaluation of `{checkpoint.name}` (version `{classifier.version}`)",
        "",
        f"- test accuracy: **{_percent(result.accuracy)}** on {result.num_samples} images (loss {result.loss:.4f})",
        f"- recorded when trained: {_percent(recorded)}",
        *([f"- data: {data}"] if data else []),
        f"- evaluated on: {classifier.device} ({cpu_description()}), torch {torch.__version__}",
        "",
        *_per_class_table(classifier.class_names, result),
        "",
        f"![confusion matrix]({paths['confusion'].name})",
        "",
    ]
    paths["card"].write_text("\n".join(lines))
    return paths
