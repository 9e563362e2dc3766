"""What every server command (`serve`, `gateway`, `worker`) does before its work: one prologue.

Settings from FMNIST_* variables overridden by the flags given, the invalid-setting message and
exit status 2, logging, garbage-collector tuning, and passive torch threads for the commands that
run the model. Also the batching flags `serve` and `worker` share.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from typing import Any

from app.logs import configure_logging
from app.settings import Settings

# Exit status of a command given an invalid setting (as argparse exits on a bad flag).
INVALID_SETTING_STATUS = 2


def start_command(
    command: str, overrides: Mapping[str, Any], *, runs_model: bool = False
) -> Settings | None:
    """The shared prologue: settings from the environment with `overrides` (None: not given) on
    top, then logging and GC tuning. Prints why and returns None when a setting is invalid; the
    caller exits with `INVALID_SETTING_STATUS`. `runs_model` sets torch's threads passive first."""
    if runs_model:
        passive_torch_threads()
    try:
        settings = settings_from(overrides)
    except ValueError as exc:  # pydantic's ValidationError names the field and the limit
        print(f"fmnist {command}: invalid setting: {exc}", file=sys.stderr)
        return None
    configure_logging(settings.log_level)
    tune_garbage_collector(settings.gc_threshold)
    return settings


def settings_from(overrides: Mapping[str, Any]) -> Settings:
    """Environment settings with the flags that were given (not None) on top; raises ValueError."""
    return Settings(**{name: value for name, value in overrides.items() if value is not None})


# Flag -> (setting, metavar, type, what it does); the setting's env var and default join the help.
BATCHING_FLAGS: dict[str, tuple[str, str, type, str]] = {
    "--max-batch-size": ("max_batch_size", "N", int, "largest batch when the queue is deep"),
    "--preferred-batch-size": (
        "preferred_batch_size",
        "N",
        int,
        "batch size that counts as full when the queue is shallow",
    ),
    "--batch-fill-wait-ms": (
        "batch_fill_wait_ms",
        "MS",
        float,
        "longest wait for a batch to fill, from its oldest image",
    ),
    "--inference-concurrency": (
        "inference_concurrency",
        "N",
        int,
        "forward passes run side by side (default: the usable cores, at most 4; 1 on a GPU)",
    ),
    "--inference-threads": (
        "inference_threads",
        "N",
        int,
        "torch threads per forward pass (default: cores / concurrency)",
    ),
}


def add_batching_arguments(parser: argparse.ArgumentParser) -> None:
    """The worker's batching and concurrency settings as flags, each overriding its FMNIST_ variable."""
    group = parser.add_argument_group(
        "batching", "how the worker batches images (flags override FMNIST_* variables)"
    )
    for flag, (name, metavar, kind, what) in BATCHING_FLAGS.items():
        default = Settings.model_fields[name].default
        shown = f", default {default}" if default is not None else ""
        group.add_argument(
            flag,
            dest=name,
            metavar=metavar,
            type=kind,
            help=f"{what} (FMNIST_{name.upper()}{shown})",
        )
    # The flag's name before 0.x; kept working, hidden from the help.
    group.add_argument(
        "--max-wait-ms", dest="batch_fill_wait_ms", type=float, help=argparse.SUPPRESS
    )


def batching_overrides(args: argparse.Namespace) -> dict[str, object]:
    """The batching settings given as flags (unset flags leave the environment's value)."""
    return {name: getattr(args, name) for name, *_ in BATCHING_FLAGS.values()}


def passive_torch_threads() -> None:
    """Let torch's idle OpenMP threads sleep instead of spin, unless the user chose otherwise.

    Must run before torch is imported: spinning threads steal the CPU the event loop needs
    between batches (docs/benchmarks.md).
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def tune_garbage_collector(threshold: int) -> None:
    """Collect the young generation every `threshold` allocations instead of Python's 700.

    A server holding many results in its store otherwise spends its tail latency in cyclic GC
    (docs/benchmarks.md). Objects alive now (imports, settings) are frozen out of every later
    collection. 0 keeps Python's defaults.
    """
    import gc

    if threshold <= 0:
        return
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(threshold, gen1, gen2)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """`--model [NAME=]SOURCE`, repeatable, and `--device`: what a command that runs models serves."""
    parser.add_argument(
        "--model",
        metavar="[NAME=]SOURCE",
        action="append",
        default=[],
        help="a model to serve, repeatable: a checkpoint (.safetensors), an exported program (.pt2 or "
        "TorchScript .pt, with its spec beside it) or package.module:Class; NAME= names it (default: "
        "the file's stem or the spec's name); the same NAME with two sources serves two versions of "
        "one model. Without it: FMNIST_MODEL_PATH",
    )
    parser.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        help="where the models run (FMNIST_DEVICE; auto: CUDA when available)",
    )


def parse_model_option(text: str) -> tuple[str | None, str]:
    """`NAME=SOURCE` or a bare `SOURCE` (named by the model itself); ValueError on a bad name."""
    from app.protocol import check_model_name

    name, sep, source = text.partition("=")
    if not sep or "/" in name or ":" in name:
        return None, text
    if not source:
        raise ValueError(f"--model {text!r}: NAME=SOURCE needs a source after '='")
    return check_model_name(name), source


def model_options(
    args: argparse.Namespace, settings: Settings
) -> list[tuple[str | None, str]] | None:
    """The (name, source) pairs of `--model` (FMNIST_MODEL_PATH without one); None after printing
    why a `--model` is invalid (the caller exits 2)."""
    if not args.model:
        return [(None, str(settings.model_path))]
    try:
        models = [parse_model_option(text) for text in args.model]
    except ValueError as exc:
        print(f"fmnist: {exc}", file=sys.stderr)
        return None
    # One name given twice with different sources serves two versions of one model (a canary).
    named = [(name, source) for name, source in models if name is not None]
    if len(named) != len(set(named)):
        print(f"fmnist: --model gives the same NAME=SOURCE twice: {args.model}", file=sys.stderr)
        return None
    return models
