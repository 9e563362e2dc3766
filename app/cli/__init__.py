"""The `fmnist` command line: one sub-command per module in this package."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from app import __version__

# Each module defines `register(subparsers)`, which adds its parser and sets `func(args) -> int`.
# Modules are imported only to build the parser; heavy imports (torch, uvicorn) happen inside `func`.
COMMAND_MODULES = (
    "serve",
    "gateway",
    "worker",
    "train",
    "evaluate",
    "send_images",
    "listen",
    "replay",
    "models",
    "promote",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fmnist",
        description="Train, serve and call a batched image classifier behind a pub/sub broker.",
    )
    parser.add_argument("--version", action="version", version=f"fmnist-service {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"app.cli.{name}")
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
